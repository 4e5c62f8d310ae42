"""Offset Learning (Zhang et al., ICCV 2025): a drop-in replacement for a head's 1x1 classifier.

Per-pixel classification scores each pixel feature against one fixed prototype per class.
Offset Learning lets both sides move: from one coupled attention map A = W·Eᵀ it derives a
per-image class offset ΔW (classes pool the pixels they attend to) and a per-pixel feature
offset ΔE (pixels mix the class embeddings they attend to), then scores (E+ΔE)·(W+ΔW)ᵀ.
The logits of each pixel are LayerNorm'ed over the classes, as in the published code.

Parameters: K·C (class embedding) + 2·C² (the two bias-free projections) + 2·K (LayerNorm).
"""

import torch
import torch.nn.functional as F
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
        """The published arithmetic, reassociated. With E (HW, C) the pixel features, W (K, C) the
        classes, A = W·Eᵀ and W' = W + ΔW (ΔW = softmax_HW(A)·E·P_clsᵀ), the published scores are
        (E + softmax_K(A)ᵀ·W·P_featᵀ)·W'ᵀ. Computed class-major, as W'·Eᵀ + (W'·P_feat·Wᵀ)·softmax_K(A),
        the feature offset ΔE (HW, C) and the per-pixel projection (HW·C² multiply-adds) are never formed:
        the products run on K×C and K×K matrices instead (fewer multiply-adds; tools/benchmark.py counts them).
        The LayerNorm over the K classes of each pixel is taken apart: its mean is removed before the
        products, by centring the rows of W' and of the K×K mixing (the scores are linear in both), so
        only the per-pixel norm is a pass over the (K, HW) scores. Same numbers up to float rounding;
        the class-major layout needs no transposed (HW, K) copies, which pays at few classes, not at many
        (timed against pixel-major at CamVid's 11 and ADE20K's 150 classes by benchmarks/offseg_speed.py).
        """
        b, c, h, w = x.shape
        feats = x.flatten(2)  # Eᵀ: (B, C, HW)
        classes = self.cls_repr.expand(b, -1, -1)  # W: (B, K, C)
        attn = classes @ feats  # A: (B, K, HW), no scaling
        prototypes = classes + self.cls_offset_proj(attn.softmax(dim=-1) @ feats.transpose(1, 2))  # W' = W + ΔW
        # F.linear, not the module: a module called on a parameter trips FlopCounterMode under no_grad
        mixing = prototypes @ F.linear(self.cls_repr, self.feat_offset_proj.weight).transpose(1, 2)  # (B, K, K)
        prototypes = prototypes - prototypes.mean(dim=1, keepdim=True)
        mixing = mixing - mixing.mean(dim=1, keepdim=True)
        scores = torch.baddbmm(mixing @ attn.softmax(dim=1), prototypes, feats)  # (B, K, HW), mean 0 over K
        variance = (scores * scores).mean(dim=1, keepdim=True)  # a product pass: faster than linalg.vector_norm
        norm = self.mask_norm
        logits = torch.addcmul(norm.bias[:, None], scores * (variance + norm.eps).rsqrt(), norm.weight[:, None])
        return logits.view(b, -1, h, w)


class OffsetLearningMask(nn.Module):
    """Offset Learning for mask classification (Mask2Former+OL, `Offset_Learning_Mask`).

    The queries' mask embeddings take the place of the class embedding: from A = E·Fᵀ (queries E
    (Q, C) against pixel features F (HW, C), no scaling) the queries move by ΔE = softmax_HW(A)·F·P_clsᵀ
    and the pixels by ΔF = softmax_Q(A)ᵀ·E·P_featᵀ (a softmax over the queries), and the masks are
    (E+ΔE)·(F+ΔF)ᵀ. No class embedding and no LayerNorm: 2·C² parameters.

    mask_embed (B, Q, C), mask_features (B, C, H, W) -> mask logits (B, Q, H, W).
    """

    def __init__(self, embed_dims: int = 256, init_std: float = 0.02):
        super().__init__()
        self.cls_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.feat_offset_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        for weight in (self.cls_offset_proj.weight, self.feat_offset_proj.weight):
            nn.init.trunc_normal_(weight, std=init_std)

    def forward(self, mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Reassociated as in `OffsetLearning`: (E+ΔE)·ΔFᵀ = ((E+ΔE)·P_feat·Eᵀ)·softmax_Q(A), a (Q, Q)
        matrix times the attention, so ΔF (HW, C) and its HW·C² projection are never formed."""
        b, c, h, w = mask_features.shape
        feats = mask_features.flatten(2)  # Fᵀ: (B, C, HW)
        attn = mask_embed @ feats  # A: (B, Q, HW)
        aligned = mask_embed + self.cls_offset_proj(attn.softmax(dim=-1) @ feats.transpose(1, 2))  # E + ΔE
        mixing = F.linear(aligned, self.feat_offset_proj.weight.t()) @ mask_embed.transpose(1, 2)  # (B, Q, Q)
        masks = torch.baddbmm(mixing @ attn.softmax(dim=1), aligned, feats)  # (B, Q, HW)
        return masks.view(b, -1, h, w)


Offset_Learning = OffsetLearning
"""The published class name, for code ported from the OffSeg repository."""
Offset_Learning_Mask = OffsetLearningMask
"""The published name of the Mask2Former variant."""
