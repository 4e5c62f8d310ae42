"""Heads: list of backbone maps -> logits (EoMT: a ViT's handed-over blocks -> mask classification). Every head
takes `offset_learning` to swap its classifier."""

from .deeplab import DeepLabV3Head, DeepLabV3PlusHead
from .eomt import EoMTHead
from .fcn import FCNHead
from .fpn import FPNHead
from .ham import LightHamHead
from .linear import LinearHead
from .mask2former import Mask2FormerHead
from .offseg import OffSegHead
from .segformer import ExtremelyFastSegFormerHead, SegFormerHead, SegFormerMLPHead, UltraFastSegFormerHead
from .upernet import UPerHead

HEADS = {
    'deeplabv3plus': DeepLabV3PlusHead,
    'aspp': DeepLabV3PlusHead,  # SegHiero's name for it
    'deeplabv3': DeepLabV3Head,
    'segformer': SegFormerHead,
    'segformer_mlp': SegFormerMLPHead,
    'ultrafast_segformer': UltraFastSegFormerHead,
    'extremely_fast_segformer': ExtremelyFastSegFormerHead,
    'ham': LightHamHead,
    'offseg': OffSegHead,
    'fcn': FCNHead,
    'fpn': FPNHead,
    'mask2former': Mask2FormerHead,
    'upernet': UPerHead,
    'linear': LinearHead,
    'eomt': EoMTHead,
}
