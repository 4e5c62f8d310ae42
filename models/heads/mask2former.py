"""Mask2Former (Cheng et al. 2022) as mmseg 1.x's `Mask2FormerHead` runs it, optionally with Offset Learning.

Mask classification instead of per-pixel classification: a fixed set of learned queries each
predicts one binary mask and one class (or "no object"). The pieces, as in mmdet 3.x:

* pixel decoder (`MSDeformAttnPixelDecoder`): the stride-8/16/32 maps, projected to `channels`,
  are refined together by deformable-attention encoder layers; an FPN step adds the stride-4 map
  and gives the mask features (B, C, H/4, W/4);
* transformer decoder: layers of masked cross-attention (each query only sees the pixels its
  current mask prediction covers) -> self-attention -> FFN, round-robin over the three refined maps;
* a prediction (class logits, mask logits, the next layer's attention mask) from the initial
  queries and after every layer, all supervised in training.

With `offset_learning` (OffSeg's Mask2Former+OL) each prediction's masks come from
`OffsetLearningMask`, always applied to the original mask features, and so do the attention masks.

Eval output: the last prediction's class and mask logits (`MaskClassification`), which inference
turns into per-class scores at the size it needs (`semantic_scores`, mmseg's semantic inference).
Training output: {'cls_scores': [(B, Q, K+1)], 'mask_preds': [(B, Q, H/4, W/4)]}, one
entry per prediction point, for the set-prediction loss (`engine/mask_losses.py`).
"""

import math
import re

import torch
from timm.layers import Mlp
from torch import nn

from ..offset_learning import OffsetLearningMask
from .deformable_attention import MultiScaleDeformableAttention
from .layers import ConvModule, resize
from .mask_classification import MaskClassification

NUM_LEVELS = 3
"""The pixel decoder refines, and the decoder attends to, the stride-32/16/8 maps."""


