"""Backbones: each returns 4 NCHW maps (strides 4/8/16/32; a ViT's pyramid p/4..2p) and knows its `out_channels`."""

from .convnext import ConvNeXt
from .dinov2 import DINOv2
from .dinov3 import DINOv3
from .dinov3_convnext import DINOv3ConvNeXt
from .efficientformer_v2 import EfficientFormerV2
from .mit import MiT
from .mscan import MSCAN
from .resnet import ResNet
from .swin import Swin

BACKBONES = {
    'resnet': ResNet,
    'convnext': ConvNeXt,
    'mit': MiT,
    'mscan': MSCAN,
    'efficientformerv2': EfficientFormerV2,
    'swin': Swin,
    'dinov2': DINOv2,
    'dinov3': DINOv3,
    'dinov3_convnext': DINOv3ConvNeXt,
}
