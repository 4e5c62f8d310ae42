"""Semantic FPN head (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks"), as mmseg's FPN + FPNHead
and segmentation_models_pytorch's FPN decoder build it.

A top-down pyramid (1x1 laterals, each level plus its coarser neighbour upsampled) of `pyramid_channels`;
then every level climbs back to the finest map through 3x3 ConvModules of `channels`, each followed by
a 2x bilinear upsampling, and the levels are summed: every stride reaches the classifier at 1/4.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .layers import ConvModule, resize


class FPNHead(nn.Module):
    """Logits at the finest map's resolution from all backbone levels."""

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        pyramid_channels: int = 256,
        channels: int = 128,
        norm: str = 'bn',
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, pyramid_channels, 1) for c in in_channels)
        # Level i (stride 4 * 2^i) takes max(1, i) conv + upsampling steps to reach the finest map.
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(
                ConvModule(pyramid_channels if step == 0 else channels, channels, 3, norm=norm)
                for step in range(max(1, level))
            )
            for level in range(len(in_channels))
        )
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    convert_checkpoint = staticmethod(convert_classifier_keys)

    def top_down(self, features: list) -> list:
        """The pyramid: each lateral plus the coarser level upsampled (nearest, as both references do)."""
        levels = [lateral(x) for lateral, x in zip(self.laterals, features)]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[2:], mode='nearest')
        return levels

    def forward(self, features: list) -> torch.Tensor:
        sizes = [x.shape[2:] for x in features]
        merged = 0
        for level, (x, steps) in enumerate(zip(self.top_down(features), self.scale_heads)):
            for step, conv in enumerate(steps):
                x = conv(x)
                if level > 0:  # to the next finer map's size: 2x, or 1x where a dilated backbone kept it
                    x = resize(x, sizes[level - step - 1])
            merged = merged + x
        return self.classifier(merged)
