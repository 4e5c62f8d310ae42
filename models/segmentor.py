"""Backbone + head (+ auxiliary head): the one nn.Module that training, evaluation and export use."""

import contextlib
from typing import Optional

import torch
from torch import nn


class Segmentor(nn.Module):
    """Image batch (B, 3, H, W), normalised, -> logits (B, K, h, w) at the head's native resolution.

    In training mode with an auxiliary head it returns [logits, aux_logits] for the loss; the
    caller resizes logits to the label size either way. A frozen backbone (linear probing, or a head
    trained on fixed foundation features) takes no gradients, keeps its norms in eval mode in training
    too, and computes its features without autograd.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        aux_head: Optional[nn.Module] = None,
        frozen_backbone: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor):
        with torch.no_grad() if self.frozen_backbone else contextlib.nullcontext():
            features = self.backbone(images)
        logits = self.head(features)
        if self.training and self.aux_head is not None:
            return [logits, self.aux_head(features)]
        return logits
