"""What the DINOv2 and DINOv3 vision transformers share as segmentation backbones.

A ViT gives one map at its patch stride p per block. `out_indices` chooses four blocks (0-based;
default evenly spaced, 2/5/8/11 of 12 as DINOv3's segmentation evaluation takes them); each output
goes through the model's final LayerNorm, as the official `get_intermediate_layers(norm=True)` gives
dense features, and loses its class and register tokens. With `pyramid` (the default) a simple feature
pyramid makes the four maps strides p/4, p/2, p and 2p, so every head pairs with a ViT: mmseg's
`Feature2Pyramid`, ViTDet's design at full width (two transposed convs with BatchNorm and GELU between
them up x4, one up x2, the map itself, max pooling down x2). Without it the four maps stay at stride
p, for the linear probing head.

Input sides must be multiples of p, and of 2p with the pyramid, whose pooled map halves the patch
grid: an InputSizeError otherwise, which the config check reports when the config is read (at test
time `eval.size_divisor` pads to that).

A head that runs the last blocks itself (EoMT, with its queries among the tokens) takes them over with
`hand_over_blocks(n)`: the backbone then stops before them and returns `HandedOver` (the tokens, the
blocks, the final norm) instead of maps. The blocks' weights stay the backbone's.
"""

import contextlib
import functools
import re
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import InputSizeError


class FeaturePyramid(nn.Module):
    """Four maps of one stride s -> strides s/4, s/2, s, 2s (mmseg `Feature2Pyramid` keys)."""

    def __init__(self, channels: int):
        super().__init__()
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, 2),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, 2, 2),
        )
        self.upsample_2x = nn.ConvTranspose2d(channels, channels, 2, 2)
        self.maxpool = nn.MaxPool2d(2, 2)

    def forward(self, maps: list) -> list:
        return [self.upsample_4x(maps[0]), self.upsample_2x(maps[1]), maps[2], self.maxpool(maps[3])]


class HandedOver(NamedTuple):
    """A ViT's tokens before its last blocks, and those blocks, for a head that runs them (EoMT)."""

    tokens: torch.Tensor  # (B, prefix + h·w, C): the class and register tokens, then the patches
    grid: tuple  # (h, w), the patch grid
    prefix: int  # how many class and register tokens lead
    blocks: list  # the last blocks, in order: block(tokens, attention_mask=None) -> tokens
    final_norm: Callable  # the backbone's final LayerNorm, which its outputs go through


