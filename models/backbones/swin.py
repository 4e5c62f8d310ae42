"""Swin Transformer (Liu et al. 2021) as mmseg's `SwinTransformer` runs it, built from timm's parts.

timm's window attention (relative-position bias, qkv split, scale before q·kᵀ), MLP, patch
embedding and patch merging are used as they are. The block's window step is mmseg's, not timm's:
the normalised tokens are zero-padded to a multiple of the window *before* the cyclic shift, the
shift mask (-100 between regions) is built on the padded size, padded tokens are not masked, and
windows are never shrunk to small maps. timm shifts first, then pads, and clamps the window to the
map, which changes every stage at sizes that are not multiples of 7·stride.

Each stage's output is its tokens before the patch merging, through a LayerNorm (`norms.{i}`,
mmseg's `norm{i}`), as NCHW maps at strides 4/8/16/32.
"""

import re
from typing import NamedTuple

import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformerBlock,
    get_relative_position_index,
    window_partition,
    window_reverse,
)
from torch import nn

from ..weights import CheckpointError
from .variants import lookup


class PaddedSwinBlock(SwinTransformerBlock):
    """timm's Swin block, (B, H, W, C) -> (B, H, W, C), with mmseg's pad-then-shift window attention."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, drop_path: float):
        super().__init__(
            dim,
            input_resolution=None,
            num_heads=num_heads,
            window_size=window_size,
            shift_size=window_size // 2 if shift else 0,
            always_partition=True,
            dynamic_mask=True,
            drop_path=drop_path,
        )

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = nn.functional.pad(x, (0, 0, 0, -width % win_w, 0, -height % win_h))
        padded_h, padded_w = x.shape[1:3]
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=self.get_attn_mask(x))  # mask regions of the padded map
        x = window_reverse(windows.view(-1, win_h, win_w, channels), self.window_size, padded_h, padded_w)
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width].contiguous()


class SwinStage(nn.Module):
    """`depth` blocks (odd ones shifted by half a window), then an optional 2x2 patch merging.

    (B, H, W, C) -> (stage output (B, H, W, C), input of the next stage (B, H/2, W/2, 2C))."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_paths: list, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            PaddedSwinBlock(dim, num_heads, window_size, i % 2 == 1, drop_paths[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple:
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else None)


class Swin(nn.Module):
    """Swin-T/S/B/L feature extractor: (B, 3, H, W) -> four maps with `out_channels` at `strides`.

    Any input size works: the patch embedding pads to a multiple of 4, every block to a multiple of
    the window, patch merging to even sizes (all at the bottom/right), as in mmseg. The published
    Mask2Former configs train with drop_path_rate 0.3, spread linearly over the blocks.
    """

    checkpoint_blocks = (PaddedSwinBlock,)  # backbone.with_cp (models/activation_checkpointing.py)

    def __init__(self, variant: str = 'tiny', window_size: int = 7, drop_path_rate: float = 0.3):
        super().__init__()
        embed_dim, depths, heads = lookup('Swin', VARIANTS, variant)
        self.out_channels = [embed_dim * 2**i for i in range(4)]
        self.strides = [4, 8, 16, 32]
        self.patch_embed = PatchEmbed(
            None,
            patch_size=4,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt='NHWC',
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            SwinStage(width, depth, num_heads, window_size, drop_paths[start : start + depth], i < 3)
            for i, (width, depth, num_heads, start) in enumerate(zip(self.out_channels, depths, heads, starts))
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) for width in self.out_channels)

    def forward(self, x: torch.Tensor) -> list:
        x = self.patch_embed(x)
        features = []
        for stage, norm in zip(self.stages, self.norms):
            out, x = stage(x)
            features.append(norm(out).permute(0, 3, 1, 2).contiguous())
        return features

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """mmseg/mmdet Swin keys (the released Mask2Former backbones) or the official ImageNet files
        (`swin_tiny_patch4_window7_224.pth`, keys `layers.*`) -> ours.

        mmseg's patch merging gathers each 2x2 neighbourhood with `nn.Unfold` (channel c·4 + di·2 + dj),
        the original and timm concatenate the four patches ((dj·2 + di)·C + c): mmseg's merging norm
        and reduction columns are reordered. `relative_position_index` buffers are checked against the
        original index and dropped (ours are built), as are the official file's `attn_mask` buffers,
        final `norm` and classifier; output norms it lacks start as a fresh LayerNorm.
        """
        mmseg = any('.w_msa.' in key for key in state)
        converted = {}
        for key, value in state.items():
            if key.endswith('relative_position_index'):
                window = round(value.shape[0] ** 0.5)
                if not torch.equal(value, get_relative_position_index(window, window)):
                    raise CheckpointError(f'{key}: not the Swin relative-position index of a {window}x{window} window')
                continue
            if key.startswith(('head.', 'norm.')) or key.endswith('attn_mask'):
                continue
            for pattern, replacement in RENAMES:
                key = re.sub(pattern, replacement, key)
            if mmseg and '.downsample.' in key:
                value = value[..., unfold_to_concat_order(value.shape[-1] // 4)]
            converted[key] = value
        if 'patch_embed.proj.bias' in converted:
            embed_dim = converted['patch_embed.proj.bias'].shape[0]
            for i in range(4):
                converted.setdefault(f'norms.{i}.weight', torch.ones(embed_dim * 2**i))
                converted.setdefault(f'norms.{i}.bias', torch.zeros(embed_dim * 2**i))
        return converted


def unfold_to_concat_order(channels: int) -> torch.Tensor:
    """Index i of the concat order ((dj·2 + di)·C + c) -> its position in Unfold's order (c·4 + di·2 + dj)."""
    patch, c = torch.arange(4 * channels).div(channels, rounding_mode='floor'), torch.arange(4 * channels) % channels
    dj, di = patch // 2, patch % 2
    return c * 4 + di * 2 + dj


RENAMES = [  # applied in order; our keys match none of them
    (r'^patch_embed\.projection\.', 'patch_embed.proj.'),  # mmseg
    (r'\.attn\.w_msa\.', '.attn.'),
    (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
    (r'\.ffn\.layers\.1\.', '.mlp.fc2.'),
    (r'^norm(\d)\.', r'norms.\1.'),
    (r'^layers\.(\d+)\.', r'stages.\1.'),  # official ImageNet files
]


class Variant(NamedTuple):
    embed_dim: int  # channels of stage 0 (doubled at each stage)
    depths: tuple  # blocks per stage
    num_heads: tuple  # attention heads per stage


VARIANTS = {  # window 7 (ImageNet-1k/22k 224 weights)
    'tiny': Variant(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': Variant(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': Variant(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'large': Variant(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    'test': Variant(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),  # for tests only
}
