"""FCN head (Long et al. 2015), used as the auxiliary training head as in mmseg's DeepLab recipes."""

from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .layers import ConvModule


class FCNHead(nn.Module):
    """`num_convs` 3x3 ConvModules on one backbone level, then the classifier (mmseg `FCNHead` keys)."""

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        in_index: int = 2,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        offset_learning: bool = False,
    ):
        super().__init__()
        self.in_index = in_index
        widths = [in_channels[in_index]] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3) for a, b in zip(widths, widths[1:])))
        self.classifier = build_classifier(widths[-1], num_classes, dropout, offset_learning)

    convert_checkpoint = staticmethod(convert_classifier_keys)
    """mmseg `auxiliary_head.*` keys (prefix stripped) -> ours: only `conv_seg` is renamed."""

    def forward(self, features: list):
        return self.classifier(self.convs(features[self.in_index]))