class VisionTransformer(nn.Module):
    """What the DINO ViTs share: the chosen blocks' normed patch maps, and the pyramid. A family gives
    its transformers model (`vit`), `embed(x)` (the tokens and the keyword arguments its blocks take),
    `layers` (the blocks), `prefix` (class and register tokens) and `final_norm(tokens)`."""

    pretrained_part = 'vit'  # what `backbone.frozen` freezes: the pyramid is new and trains

    def __init__(self, vit: nn.Module, width: int, depth: int, patch_size: int, out_indices, pyramid: bool):
        super().__init__()
        self.vit = vit
        self.vit.embeddings.mask_token = None  # only for masked-image pre-training: never trained here
        self.out_indices = evenly_spaced(depth) if out_indices is None else list(out_indices)
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f'out_indices must be four block indices in 0..{depth - 1}; got {self.out_indices}')
        self.patch_size = patch_size
        self.pyramid = FeaturePyramid(width) if pyramid else None
        self.size_multiple = patch_size * (2 if pyramid else 1)  # the pyramid halves the patch grid
        self.out_channels = [width] * 4
        self.decay_layers = depth
        self.strides = [patch_size / 4, patch_size / 2, patch_size, patch_size * 2] if pyramid else [patch_size] * 4
        self.handed_over = 0

    def hand_over_blocks(self, count: int) -> None:
        """Stop before the last `count` blocks and return them with the tokens (`HandedOver`): for a head
        that runs them itself. The maps and the pyramid are not made any more."""
        if not 0 < count < len(self.layers):
            raise ValueError(f'a head can take over 1 to {len(self.layers) - 1} of its blocks; got {count}')
        self.handed_over = count
        self.pyramid = None
        self.size_multiple = self.patch_size
        self.strides = [self.patch_size] * 4

    def blocks(self, x: torch.Tensor):
        """Every block's tokens, in order."""
        tokens, options = self.embed(x)
        for layer in self.layers:
            tokens = layer(tokens, **options)
            yield tokens

    @property
    def checkpoint_blocks(self) -> tuple:
        """backbone.with_cp (models/activation_checkpointing.py): the family's transformer block."""
        return (type(self.layers[0]),)

    def layer_id(self, name: str, num_layers: int) -> int:
        """Layer-wise learning-rate decay (BEiT, DINOv2 fine-tuning): the embeddings are layer 0, block i
        is layer i + 1, the final norm and the pyramid come after the blocks."""
        if name.startswith('vit.embeddings.'):
            return 0
        block = re.match(r'vit\.(?:encoder|model)\.layer\.(\d+)\.', name)
        return int(block[1]) + 1 if block else num_layers + 1

    def forward(self, x: torch.Tensor) -> list:
        _, _, height, width = x.shape
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise InputSizeError(
                f'{type(self).__name__} needs sides that are multiples of {multiple} (patch size '
                f'{self.patch_size}{", pooled by 2 in the pyramid" if self.pyramid else ""}); got an input of '
                f'{height}x{width} (at test time, eval.size_divisor: {multiple} pads to that)'
            )
        grid = (height // self.patch_size, width // self.patch_size)
        if self.handed_over:
            return self.tokens_before_the_last_blocks(x, grid)
        frozen = not next(self.vit.parameters()).requires_grad
        with torch.no_grad() if frozen else contextlib.nullcontext():
            maps = self.patch_maps(x, grid)
        return self.pyramid(maps) if self.pyramid else maps

    def patch_maps(self, x: torch.Tensor, grid: tuple) -> list:
        """The `out_indices` blocks' normed patch tokens as (B, C, h, w) maps, in the order asked."""
        maps, last = [], max(self.out_indices)
        for index, tokens in enumerate(self.blocks(x)):
            if index in self.out_indices:
                patches = self.final_norm(tokens)[:, -grid[0] * grid[1] :]
                maps.append(patches.transpose(1, 2).reshape(x.shape[0], -1, *grid))
            if index == last:
                break
        return [maps[sorted(self.out_indices).index(i)] for i in self.out_indices]

    def tokens_before_the_last_blocks(self, x: torch.Tensor, grid: tuple) -> HandedOver:
        tokens, options = self.embed(x)
        kept = len(self.layers) - self.handed_over
        for layer in self.layers[:kept]:
            tokens = layer(tokens, **options)
        blocks = [functools.partial(layer, **options) for layer in self.layers[kept:]]
        return HandedOver(tokens, grid, self.prefix, blocks, self.final_norm)


def evenly_spaced(depth: int) -> list:
    """Four blocks a quarter of the depth apart, ending with the last: [2, 5, 8, 11] of 12."""
    return [depth * k // 4 - 1 for k in range(1, 5)]


def convert_vit_keys(state: dict, renames: list, layers: str, k_bias: bool) -> dict:
    """The ViT key map both DINO families share: renames in order, the blocks under `layers`, fused
    q/k/v split by rows (without a k bias where the model has none: DINOv3's is masked to zero), fused
    SwiGLU input projections split into gate and up; `mask_token` (masked-image pre-training only) and
    buffers transformers recomputes dropped."""
    converted = {}
    for key, value in state.items():
        if key.endswith(('mask_token', 'bias_mask', 'rope_embed.periods')) or key.startswith(DROPPED):
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        key = re.sub(r'^blocks\.(\d+)\.', rf'{layers}.\1.', key)
        if '.attn.qkv.' in key:
            q, k, v = value.chunk(3)
            stem, kind = key.split('.attn.qkv.')
            converted[f'{stem}.attention.q_proj.{kind}'] = q
            if k_bias or kind != 'bias':
                converted[f'{stem}.attention.k_proj.{kind}'] = k
            converted[f'{stem}.attention.v_proj.{kind}'] = v
        elif re.search(r'\.mlp\.(w12|weights_in)\.', key):
            gate, up = value.chunk(2)
            stem, kind = re.split(r'\.mlp\.(?:w12|weights_in)\.', key)
            converted[f'{stem}.mlp.gate_proj.{kind}'] = gate
            converted[f'{stem}.mlp.up_proj.{kind}'] = up
        else:
            converted[key] = value
    return converted


DROPPED = ('head.', 'classifier.', 'local_cls_norm.')
"""Classifiers of ImageNet fine-tuning, and DINOv3's local-crop class norm (pre-training only)."""
