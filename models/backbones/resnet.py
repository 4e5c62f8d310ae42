"""ResNet (He et al. 2016) through timm, returning C2..C5 (strides 4/8/16/32).

timm's ResNet exposes 5 feature levels (the stem first), so the four stages are out_indices 1..4.
`output_stride` 8 or 16 dilates the last stages (DeepLab "D8"/"D16"); the deep-stem variants
`50c`/`101c` are mmseg's ResNetV1c, `50d`/`101d` add average-pool shortcuts.
`zero_init_last` is timm's: the last BatchNorm of every block starts at zero, so each block starts
as its shortcut. It only matters from random weights; torchvision (and SMP's encoders) start at one.
"""

from typing import NamedTuple

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from .variants import lookup


class ResNet(nn.Module):
    """timm ResNet feature extractor. Keys are timm's own (`conv1.weight`, `layer1.0...`)."""

    checkpoint_blocks = (BasicBlock, Bottleneck)  # backbone.with_cp (models/activation_checkpointing.py)

    def __init__(
        self,
        variant: str | int = '50',
        output_stride: int = 32,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
    ):
        super().__init__()
        spec = lookup('ResNet', VARIANTS, str(variant))
        if output_stride not in (8, 16, 32):
            raise ValueError(f'ResNet output_stride must be 8, 16 or 32, got {output_stride}')
        self.body = timm.create_model(
            spec.timm_name,
            pretrained=False,
            features_only=True,
            out_indices=(1, 2, 3, 4),
            output_stride=output_stride,
            drop_path_rate=drop_path_rate,
            zero_init_last=zero_init_last,
        )
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list:
        return self.body(x)

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """timm/torchvision ImageNet weights, or an mmseg backbone -> ours: prefix `body.`, drop the `fc`
        classifier. mmseg's deep stem (ResNetV1c/d) is one `stem` Sequential whose last BatchNorm
        timm keeps apart as `bn1`; the blocks are named alike."""
        converted = {}
        for key, value in state.items():
            if key.startswith('fc.'):
                continue
            if key.startswith('stem.'):
                index, rest = key.removeprefix('stem.').split('.', 1)
                key = f'bn1.{rest}' if index == MMSEG_STEM_BN else f'conv1.{index}.{rest}'
            converted[f'body.{key}'] = value
        return converted


MMSEG_STEM_BN = '7'
"""mmseg's deep stem: conv, BN, ReLU three times (indices 0-8); timm's `conv1` holds the first eight,
the last BatchNorm is its `bn1`."""


class Variant(NamedTuple):
    timm_name: str


VARIANTS = {name: Variant(f'resnet{name}') for name in ('18', '34', '50', '50c', '50d', '101', '101c', '101d', '152')}
VARIANTS['test'] = Variant('test_resnet')  # timm's few-channel ResNet, for tests only
