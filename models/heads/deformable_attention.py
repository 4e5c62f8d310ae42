"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR) in pure PyTorch.

Each query looks at a few points per head and level around its reference point instead of at every
key: the values are sampled there bilinearly (`F.grid_sample`) and summed with weights the query
predicts. The arithmetic is mmcv's `multi_scale_deformable_attn_pytorch` (the reference its CUDA
kernel is checked against), so no compiled op is needed and the module runs on CPU and exports to ONNX.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def multi_scale_deformable_attention(
    value: torch.Tensor, spatial_shapes: list, sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> torch.Tensor:
    """Weighted bilinear samples of every level.

    value (B, N, heads, D): the levels' tokens concatenated, row-major, level by level;
    spatial_shapes: [(h, w)] per level as ints, sum h·w = N;
    sampling_locations (B, Q, heads, levels, points, 2): (x, y) in [0, 1], 0 and 1 the outer pixel edges;
    attention_weights (B, Q, heads, levels, points). Samples outside the map are zero.
    Returns (B, Q, heads·D).
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    # Sampled in float32 at least: under autocast the values arrive in half precision, the locations in
    # float32, and half-precision locations would be off by a fraction of a pixel on large maps.
    dtype = torch.promote_types(value.dtype, torch.float32)
    grids = 2 * sampling_locations.to(dtype) - 1
    samples = []
    for level, (values, (height, width)) in enumerate(
        zip(value.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
    ):
        values = values.flatten(2).transpose(1, 2).reshape(batch * heads, dim, height, width).to(dtype)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B·heads, Q, points, 2)
        samples.append(F.grid_sample(values, grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    samples = torch.stack(samples, dim=-2).flatten(-2)  # (B·heads, D, Q, L·P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    return (samples * weights).sum(-1).view(batch, heads * dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's `MultiScaleDeformableAttention` (same parameter names), value = query, with its residual.

    query (B, N, C), query_pos (B, N, C), reference_points (B, N, levels, 2) as (x, y) in [0, 1],
    spatial_shapes [(h, w)] of the levels that make up the N value tokens -> (B, N, C).
    Offsets and weights come from query + query_pos; the value and the residual use the query alone.
    Attention weights are a softmax over all levels and points of a head together.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's init: each head starts sampling along its own direction, point k at k+1 pixels."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, query: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: list
    ) -> torch.Tensor:
        batch, queries, _ = query.shape
        value = self.value_proj(query).view(batch, queries, self.num_heads, -1)
        with_pos = query + query_pos
        shape = (batch, queries, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(with_pos).view(*shape, 2)
        weights = self.attention_weights(with_pos).view(*shape[:3], -1).softmax(-1).view(shape)
        # Offsets are in pixels of each level. Divided size by size, not by a tensor of the sizes, so that
        # an ONNX trace keeps them as the input's shape rather than constants.
        offsets = torch.stack(
            [
                torch.stack([offsets[:, :, :, level, :, 0] / width, offsets[:, :, :, level, :, 1] / height], dim=-1)
                for level, (height, width) in enumerate(spatial_shapes)
            ],
            dim=3,
        )
        locations = reference_points[:, :, None, :, None, :] + offsets
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output) + query
