"""Backbones: each returns 4 NCHW maps at strides 4/8/16/32 and knows its `out_channels`."""
from .resnet import ResNet

BACKBONES = {
    'resnet': ResNet,
}
