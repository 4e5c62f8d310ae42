"""EfficientFormerV2 (Li et al., ICCV 2023), the segmentation variant OffSeg uses: 4 maps at strides 4/8/16/32.

A 4-D (NCHW) hybrid: a conv stem, four stages of conv-MLP blocks, multi-head attention in the last
`vit_num` blocks of stages 2 and 3, and an attention downsampler between them. All norms are
BatchNorm2d, all activations GELU. Keys are the published ones (`patch_embed.*`, `network.{0..6}.*`).

Attention biases. Each attention carries a learned per-head table indexed by the (|dy|, |dx|)
offset between query and key tokens, sized for a `resolution` x `resolution` input (512 as
published). Every forward gathers the (heads, Nq, Nk) bias for that grid and resizes the flattened
token x token matrix bicubically (align_corners=False) to the actual (Nq, Nk), as the published
code does; at the table's own size (a 512 x 512 input) that resize is an exact identity and is
skipped. Outside autograd (eval under no_grad / inference_mode) each attention keeps the bias of
the last size it saw, keyed by that size and by the table's storage and version counter, so
weights loaded at any time (even after `.eval()`) take effect at once; the published code caches
the gathered bias on `.eval()` and must be loaded before it. The gather and resize on every call
would otherwise take a share of each forward that grows with the input (timed by benchmarks/offseg_speed.py).

Memory order. Outside autograd the stem and the two conv-only stages (strides 4 and 8) run
channels_last, and the stage outputs are handed on in NCHW: their depthwise 3x3 convs are faster
on NHWC maps with oneDNN on CPU, while the attention stages are faster in NCHW (`CHANNELS_LAST_LAYERS`;
the split is timed on the S1 backbone by benchmarks/offseg_speed.py). GELU runs on the NHWC view of
a channels_last map (`GELU`). Training keeps NCHW throughout.

Input sizes: the stride-2 attention of stage 2 halves the stride-16 grid and doubles it back, so
ceil(H/16) and ceil(W/16) must be even (any multiple of 32 works); other sizes raise a ValueError.
"""

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..errors import InputSizeError
from .variants import lookup

NUM_HEADS = 8
CHANNELS_LAST_LAYERS = 4
"""The stem and `network[:CHANNELS_LAST_LAYERS]` (the stride-4 and stride-8 stages and their
downsamplers) run channels_last outside autograd; 0 keeps every layer NCHW."""


