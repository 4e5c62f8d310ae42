"""DeepLabV3 (Chen et al. 2017) and DeepLabV3+ (Chen et al. 2018) heads, as mmseg builds them.

Both run atrous spatial pyramid pooling on the deepest map: an image-pooling branch, a 1x1 branch
and 3x3 branches at growing dilations, concatenated and fused by a 3x3 bottleneck. The dilations
(1, 12, 24, 36) are meant for an output-stride-8 backbone; use (1, 6, 12, 18) at output stride 16.
DeepLabV3+ makes the dilated branches depthwise-separable and adds a decoder: the ASPP output is
upsampled to stride 4 and fused with the stride-4 map reduced to 48 channels.
"""

import torch
from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .layers import ConvModule, DepthwiseSeparableConvModule, resize


class DeepLabV3Head(nn.Module):
    """DeepLabV3: logits at the deepest map's stride."""

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 512,
        dilations: list = (1, 12, 24, 36),
        dropout: float = 0.1,
        offset_learning: bool = False,
        separable: bool = False,
    ):
        super().__init__()
        deepest = in_channels[-1]
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(deepest, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(deepest, channels, 1)
            if d == 1
            else DepthwiseSeparableConvModule(deepest, channels, 3, dilation=d)
            if separable
            else ConvModule(deepest, channels, 3, dilation=d)
            for d in dilations
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3)
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    convert_checkpoint = staticmethod(convert_classifier_keys)
    """mmseg `decode_head.*` keys (prefix stripped) -> ours: only `conv_seg` is renamed."""

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        branches = [resize(self.image_pool(x), x.shape[2:])] + [branch(x) for branch in self.aspp_modules]
        return self.bottleneck(torch.cat(branches, dim=1))

    def forward(self, features: list) -> torch.Tensor:
        return self.classifier(self.pyramid(features[-1]))


class DeepLabV3PlusHead(DeepLabV3Head):
    """DeepLabV3+ (mmseg `DepthwiseSeparableASPPHead`): logits at the stride-4 map's resolution."""

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 512,
        dilations: list = (1, 12, 24, 36),
        c1_channels: int = 48,
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__(in_channels, num_classes, channels, dilations, dropout, offset_learning, separable=True)
        self.c1_bottleneck = ConvModule(in_channels[0], c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(channels + c1_channels, channels, 3),
            DepthwiseSeparableConvModule(channels, channels, 3),
        )

    def forward(self, features: list) -> torch.Tensor:
        low_level = self.c1_bottleneck(features[0])
        x = resize(self.pyramid(features[-1]), low_level.shape[2:])
        return self.classifier(self.sep_bottleneck(torch.cat([x, low_level], dim=1)))
