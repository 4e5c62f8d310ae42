"""The last layer every head shares: a per-pixel classifier, or Offset Learning in its place."""

from torch import nn

from ..offset_learning import OffsetLearning


class PixelClassifier(nn.Module):
    """Dropout2d then a 1x1 conv: mmseg's `cls_seg` (conv initialised normal(0, 0.01), bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return self.conv(self.dropout(x))


def build_classifier(channels: int, num_classes: int, dropout: float, offset_learning: bool) -> nn.Module:
    """Offset Learning replaces the classifier and its dropout, as in the published heads."""
    if offset_learning:
        return OffsetLearning(num_classes, channels)
    return PixelClassifier(channels, num_classes, dropout)


def convert_classifier_keys(state: dict) -> dict:
    """mmseg head keys -> ours: `conv_seg` or `offset_learning` become `classifier`.

    Published Offset Learning heads also carry mmseg's `conv_seg`, built but never used in their
    forward (it holds untrained values); it is the one key dropped here.
    """
    uses_offset_learning = any(k.startswith('offset_learning.') for k in state)
    converted = {}
    for key, value in state.items():
        if key.startswith('conv_seg.'):
            if uses_offset_learning:
                continue
            key = 'classifier.conv.' + key.removeprefix('conv_seg.')
        elif key.startswith('offset_learning.'):
            key = 'classifier.' + key.removeprefix('offset_learning.')
        converted[key] = value
    return converted
