from .backbones import BACKBONES
from .heads import HEADS
from .offset_learning import Offset_Learning, Offset_Learning_Mask, OffsetLearning, OffsetLearningMask
from .segmentor import Segmentor
