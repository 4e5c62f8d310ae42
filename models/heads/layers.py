"""Conv + norm + ReLU blocks named like mmcv's ConvModule, so published head keys map one to one."""

import torch.nn.functional as F
from torch import nn

NORMS = {'bn': lambda c: nn.BatchNorm2d(c), 'gn': lambda c: nn.GroupNorm(32, c)}


class ConvModule(nn.Module):
    """conv -> norm ('bn' or 'gn', stored under that name) -> ReLU; by default the conv has a bias only
    without a norm (`bias` says otherwise, as some published heads do)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        norm: str = 'bn',
        act: bool = True,
        dilation: int = 1,
        groups: int = 1,
        stride: int = 1,
        bias: bool = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=norm is None if bias is None else bias,
        )
        self.norm_name = norm
        if norm is not None:
            self.add_module(norm, NORMS[norm](out_channels))
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return self.act(x)


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise k x k ConvModule then pointwise 1x1 ConvModule, both with norm and ReLU (mmcv naming)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, norm: str = 'bn'):
        super().__init__()
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, norm, dilation=dilation, groups=in_channels
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, norm)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


def resize(x, size):
    """Bilinear resize with align_corners=False, the convention of every head here."""
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)
