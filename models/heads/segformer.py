"""SegFormer decode heads: mmseg's `SegformerHead`, the official All-MLP head, and two faster variants.

All of them project backbone maps to one width, upsample them to the finest map used, concatenate,
fuse with a 1x1 conv + BN + ReLU and classify (`build_classifier`: a 1x1 conv, or Offset Learning).
Everything is relative to the maps' own sizes, so any input size works; logits stay unbounded.
"""

import re

import torch
from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .layers import ConvModule, resize


class SegFormerHead(nn.Module):
    """mmseg's `SegformerHead`, the head behind the mmseg model zoo and the OffSeg SegFormer+OL weights.

    Each stride-4/8/16/32 map: 1x1 ConvModule to `channels` (256 for every MiT variant in mmseg's
    configs), resized to stride 4; concatenated c1..c4; `fusion_conv` 1x1 ConvModule; classifier.
    Logits at stride 4. With Offset Learning a MaxPool2d(2, 2) comes first, as in the published
    `SegformerHeadOffsetLearning`, so OL and its logits run at stride 8.
    """

    in_index = (0, 1, 2, 3)
    pool_before_offset_learning = True

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__()
        used = [in_channels[i] for i in self.in_index]
        self.convs = nn.ModuleList(ConvModule(c, channels, 1) for c in used)
        self.fusion_conv = ConvModule(len(used) * channels, channels, 1)
        pool = offset_learning and self.pool_before_offset_learning
        self.pool = nn.MaxPool2d(2, 2) if pool else nn.Identity()
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    def fuse(self, features: list) -> torch.Tensor:
        """The map the classifier sees (Offset Learning's input)."""
        features = [features[i] for i in self.in_index]
        size = features[0].shape[2:]
        x = torch.cat([resize(conv(f), size) for conv, f in zip(self.convs, features)], dim=1)
        return self.pool(self.fusion_conv(x))

    def forward(self, features: list) -> torch.Tensor:
        return self.classifier(self.fuse(features))

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """mmseg head keys (`convs.{i}.conv/bn`, `fusion_conv`: already ours) and its classifier -> ours."""
        return convert_classifier_keys(state)


class UltraFastSegFormerHead(SegFormerHead):
    """SegFormerHead without the stride-4 map, fused at stride 8 and 128 wide by default.

    Drops, compared with the full head: the stride-4 map and its projection, all stride-4
    computation (the 1x1 fusion conv runs on 4x fewer pixels, with 3 inputs instead of 4, at half
    the width) and the max-pool before Offset Learning, which already runs at stride 8 here.
    Logits at stride 8: fine detail below 8 pixels comes only from the final upsampling.
    """

    in_index = (1, 2, 3)
    pool_before_offset_learning = False

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 128,
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__(in_channels, num_classes, channels, dropout, offset_learning)


class ExtremelyFastSegFormerHead(SegFormerHead):
    """SegFormerHead on the stride-16 and stride-32 maps only, fused at stride 16, 64 wide by default.

    Drops, compared with the full head: the stride-4 and stride-8 maps and their projections, all
    computation above stride 16 (16x fewer fusion pixels, 2 inputs instead of 4, a quarter of the
    width) and the max-pool before Offset Learning, which runs at stride 16 here.
    Logits at stride 16: boundaries are only as sharp as bilinear upsampling from 1/16 makes them.
    """

    in_index = (2, 3)
    pool_before_offset_learning = False

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 64,
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__(in_channels, num_classes, channels, dropout, offset_learning)


class SegFormerMLPHead(nn.Module):
    """The official All-MLP head (NVlabs `SegFormerHead`, HF `SegformerDecodeHead`).

    Differs from mmseg's head in three ways: each map is projected by a Linear with bias (no BN,
    no ReLU); the upsampled maps are concatenated in reverse order [c4, c3, c2, c1]; its width E is
    256 for MiT-B0/B1 and 768 for B2..B5 (`MLP_HEAD_CHANNELS`). Logits at stride 4. With Offset
    Learning it pools to stride 8 first, like `SegFormerHead` (no published All-MLP + OL model).
    """

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__()
        self.linear_projections = nn.ModuleList(nn.Linear(c, channels) for c in in_channels)
        self.linear_fuse = ConvModule(len(in_channels) * channels, channels, 1)
        self.pool = nn.MaxPool2d(2, 2) if offset_learning else nn.Identity()
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    def fuse(self, features: list) -> torch.Tensor:
        """The map the classifier sees (Offset Learning's input)."""
        size = features[0].shape[2:]
        maps = [
            resize(linear(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), size)
            for linear, f in zip(self.linear_projections, features)
        ]
        return self.pool(self.linear_fuse(torch.cat(maps[::-1], dim=1)))

    def forward(self, features: list) -> torch.Tensor:
        return self.classifier(self.fuse(features))

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """HF 5.x / 4.x (`SegformerForSemanticSegmentation`) or official NVlabs head keys -> ours.

        NVlabs' head also carries mmseg's `conv_seg`, built but unused (`linear_pred` classifies);
        it is dropped.
        """
        converted = {}
        for key, value in state.items():
            if key.startswith('conv_seg.'):
                continue
            for pattern, replacement in MLP_HEAD_RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        return converted


MLP_HEAD_RENAMES = [
    (r'^linear_projections\.(\d+)\.proj\.', r'linear_projections.\1.'),  # HF 5.x
    (r'^linear_c\.(\d+)\.proj\.', r'linear_projections.\1.'),  # HF 4.x
    (r'^linear_c(\d)\.proj\.', lambda m: f'linear_projections.{int(m[1]) - 1}.'),  # NVlabs
    (r'^linear_fuse\.weight$', 'linear_fuse.conv.weight'),  # HF
    (r'^batch_norm\.', 'linear_fuse.bn.'),  # HF
    (r'^(classifier|linear_pred)\.(weight|bias)$', r'classifier.conv.\2'),  # HF, NVlabs
]
"""Applied in order; NVlabs' `linear_fuse.conv/bn` are already ours."""

MLP_HEAD_CHANNELS = {'b0': 256, 'b1': 256, 'b2': 768, 'b3': 768, 'b4': 768, 'b5': 768}
"""The official All-MLP head width E per MiT variant (NVlabs configs, HF `decoder_hidden_size`)."""
