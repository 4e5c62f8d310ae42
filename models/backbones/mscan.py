"""MSCAN, the SegNeXt backbone (Guo et al., NeurIPS 2022), returning 4 maps at strides 4/8/16/32.

A convolutional backbone with a transformer's shape: each stage downsamples, then runs MSCA blocks
(BN -> spatial attention, BN -> conv MLP, each with layer scale and stochastic depth), then a
LayerNorm over channels. The attention is multi-scale convolutional attention (MSCA): depthwise
5x5 plus strip convolutions 1xk/kx1 (k = 7, 11, 21), mixed by a 1x1 conv, gating the input.

Everything runs NCHW; the published code passes (B, N, C) tokens between blocks, which only
changes the layout, since all but the stage LayerNorms are convs or BN. Norms are plain
BatchNorm2d: convert with `nn.SyncBatchNorm.convert_sync_batchnorm` under DDP for the official
SyncBN behaviour. Keys are mmseg 1.x's (`mlp.dwconv.weight`); the official ImageNet weights nest
that conv once more (`mlp.dwconv.dwconv.weight`), which `convert_checkpoint` undoes.
"""

import math
from typing import NamedTuple

import torch
from timm.layers import DropPath
from torch import nn

from .variants import lookup


def depthwise_conv(dim: int, kernel: tuple) -> nn.Conv2d:
    """A 'same'-padded depthwise conv with bias; kernels have odd sides."""
    return nn.Conv2d(dim, dim, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=dim)


class StemConv(nn.Module):
    """Stage-1 embed: two 3x3 stride-2 convs (3 -> C/2 -> C) with BN, GELU between: stride 4."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels // 2),
            nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchEmbed(nn.Module):
    """Stage 2-4 embed ("OverlapPatchEmbed"): 3x3 stride-2 conv then BN, halving the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MSCA(nn.Module):
    """Multi-scale convolutional attention: the sum of a 5x5 and three strip-conv branches, mixed
    by a 1x1 conv, multiplies the input. No softmax or sigmoid: the gate is linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = depthwise_conv(dim, (5, 5))
        self.conv0_1, self.conv0_2 = depthwise_conv(dim, (1, 7)), depthwise_conv(dim, (7, 1))
        self.conv1_1, self.conv1_2 = depthwise_conv(dim, (1, 11)), depthwise_conv(dim, (11, 1))
        self.conv2_1, self.conv2_2 = depthwise_conv(dim, (1, 21)), depthwise_conv(dim, (21, 1))
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a = self.conv0(u)
        a = a + self.conv0_2(self.conv0_1(a)) + self.conv1_2(self.conv1_1(a)) + self.conv2_2(self.conv2_1(a))
        return self.conv3(a) * u


class SpatialAttention(nn.Module):
    """1x1 conv -> GELU -> MSCA -> 1x1 conv, plus its own residual around the whole path."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MSCA(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class Mlp(nn.Module):
    """1x1 conv -> depthwise 3x3 conv -> GELU -> 1x1 conv, all NCHW (the published dropout is 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = depthwise_conv(hidden, (3, 3))
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class MSCABlock(nn.Module):
    """x + DropPath(ls1 * attn(BN1(x))), then x + DropPath(ls2 * mlp(BN2(x)))."""

    def __init__(self, dim: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), 1e-2))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), 1e-2))

    def branch(self, layer: nn.Module, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(scale[:, None, None] * layer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.branch(self.attn, self.layer_scale_1, self.norm1(x))
        return x + self.branch(self.mlp, self.layer_scale_2, self.norm2(x))


class MSCAN(nn.Module):
    """MSCAN feature extractor with the published module and key names.

    Per stage i (1..4): `patch_embed{i}` (StemConv for i = 1), `block{i}` (a ModuleList of
    MSCABlock), `norm{i}` (LayerNorm over channels, eps 1e-5).
    """

    checkpoint_blocks = (SpatialAttention, Mlp)  # a block's branches: its BatchNorms stay outside

    def __init__(self, variant: str = 't', drop_path_rate: float | None = None):
        super().__init__()
        dims, depths, published_rate = lookup('MSCAN', VARIANTS, variant)
        rate = published_rate if drop_path_rate is None else drop_path_rate
        # linear stochastic-depth ramp over all blocks; on the CPU so that it also works under a meta device
        rates = torch.linspace(0, rate, sum(depths), device='cpu').tolist()
        for i, (dim, depth, mlp_ratio) in enumerate(zip(dims, depths, MLP_RATIOS)):
            first = sum(depths[:i])
            setattr(self, f'patch_embed{i + 1}', StemConv(3, dim) if i == 0 else PatchEmbed(dims[i - 1], dim))
            setattr(
                self, f'block{i + 1}', nn.ModuleList(MSCABlock(dim, mlp_ratio, r) for r in rates[first : first + depth])
            )
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim))
        self.out_channels = list(dims)
        self.strides = [4, 8, 16, 32]
        self.init_weights()

    def init_weights(self) -> None:
        """The published init without a checkpoint: convs N(0, sqrt(2 / fan_out)) with
        fan_out = kh * kw * out / groups, zero bias; norms and layer scales keep their init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list:
        features = []
        for i in range(1, 5):
            x = getattr(self, f'patch_embed{i}')(x)
            for block in getattr(self, f'block{i}'):
                x = block(x)
            x = getattr(self, f'norm{i}')(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            features.append(x)
        return features

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """Official SegNeXt ImageNet (`mscan_*.pth`) or mmseg 1.x MSCAN weights -> ours.

        The official MLP depthwise conv is nested (`mlp.dwconv.dwconv.*`); mmseg 1.x and we use
        `mlp.dwconv.*`. The ImageNet classifier `head.*` is dropped. Every other key is already ours.
        """
        return {
            key.replace('.mlp.dwconv.dwconv.', '.mlp.dwconv.'): value
            for key, value in state.items()
            if not key.startswith('head.')
        }


MLP_RATIOS = (8, 8, 4, 4)
"""MLP expansion per stage, the same for every variant."""


class Variant(NamedTuple):
    dims: tuple  # embed dims = channels per stage
    depths: tuple  # blocks per stage
    drop_path_rate: float  # the published rate


VARIANTS = {
    't': Variant(dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), drop_path_rate=0.1),
    's': Variant(dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), drop_path_rate=0.1),
    'b': Variant(dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), drop_path_rate=0.1),
    'l': Variant(dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), drop_path_rate=0.3),
    'test': Variant(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), drop_path_rate=0.0),  # for tests only
}