def sine_position_encoding(height: int, width: int, channels: int, device=None) -> torch.Tensor:
    """DETR's normalised sine encoding of an unpadded grid (mmdet's `SinePositionalEncoding`,
    normalize=True): (H·W, channels), the first half encodes the row, the second the column,
    sin and cos interleaved; positions 1..n are scaled to (0, 2π]."""
    half = channels // 2
    frequencies = 10000 ** (2 * (torch.arange(half, device=device, dtype=torch.float32) // 2) / half)

    def encode(length: int) -> torch.Tensor:
        angles = torch.arange(1, length + 1, device=device, dtype=torch.float32) / (length + 1e-6) * 2 * math.pi
        angles = angles[:, None] / frequencies
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)

    rows = encode(height)[:, None].expand(height, width, half)
    cols = encode(width)[None].expand(height, width, half)
    return torch.cat([rows, cols], dim=-1).flatten(0, 1)


def reference_points(shapes: list, device=None) -> torch.Tensor:
    """Pixel centres (x, y) in [0, 1] of every level's tokens, concatenated: (1, N, levels, 2). Each
    token samples every level around its own normalised position."""
    points = []
    for height, width in shapes:
        y, x = torch.meshgrid(
            (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height,
            (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width,
            indexing='ij',
        )
        points.append(torch.stack([x.flatten(), y.flatten()], dim=-1))
    return torch.cat(points)[None, :, None].expand(-1, -1, len(shapes), -1)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels + residual, LN; FFN (ReLU) + residual, LN."""

    def __init__(self, channels: int, num_heads: int, ffn_channels: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(channels, num_heads, NUM_LEVELS, num_points=4)
        self.ffn = Mlp(channels, ffn_channels, act_layer=nn.ReLU)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(2))

    def forward(self, tokens, pos, points, shapes):
        tokens = self.norms[0](self.self_attn(tokens, pos, points, shapes))
        return self.norms[1](tokens + self.ffn(tokens))


class MSDeformAttnPixelDecoder(nn.Module):
    """4 backbone maps (strides 4/8/16/32) -> (mask features (B, C, H/4, W/4), the refined
    stride-32/16/8 maps [(B, C, h, w)], coarse to fine: the decoder's memories)."""

    def __init__(
        self, in_channels: list, channels: int = 256, num_layers: int = 6, num_heads: int = 8, ffn_channels: int = 1024
    ):
        super().__init__()
        self.input_convs = nn.ModuleList(
            ConvModule(c, channels, 1, norm='gn', act=False, bias=True) for c in reversed(in_channels[1:])
        )
        self.level_encoding = nn.Embedding(NUM_LEVELS, channels)
        self.encoder_layers = nn.ModuleList(
            DeformableEncoderLayer(channels, num_heads, ffn_channels) for _ in range(num_layers)
        )
        self.lateral_conv = ConvModule(in_channels[0], channels, 1, norm='gn', act=False)
        self.output_conv = ConvModule(channels, channels, 3, norm='gn')
        self.mask_feature = nn.Conv2d(channels, channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's init: Xavier input projections, caffe2-Xavier FPN convs, N(0, 1) level encoding,
        Xavier-normal encoder matrices, then each deformable attention's own init."""
        for module in self.input_convs:
            nn.init.xavier_uniform_(module.conv.weight)
            nn.init.zeros_(module.conv.bias)
        for conv in (self.lateral_conv.conv, self.output_conv.conv, self.mask_feature):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder_layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for layer in self.encoder_layers:
            layer.self_attn.reset_parameters()

    def forward(self, features: list) -> tuple:
        maps = [conv(f) for conv, f in zip(self.input_convs, features[:0:-1])]
        batch, channels = maps[0].shape[:2]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = torch.cat(
            [
                sine_position_encoding(h, w, channels, tokens.device) + self.level_encoding.weight[i]
                for i, (h, w) in enumerate(shapes)
            ]
        )[None]
        points = reference_points(shapes, tokens.device)
        for layer in self.encoder_layers:
            tokens = layer(tokens, pos, points, shapes)
        memories = [
            t.transpose(1, 2).reshape(batch, channels, h, w)
            for t, (h, w) in zip(tokens.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        fine = self.lateral_conv(features[0]) + resize(memories[-1], features[0].shape[-2:])
        return self.mask_feature(self.output_conv(fine)), memories


class MaskedAttentionDecoderLayer(nn.Module):
    """Post-norm, cross-attention first: masked cross-attention to one level's memory, self-attention
    among the queries, FFN (ReLU); each + residual, then LN. Positions are added to queries and keys,
    never to values."""

    def __init__(self, channels: int, num_heads: int, ffn_channels: int):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.ffn = Mlp(channels, ffn_channels, act_layer=nn.ReLU)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(3))

    def forward(self, query, query_pos, memory, memory_pos, attn_mask):
        """query (B, Q, C), memory (B, HW, C), attn_mask (B·heads, Q, HW) bool, True = not attended."""
        attended = self.cross_attn(
            query + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False
        )[0]
        query = self.norms[0](query + attended)
        with_pos = query + query_pos
        query = self.norms[1](query + self.self_attn(with_pos, with_pos, query, need_weights=False)[0])
        return self.norms[2](query + self.ffn(query))


class Mask2FormerHead(nn.Module):
    """mmseg's `Mask2FormerHead` (+ OL): the last prediction in eval, all predictions in training.

    List of 4 backbone maps -> `MaskClassification` (class logits (B, Q, K+1), mask logits
    (B, Q, H/4, W/4)) in eval mode, the predictions of every point (see the module docstring) in
    training mode.

    The published ADE20K model: channels 256, 100 queries, 9 decoder layers (3 rounds over the
    levels), 6 encoder layers, 8 heads, FFNs 1024 (encoder) and 2048 (decoder) wide. `channels`
    must be a multiple of 32 (GroupNorm) and of `num_heads`.
    """

    set_prediction_loss = True  # trained by matching queries to masks (engine/mask_losses.py), not per pixel

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        channels: int = 256,
        num_queries: int = 100,
        num_decoder_layers: int = 9,
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        encoder_ffn_channels: int = 1024,
        decoder_ffn_channels: int = 2048,
        offset_learning: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, channels, num_encoder_layers, num_heads, encoder_ffn_channels
        )
        self.decoder_layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(channels, num_heads, decoder_ffn_channels) for _ in range(num_decoder_layers)
        )
        self.post_norm = nn.LayerNorm(channels)
        self.query_feat = nn.Embedding(num_queries, channels)
        self.query_embed = nn.Embedding(num_queries, channels)
        self.level_embed = nn.Embedding(NUM_LEVELS, channels)
        self.cls_embed = nn.Linear(channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
        )
        self.offset_learning = OffsetLearningMask(channels) if offset_learning else None
        for p in self.decoder_layers.parameters():  # mmdet's init of the transformer decoder
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def forward(self, features: list):
        predictions = self.predictions(features)
        if self.training:
            return predictions
        return MaskClassification(predictions['cls_scores'][-1], predictions['mask_preds'][-1])

    def predictions(self, features: list) -> dict:
        """{'cls_scores': [(B, Q, K+1)], 'mask_preds': [(B, Q, H/4, W/4)]} of all prediction points."""
        mask_features, memories = self.pixel_decoder(features)
        batch, channels = mask_features.shape[:2]
        shapes = [tuple(m.shape[-2:]) for m in memories]
        keys = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(memories)]
        key_pos = [sine_position_encoding(h, w, channels, mask_features.device)[None] for h, w in shapes]
        # Copies, not views, of the embeddings: under no_grad a view of a parameter trips FlopCounterMode.
        query = self.query_feat.weight.repeat(batch, 1, 1)
        query_pos = self.query_embed.weight.repeat(batch, 1, 1)
        cls_score, mask_pred, attn_mask = self.predict(query, mask_features, shapes[0])
        cls_scores, mask_preds = [cls_score], [mask_pred]
        for i, layer in enumerate(self.decoder_layers):
            attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)  # a query that would see nothing sees all
            query = layer(query, query_pos, keys[i % NUM_LEVELS], key_pos[i % NUM_LEVELS], attn_mask)
            cls_score, mask_pred, attn_mask = self.predict(query, mask_features, shapes[(i + 1) % NUM_LEVELS])
            cls_scores.append(cls_score)
            mask_preds.append(mask_pred)
        return {'cls_scores': cls_scores, 'mask_preds': mask_preds}

    def predict(self, query: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple) -> tuple:
        """(class logits (B, Q, K+1), mask logits (B, Q, H, W), the attention mask (B·heads, Q, h·w) at
        `attn_size` for the next layer: True where the mask, resized bilinearly, is below 0.5)."""
        decoded = self.post_norm(query)
        embed = self.mask_embed(decoded)
        if self.offset_learning is not None:
            mask_pred = self.offset_learning(embed, mask_features)
        else:
            mask_pred = torch.einsum('bqc,bchw->bqhw', embed, mask_features)
        attn_mask = resize(mask_pred, attn_size).flatten(2).sigmoid() < 0.5
        return self.cls_embed(decoded), mask_pred, attn_mask.detach().repeat_interleave(self.num_heads, dim=0)

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """mmseg 1.x / mmdet 3.x `decode_head.*` keys (prefix stripped; plain and OffSeg's +OL) -> ours.
        Keys of no known pattern pass through unchanged, so loading lists them."""
        converted = {}
        for key, value in state.items():
            for pattern, replacement in RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        return converted


RENAMES = [  # applied in order; our keys match none of them
    (r'^pixel_decoder\.encoder\.layers\.', 'pixel_decoder.encoder_layers.'),
    (r'^pixel_decoder\.lateral_convs\.0\.', 'pixel_decoder.lateral_conv.'),
    (r'^pixel_decoder\.output_convs\.0\.', 'pixel_decoder.output_conv.'),
    (r'^transformer_decoder\.layers\.', 'decoder_layers.'),
    (r'^transformer_decoder\.post_norm\.', 'post_norm.'),
    (r'\.(cross_attn|self_attn)\.attn\.', r'.\1.'),
    (r'\.ffn\.layers\.0\.0\.', '.ffn.fc1.'),
    (r'\.ffn\.layers\.1\.', '.ffn.fc2.'),
]
