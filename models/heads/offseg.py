"""OffSeg's decode head (Zhang et al., ICCV 2025): a FreqFusion cascade, then Offset Learning at stride 4.

Each backbone level is reduced by a 1x1 conv + GN + ReLU (`pre.{i}`). From the deepest level, three
FreqFusion modules upsample the running map to the next finer level (strides 16, 8, 4), and the
sharpened finer map and the upsampled running map are concatenated group by group (see
`interleave_groups`). A 1x1 conv + GN + ReLU (`align`) brings the stride-4 map to `channels`, and the
classifier, Offset Learning as published, gives the logits at stride 4. Keys are mmseg's (`pre`,
`freqfusions`, `align`); the classifier is `classifier` (mmseg `offset_learning` or `conv_seg`).
"""

import torch
from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .freqfusion import FreqFusion
from .layers import ConvModule

RESAMPLE_GROUPS = 4
"""Channel groups of FreqFusion's sampler; the concat interleaves the same number of groups."""


def interleave_groups(hr: torch.Tensor, lr: torch.Tensor, groups: int = RESAMPLE_GROUPS) -> torch.Tensor:
    """Concat as [hr_g0, lr_g0, hr_g1, lr_g1, ...] over `groups` contiguous channel groups of each.

    The next FreqFusion resamples each contiguous quarter of its input with its own offsets, so this
    order gives every group a share of both the fine and the upsampled coarse channels.
    """
    b, _, h, w = hr.shape
    return torch.cat((hr.reshape(b * groups, -1, h, w), lr.reshape(b * groups, -1, h, w)), dim=1).reshape(b, -1, h, w)


class OffSegHead(nn.Module):
    """OffSeg's head: per-level 1x1 reductions, a FreqFusion cascade from stride 32 to 4, Offset Learning.

    List of 4 backbone maps (strides 4/8/16/32) -> logits (B, num_classes, H/4, W/4).

    `new_channels` are the per-level widths after `pre`; FreqFusion k fuses level 2−k (hr) into the
    running map (lr) with (lr + hr) // 4 compressed channels. `offset_learning=False` puts a plain
    dropout + 1x1 classifier in place of Offset Learning (an ablation; the published head never uses
    its dropout).
    """

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        new_channels: list = (32, 32, 64, 128),
        channels: int = 256,
        offset_learning: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.pre = nn.ModuleList(ConvModule(c, n, 1, norm='gn') for c, n in zip(in_channels, new_channels))
        fusions, lr_channels = [], new_channels[-1]
        for hr_channels in reversed(new_channels[:-1]):
            fusions.append(
                FreqFusion(hr_channels, lr_channels, (hr_channels + lr_channels) // 4, resample_groups=RESAMPLE_GROUPS)
            )
            lr_channels += hr_channels
        self.freqfusions = nn.ModuleList(fusions)
        self.align = ConvModule(lr_channels, channels, 1, norm='gn')
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    def forward(self, features: list) -> torch.Tensor:
        features = [pre(f) for pre, f in zip(self.pre, features)]
        x = features[-1]
        for fusion, hr in zip(self.freqfusions, reversed(features[:-1])):
            x = interleave_groups(*fusion(hr, x))
        return self.classifier(self.align(x))

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """mmseg `decode_head.*` keys (prefix stripped) -> ours.

        The classifier is renamed (and the unused `conv_seg` dropped) by `convert_classifier_keys`.
        FreqFusion's `hamming_lowpass` / `hamming_highpass` buffers are constant 1 in OffSeg (no
        Hamming window) and have no counterpart here: they are checked and dropped.
        """
        converted = {}
        for key, value in convert_classifier_keys(state).items():
            if key.endswith(('.hamming_lowpass', '.hamming_highpass')):
                if not torch.all(value == 1):
                    raise ValueError(f'{key}: a Hamming-windowed FreqFusion is not supported (expected 1)')
                continue
            converted[key] = value
        return converted