class GELU(nn.GELU):
    """nn.GELU that keeps its speed on channels_last maps: PyTorch's CPU kernel is slower on an
    (N, C, H, W) tensor stored NHWC than on a contiguous one (2.14), so it runs on the NHWC view
    (benchmarks/offseg_speed.py times it as part of the channels_last stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (with bias) then BN, stored as `.0` / `.1` like the published nn.Sequential."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups),
        nn.BatchNorm2d(out_channels),
    )


def relative_bias_index(q_size: int, k_size: int, q_stride: int = 1) -> torch.Tensor:
    """(q_size², k_size²) index into a bias table of k_size² entries, one per (|dy|, |dx|) offset.

    Query (a, b) on a q_size grid sits at (q_stride·a, q_stride·b) of the k_size key grid; the
    offset (dy, dx) gets entry dy·k_size + dx. That is the order in which the published code first
    meets each offset, so the index equals its `attention_bias_idxs_seg` buffers.
    """
    d = (torch.arange(q_size)[:, None] * q_stride - torch.arange(k_size)[None, :]).abs()  # (q, k) per axis
    return (d[:, None, :, None] * k_size + d[None, :, None, :]).reshape(q_size**2, k_size**2)


def resized_bias(table: torch.Tensor, index: torch.Tensor, size: tuple) -> torch.Tensor:
    """(1, heads, Nq, Nk) attention bias: gather the table, then resize the token x token matrix
    bicubically; at the index's own size the resize is the identity (exactly) and is skipped, except
    in a trace (an ONNX export), whose graph must resize for every other input size."""
    bias = table[:, index].unsqueeze(0)
    if bias.shape[-2:] == size and not torch.jit.is_tracing():
        return bias
    return F.interpolate(bias, size=size, mode='bicubic', align_corners=False)


class BiasCache:
    """The attention bias of the last size asked for, reused while the table is unchanged.

    Used only outside autograd and outside tracing or compilation (there the bias is recomputed, so
    gradients flow and graphs hold the computation), and not for tables made under inference_mode
    (they have no version counter). The key holds the table's storage, version
    counter (bumped by every in-place write: load_state_dict, optimizer steps, EMA updates; writes
    through `.data` bypass it), dtype and device.
    """

    def __init__(self):
        self.key, self.bias = None, None

    def get(self, table: torch.Tensor, index: torch.Tensor, size: tuple) -> torch.Tensor:
        if torch.is_grad_enabled() or table.is_inference() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return resized_bias(table, index, size)
        key = (tuple(size), table.data_ptr(), table._version, table.dtype, table.device)
        if key != self.key:
            self.key, self.bias = key, resized_bias(table, index, size)
        return self.bias


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor) -> torch.Tensor:
    """scale · q·k + bias as one batched GEMM: q (B, heads, Nq, c), k (B, heads, c, Nk), bias (1, heads, Nq, Nk).

    The scaling and the bias add ride along with the product instead of two more passes over the
    (B, heads, Nq, Nk) logits, which dominate memory traffic at large inputs (benchmarks/offseg_speed.py).
    """
    b, heads, nq, c = q.shape
    bias = bias.expand(b, -1, -1, -1).reshape(b * heads, nq, -1)
    return torch.baddbmm(bias, q.reshape(b * heads, nq, c), k.reshape(b * heads, c, -1), alpha=scale).view(
        b, heads, nq, -1
    )


LOGITS_PER_CHUNK = 2**20


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor, normalize
) -> torch.Tensor:
    """The attention output channel-major, (v · normalize(scale · q·k + bias)ᵀ): (B, heads, c_v, Nq)
    from q (B, heads, Nq, c), k (B, heads, c, Nk), v (B, heads, c_v, Nk), a block of query rows at a time.

    Channel-major, v is the conv's output as it is and the result reshapes to NCHW for free: no
    transposed copies of the widest maps of the backbone. Each block holds about LOGITS_PER_CHUNK
    logits (4 MB in float32), so they stay in cache from the product through `normalize` (the
    softmax, with or without talking heads) to the product with v, instead of the full (B, heads,
    Nq, Nk) logits making three trips through memory (timed on the S1 backbone by
    benchmarks/offseg_speed.py). Rows are independent, so the result is the same. Only without
    autograd: a training step is no faster in blocks, and traced graphs (ONNX export) keep one block
    since their shapes may change after export.
    """
    b, heads, nq, _ = q.shape
    rows = max(1, LOGITS_PER_CHUNK // (b * heads * k.shape[-1]))
    if rows >= nq or torch.is_grad_enabled() or torch.jit.is_tracing():
        return v @ normalize(attention_logits(q, k, scale, bias)).transpose(2, 3)
    blocks = [
        v @ normalize(attention_logits(q[:, :, i : i + rows], k, scale, bias[:, :, i : i + rows])).transpose(2, 3)
        for i in range(0, nq, rows)
    ]
    return torch.cat(blocks, dim=3)


def split_heads(x: torch.Tensor, channels_per_head: int) -> torch.Tensor:
    """(B, heads·c, H, W) -> (B, heads, c, H·W); channel = head·c + j, as published."""
    return x.reshape(x.shape[0], NUM_HEADS, channels_per_head, -1)


class Mlp(nn.Module):
    """1x1 conv + BN + GELU, depthwise 3x3 + BN + GELU, 1x1 conv + BN (the published `Mlp(mid_conv=True)`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.mid_norm = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.act = GELU()
        for conv in (self.fc1, self.fc2):  # published init; `mid` keeps PyTorch's default
            nn.init.trunc_normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.mid_norm(self.mid(x)))
        return self.norm2(self.fc2(x))


