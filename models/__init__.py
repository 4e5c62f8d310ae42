from .backbones import BACKBONES
from .heads import HEADS
from .offset_learning import Offset_Learning, OffsetLearning
from .segmentor import Segmentor
