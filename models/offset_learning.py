"""Offset Learning (Zhang et al., ICCV 2025): a drop-in replacement for a head's 1x1 classifier.

Per-pixel classification scores each pixel feature against one fixed prototype per class.
Offset Learning lets both sides move: from one coupled attention map A = W·Eᵀ it derives a
per-image class offset ΔW (classes pool the pixels they attend to) and a per-pixel feature
offset ΔE (pixels mix the class embeddings they attend to), then scores (E+ΔE)·(W+ΔW)ᵀ.
The logits of each pixel are LayerNorm'ed over the classes, as in the published code.

Parameters: K·C (class embedding) + 2·C² (the two bias-free projections) + 2·K (LayerNorm).
"""
import torch
from torch import nn


class OffsetLearning(nn.Module):
    """(B, C, H, W) features -> (B, K, H, W) logits, with the published parameter names."""

    def __init__(self, num_classes: int, embed_dims: int, init_std: float = 0.02):
        super().__init__()
        self.cls_repr = nn.Parameter(torch.empty(1, num_classes, embed_dims))
        self.cls_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.feat_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        for weight in (self.cls_repr, self.cls_offset_proj.weight, self.feat_offset_proj.weight):
            nn.init.trunc_normal_(weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        feats = x.flatten(2).transpose(1, 2)                    # E: (B, HW, C)
        classes = self.cls_repr.expand(b, -1, -1)               # W: (B, K, C)
        attn = classes @ feats.transpose(1, 2)                  # A: (B, K, HW), no scaling
        class_offset = self.cls_offset_proj(attn.softmax(dim=-1) @ feats)
        feat_offset = self.feat_offset_proj(attn.softmax(dim=1).transpose(1, 2) @ classes)
        masks = (feats + feat_offset) @ (classes + class_offset).transpose(1, 2)   # (B, HW, K)
        masks = self.mask_norm(masks)
        return masks.transpose(1, 2).reshape(b, -1, h, w)


Offset_Learning = OffsetLearning
"""The published class name, for code ported from the OffSeg repository."""
