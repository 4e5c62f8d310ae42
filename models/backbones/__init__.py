"""Backbones: each returns 4 NCHW maps at strides 4/8/16/32 and knows its `out_channels`."""

from .convnext import ConvNeXt
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
}