class Attention4D(nn.Module):
    """Multi-head attention on NCHW maps with talking heads and a local value conv.

    q, k: 1x1 conv + BN to 8 heads x 32; v: 1x1 conv + BN to 8 x 128, plus `v_local`, a depthwise
    3x3 conv + BN of v added to the attention output. Logits (q·k)/√32 + resized bias are mixed
    across heads before the softmax (`talking_head1`) and after it (`talking_head2`, so rows need not
    sum to 1). With `stride` 2 (stage 2) the block attends on a depthwise-strided grid and upsamples
    the result bilinearly. `proj` = GELU -> 1x1 conv + BN. `table_size` is the side of the token grid
    the bias table is sized for.
    """

    def __init__(self, dim: int, table_size: int, stride: int = 1, key_dim: int = 32, attn_ratio: int = 4):
        super().__init__()
        self.key_dim, self.value_dim = key_dim, attn_ratio * key_dim
        self.scale = key_dim**-0.5
        qk, values = NUM_HEADS * key_dim, NUM_HEADS * self.value_dim
        self.stride_conv = conv_bn(dim, dim, 3, stride=2, groups=dim) if stride == 2 else None
        self.q = conv_bn(dim, qk)
        self.k = conv_bn(dim, qk)
        self.v = conv_bn(dim, values)
        self.v_local = conv_bn(values, values, 3, groups=values)
        self.talking_head1 = nn.Conv2d(NUM_HEADS, NUM_HEADS, 1)
        self.talking_head2 = nn.Conv2d(NUM_HEADS, NUM_HEADS, 1)
        self.proj = nn.Sequential(GELU(), *conv_bn(values, dim))
        self.attention_biases_seg = nn.Parameter(torch.zeros(NUM_HEADS, table_size**2))
        self.register_buffer('attention_bias_idxs_seg', relative_bias_index(table_size, table_size), persistent=False)
        self.bias_cache = BiasCache()

    def talking_heads(self, logits: torch.Tensor) -> torch.Tensor:
        """Heads mixed before and after the softmax (each logit mixed across heads at its position)."""
        return self.talking_head2(self.talking_head1(logits).softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        b, _, h, w = x.shape
        q = split_heads(self.q(x), self.key_dim).transpose(2, 3)  # (B, heads, N, 32)
        k = split_heads(self.k(x), self.key_dim)  # (B, heads, 32, N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = split_heads(v, self.value_dim)  # (B, heads, 128, N)
        bias = self.bias_cache.get(self.attention_biases_seg, self.attention_bias_idxs_seg, (q.shape[2], k.shape[3]))
        out = attend(q, k, v, self.scale, bias, self.talking_heads).reshape(b, -1, h, w) + v_local
        return self.proj(out) if self.stride_conv is None else self.upsample_and_project(out)

    def upsample_and_project(self, out: torch.Tensor) -> torch.Tensor:
        """proj(out upsampled x2 bilinearly), computed channels_last and returned NCHW: on these
        many-channel, few-pixel maps PyTorch's NCHW bilinear resize makes a slow layout copy of its
        own (timed on the S1 backbone by benchmarks/offseg_speed.py)."""
        out = out.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(out, scale_factor=2, mode='bilinear', align_corners=False)
        return self.proj(out).contiguous()


class LGQuery(nn.Module):
    """Local-global query of the attention downsampler: depthwise 3x3 stride-2 conv (no BN) plus
    stride-2 subsampling (`AvgPool2d(1, 2)`), then 1x1 conv + BN."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.local = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim))
        self.pool = nn.AvgPool2d(1, 2)
        self.proj = conv_bn(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + self.pool(x))


class Attention4DDownsample(nn.Module):
    """Stride-2 attention from `dim` to `out_dim` channels: queries on the halved grid attend to all keys.

    8 heads x 16 (q, k), x 64 (v); plain softmax (no talking heads), + resized bias, + `v_local`
    (depthwise 3x3 stride-2 conv + BN of v), then GELU -> 1x1 conv + BN. `table_size` is the side
    of the key grid the bias table is sized for.
    """

    def __init__(self, dim: int, out_dim: int, table_size: int, key_dim: int = 16, attn_ratio: int = 4):
        super().__init__()
        self.key_dim, self.value_dim = key_dim, attn_ratio * key_dim
        self.scale = key_dim**-0.5
        qk, values = NUM_HEADS * key_dim, NUM_HEADS * self.value_dim
        self.q = LGQuery(dim, qk)
        self.k = conv_bn(dim, qk)
        self.v = conv_bn(dim, values)
        self.v_local = conv_bn(values, values, 3, stride=2, groups=values)
        self.proj = nn.Sequential(GELU(), *conv_bn(values, out_dim))
        q_size = math.ceil(table_size / 2)
        self.attention_biases_seg = nn.Parameter(torch.zeros(NUM_HEADS, table_size**2))
        self.register_buffer(
            'attention_bias_idxs_seg',
            relative_bias_index(q_size, table_size, math.ceil(table_size / q_size)),
            persistent=False,
        )
        self.bias_cache = BiasCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        b, _, h, w = q.shape
        q = split_heads(q, self.key_dim).transpose(2, 3)  # (B, heads, N/4, 16)
        k = split_heads(self.k(x), self.key_dim)  # (B, heads, 16, N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = split_heads(v, self.value_dim)  # (B, heads, 64, N)
        bias = self.bias_cache.get(self.attention_biases_seg, self.attention_bias_idxs_seg, (q.shape[2], k.shape[3]))
        out = attend(q, k, v, self.scale, bias, functools.partial(torch.softmax, dim=-1)).reshape(b, -1, h, w)
        out = out + v_local
        return self.proj(out)


class FFN(nn.Module):
    """x + drop_path(layer_scale_2 · Mlp(x)); layer scale starts at 1e-5."""

    def __init__(self, dim: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), 1e-5))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class AttnFFN(FFN):
    """An FFN block preceded by x + drop_path(layer_scale_1 · Attention4D(x))."""

    def __init__(self, dim: int, mlp_ratio: int, drop_path: float, table_size: int, stride: int):
        super().__init__(dim, mlp_ratio, drop_path)
        self.token_mixer = Attention4D(dim, table_size, stride)
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.drop_path(self.layer_scale_1 * self.token_mixer(x)))


class Embedding(nn.Module):
    """Downsampler between stages 0-1 and 1-2: 3x3 stride-2 conv (`proj`) + BN (`norm`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class AttentionEmbedding(nn.Module):
    """Downsampler between stages 2-3: Attention4DDownsample(x) + BN(3x3 stride-2 conv(x))."""

    def __init__(self, dim: int, out_dim: int, table_size: int):
        super().__init__()
        self.attn = Attention4DDownsample(dim, out_dim, table_size)
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) + self.bn(self.conv(x))


class EfficientFormerV2(nn.Module):
    """EfficientFormerV2 feature extractor: (B, 3, H, W) -> 4 maps at strides 4/8/16/32.

    `network` holds [stage0, down1, stage1, down2, stage2, down3, stage3]; the features are the
    stage outputs, without extra norms. `resolution` sizes the attention-bias tables (512 for the
    published weights). `drop_path_rate` None takes the published rate of the variant.
    """

    checkpoint_blocks = (FFN,)  # backbone.with_cp (models/activation_checkpointing.py)

    def __init__(
        self,
        variant: str = 's1',
        drop_path_rate: float | None = None,
        resolution: int = 512,
    ):
        super().__init__()
        widths, ratios, vit_num, published_rate = lookup('EfficientFormerV2', VARIANTS, variant)
        drop_path_rate = published_rate if drop_path_rate is None else drop_path_rate
        self.out_channels = list(widths)
        self.strides = [4, 8, 16, 32]
        self.patch_embed = nn.Sequential(
            *conv_bn(3, widths[0] // 2, 3, stride=2),
            GELU(),
            *conv_bn(widths[0] // 2, widths[0], 3, stride=2),
            GELU(),
        )
        total = sum(len(r) for r in ratios)
        network, index = [], 0
        for i, (dim, stage_ratios) in enumerate(zip(widths, ratios)):
            grid = math.ceil(resolution / 2 ** (i + 2))  # token grid side at `resolution`
            blocks = []
            for j, ratio in enumerate(stage_ratios):
                rate = drop_path_rate * index / (total - 1)
                index += 1
                if i >= 2 and j >= len(stage_ratios) - vit_num:
                    stride = 2 if i == 2 else 1
                    blocks.append(AttnFFN(dim, ratio, rate, math.ceil(grid / stride), stride))
                else:
                    blocks.append(FFN(dim, ratio, rate))
            network.append(nn.Sequential(*blocks))
            if i == 2:
                network.append(AttentionEmbedding(dim, widths[3], grid))
            elif i < 2:
                network.append(Embedding(dim, widths[i + 1]))
        self.network = nn.ModuleList(network)

    def forward(self, x: torch.Tensor) -> list:
        h, w = x.shape[-2:]
        if math.ceil(h / 16) % 2 or math.ceil(w / 16) % 2:
            raise InputSizeError(
                f'EfficientFormerV2 needs ceil(H/16) and ceil(W/16) even (e.g. sides that are '
                f'multiples of 32); got an input of {h}x{w} (at test time, eval.size_divisor: 32 pads to that)'
            )
        channels_last = not torch.is_grad_enabled() and CHANNELS_LAST_LAYERS > 0
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        features = []
        for i, layer in enumerate(self.network):
            if i == CHANNELS_LAST_LAYERS:
                x = x.contiguous()
            if i % 2:
                x = layer(x)
                continue
            x = layer(x)
            features.append(x.contiguous())
        return features

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """Published weights -> ours: OffSeg `backbone.*` (prefix stripped) or snap-research `eformer_*_450.pth`.

        Our keys are the published ones; the map only drops keys:
        * `attention_biases` / `attention_bias_idxs`: the ImageNet leftovers. The segmentation model
          never uses them; in ImageNet files they hold the classification biases, which OffSeg discards
          (its `attention_biases_seg` start at zero).
        * `attention_bias_idxs_seg`: recomputed here; a stored copy is checked against the recomputed
          index and a mismatch raises ValueError (a table layout we do not implement).
        * ImageNet classifier `head.*`, `dist_head.*` and its final `norm.*`.
        """
        converted = {}
        for key, value in state.items():
            if key.startswith(('head.', 'dist_head.', 'norm.')) or key.endswith(
                ('.attention_biases', '.attention_bias_idxs')
            ):
                continue
            if key.endswith('.attention_bias_idxs_seg'):
                q_size, k_size = (math.isqrt(n) for n in value.shape)
                expected = relative_bias_index(q_size, k_size, math.ceil(k_size / q_size))
                if not torch.equal(value.cpu(), expected):
                    raise ValueError(
                        f'{key}: attention bias index differs from the (|dy|, |dx|) layout '
                        f'of a {q_size}x{q_size} query / {k_size}x{k_size} key grid'
                    )
                continue
            converted[key] = value
        return converted


class Variant(NamedTuple):
    widths: tuple  # channels per stage
    mlp_ratios: tuple  # MLP expansion of every block, per stage
    vit_num: int  # attention blocks at the end of stages 2 and 3
    drop_path_rate: float  # the published rate


VARIANTS = {
    's0': Variant((32, 48, 96, 176), ((4,) * 2, (4,) * 2, (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)), 2, 0.0),
    's1': Variant((32, 48, 120, 224), ((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)), 2, 0.0),
    's2': Variant(
        (32, 64, 144, 288),
        ((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
        4,
        0.02,
    ),
    'l': Variant(
        (40, 80, 192, 384),
        ((4,) * 5, (4,) * 5, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)),
        6,
        0.1,
    ),
    'test': Variant((16, 24, 32, 48), ((4,), (4,), (4, 4), (4, 4)), 1, 0.0),  # for tests only
}
