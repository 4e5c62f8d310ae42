"""Backbone + head (+ auxiliary head): the one nn.Module that training, evaluation and export use."""

import contextlib
from typing import Optional

import torch
from torch import nn

from .input_channels import input_conv


class Segmentor(nn.Module):
    """Image batch (B, 3, H, W), normalised, -> logits (B, K, h, w) at the head's native resolution.

    In training mode with an auxiliary head it returns [logits, aux_logits] for the loss; the
    caller resizes logits to the label size either way. A frozen backbone (linear probing, or a head
    trained on fixed foundation features) freezes its pretrained part (`frozen_part`): no gradients,
    norms in eval mode in training too, features computed without autograd.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        aux_head: Optional[nn.Module] = None,
        frozen_backbone: bool = False,
    ):
        super().__init__()
        join(backbone, head, aux_head, frozen_backbone)
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            self.frozen_part().requires_grad_(False)

    @property
    def in_channels(self) -> int:
        """The bands of the images it takes (3 unless `data.in_channels` rebuilt its input convolution)."""
        return input_conv(self.backbone)[1].in_channels

    def frozen_part(self) -> Optional[nn.Module]:
        """What `frozen_backbone` freezes: the backbone's `pretrained_part` (a ViT, without the feature
        pyramid it feeds, which is new and trains; the backbone computes the ViT's maps without
        autograd then), by default the whole backbone; None when nothing is frozen."""
        if not self.frozen_backbone:
            return None
        return self.backbone.get_submodule(getattr(self.backbone, 'pretrained_part', ''))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone:
            self.frozen_part().eval()
        return self

    def forward(self, images: torch.Tensor):
        whole_backbone_frozen = self.frozen_backbone and self.frozen_part() is self.backbone
        with torch.no_grad() if whole_backbone_frozen else contextlib.nullcontext():
            features = self.backbone(images)
        logits = self.head(features)
        if self.training and self.aux_head is not None:
            return [logits, self.aux_head(features)]
        return logits


def join(backbone: nn.Module, head: nn.Module, aux_head: Optional[nn.Module] = None, frozen: bool = False) -> None:
    """Hand the last blocks of a ViT backbone to a head that runs them itself (EoMT's `backbone_blocks`);
    a ValueError where the pair cannot work so."""
    blocks = getattr(head, 'backbone_blocks', 0)
    if not blocks:
        return
    name = type(head).__name__
    if not hasattr(backbone, 'hand_over_blocks'):
        raise ValueError(
            f'{name} runs the last blocks of a ViT backbone (dinov2, dinov3), not of {type(backbone).__name__}'
        )
    if aux_head is not None:
        raise ValueError(f"{name} takes over the backbone's last blocks, so there are no maps for an auxiliary head")
    if frozen:
        raise ValueError(f"{name} trains the backbone's last blocks with its queries: the backbone cannot be frozen")
    backbone.hand_over_blocks(blocks)
