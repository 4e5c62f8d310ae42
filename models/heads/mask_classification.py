"""What a mask-classification head (Mask2Former) returns in eval mode, and its semantic inference.

The head predicts Q binary masks, each with a class (or "no object"); per-class scores come from
their combination. The combination is taken at the resolution the scores are wanted at, as mmseg's
`Mask2FormerHead.predict`, official Mask2Former and transformers'
`post_process_semantic_segmentation` do: the mask logits are resized first, then squashed and
summed. Resizing the combined map instead moves the argmax at sharp class boundaries.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24
"""Resized masks are made a few queries at a time, at most this many floats (64 MB) at once: 100
queries at 2048x1024 would be 800 MB."""


class MaskClassification(NamedTuple):
    """class_logits (B, Q, K+1), the last column "no object"; mask_logits (B, Q, h, w) at the head's stride."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor


def semantic_scores(output: MaskClassification, size=None) -> torch.Tensor:
    """(B, K, *size) float32 scores Σ_q softmax(class_q)[:K] · sigmoid(mask_q resized bilinearly to
    `size`; default: the masks' own size)."""
    probabilities = output.class_logits.float().softmax(dim=-1)[..., :-1]
    masks = output.mask_logits.float()
    batch, queries, height, width = masks.shape
    size = tuple(size or (height, width))
    scores = masks.new_zeros(batch, probabilities.shape[-1], *size)
    step = max(1, CHUNK_ELEMENTS // (batch * size[0] * size[1]))
    for start in range(0, queries, step):
        chunk = masks[:, start : start + step]
        if tuple(chunk.shape[-2:]) != size:
            chunk = F.interpolate(chunk, size=size, mode='bilinear', align_corners=False)
        scores += torch.einsum('bqk,bqhw->bkhw', probabilities[:, start : start + step], chunk.sigmoid())
    return scores
