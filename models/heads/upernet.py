"""UPerNet's head (Xiao et al. 2018) as mmseg's `UPerHead` builds it, the head the ConvNeXt, Swin and
BEiT papers report their segmentation numbers with.

Pyramid pooling on the deepest map (average pools to 1, 2, 3 and 6 bins, each a 1x1 ConvModule,
upsampled bilinearly and concatenated with the map, then a 3x3 ConvModule), 1x1 laterals on the other
maps, a top-down path that adds each coarser level upsampled bilinearly, a 3x3 ConvModule on every
level but the pooled one, all levels upsampled to the finest and concatenated, a 3x3 ConvModule, and
the classifier: logits at the finest map's stride. Module names are mmseg's, so its `decode_head.*`
keys load with only `conv_seg` renamed.

The pool to one bin feeds BatchNorm a 1x1 map: training it needs more than one image per process
(the config check says so), as mmseg trains it with SyncBN over 16.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .layers import ConvModule


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class UPerHead(nn.Module):
    """Four maps (fine to coarse) -> logits at the first map's stride."""

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple = (1, 2, 3, 6),
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__()
        deepest = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(deepest, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(deepest + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    convert_checkpoint = staticmethod(convert_classifier_keys)
    """mmseg `decode_head.*` keys (prefix stripped) -> ours: only `conv_seg` is renamed."""

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(branch(x), x.shape[-2:]) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: list) -> torch.Tensor:
        levels = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        levels.append(self.pyramid_pooling(features[-1]))
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outputs = [conv(level) for conv, level in zip(self.fpn_convs, levels)] + [levels[-1]]
        finest = outputs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outputs[0], *(resize(x, finest) for x in outputs[1:])], dim=1))
        return self.classifier(fused)
