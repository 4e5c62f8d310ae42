"""Backbone + head (+ auxiliary head): the one nn.Module that training, evaluation and export use."""

from typing import Optional

import torch
from torch import nn


class Segmentor(nn.Module):
    """Image batch (B, 3, H, W), normalised, -> logits (B, K, h, w) at the head's native resolution.

    In training mode with an auxiliary head it returns [logits, aux_logits] for the loss; the
    caller resizes logits to the label size either way.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        logits = self.head(features)
        if self.training and self.aux_head is not None:
            return [logits, self.aux_head(features)]
        return logits
