"""The linear probe of DINOv2 and DINOv3 (`BNHead`, `LinearHead`): the features as they are, BatchNorm,
then a 1x1 classifier, so the score measures the backbone and not a decoder.

The chosen maps (`in_index`; by default the last, which on a ViT without its pyramid is the last
block at the patch stride) are resized bilinearly to the first one's size and concatenated (DINOv2's
"ms" probe takes the last four blocks), then BatchNorm and the classifier: dropout and a 1x1 conv
(DINOv3 drops out before the BatchNorm, DINOv2 not at all: `dropout: 0` is DINOv2's head exactly),
or Offset Learning in its place. Keys as mmseg's `BNHead` (`bn`, `conv_seg` -> `classifier.conv`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import build_classifier, convert_classifier_keys


class LinearHead(nn.Module):
    """Backbone maps -> logits at the first chosen map's stride."""

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        in_index: tuple = (-1,),
        dropout: float = 0.0,
        offset_learning: bool = False,
    ):
        super().__init__()
        self.in_index = [i % len(in_channels) for i in in_index]
        channels = sum(in_channels[i] for i in self.in_index)
        self.bn = nn.BatchNorm2d(channels)
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    convert_checkpoint = staticmethod(convert_classifier_keys)
    """mmseg `BNHead` keys (prefix stripped) -> ours: only `conv_seg` is renamed."""

    def forward(self, features: list) -> torch.Tensor:
        maps = [features[i] for i in self.in_index]
        size = maps[0].shape[-2:]
        resized = [maps[0], *(F.interpolate(m, size=size, mode='bilinear', align_corners=False) for m in maps[1:])]
        return self.classifier(self.bn(torch.cat(resized, dim=1)))
