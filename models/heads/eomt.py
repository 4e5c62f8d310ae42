"""EoMT, the encoder-only mask transformer (Kerssies et al., CVPR 2025: "Your ViT is secretly an image
segmentation model"), the official tue-mps/eomt design and names.

Learnable queries join the patch tokens for the ViT's last `num_blocks` blocks, which the head takes over
from the backbone (`hand_over_blocks`: their weights stay the backbone's). Before each of those blocks
and after the last, the tokens go through the backbone's final LayerNorm and the queries predict: a
class (or "no object") each from a linear layer, and a mask each from the dot product of their MLP
embedding with the patch tokens upscaled to stride p/4 (transposed conv, GELU, depthwise conv,
LayerNorm, twice). In training every prediction is supervised (Mask2Former's loss) and each prediction
masks the next block's attention: a query sees only the patches its mask covers (logit > 0 on the patch
grid), a mask kept per image and query with the block's probability in `attn_mask_probs`, which
training anneals from 1 to 0 (`train.mask_annealing`, engine/optim.py) so that inference runs
without masks. In eval mode the head makes only the last prediction and masks nothing, as the paper's
inference.

Training output: {'cls_scores': [(B, Q, K+1)], 'mask_preds': [(B, Q, H/4, W/4)]}, `num_blocks` + 1
predictions; eval output: `MaskClassification`. With Offset Learning the masks come from
`OffsetLearningMask` on the mask embeddings and the upscaled patches, as OffSeg applies it to
Mask2Former.
"""

import re

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from ..backbones.vit import HandedOver
from ..offset_learning import OffsetLearningMask
from .mask_classification import MaskClassification


class ScaleBlock(nn.Module):
    """x2 upsampling at full width: transposed conv, GELU, depthwise 3x3 conv, LayerNorm (official names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(channels, channels, 2, 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = LayerNorm2d(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class EoMTHead(nn.Module):
    """Queries run through a ViT's last blocks with its patches, then classify masks (EoMT).

    Takes the tokens before the last `num_blocks` blocks (`HandedOver`); see the module docstring. The
    published models: 100 queries (ADE20K), `num_blocks` 4 (ViT-L) or 3 (S/B), two upscaling blocks
    (masks at stride 4 for patch 16)."""

    set_prediction_loss = True  # trained by matching queries to masks (engine/mask_losses.py), not per pixel
    anneals_attention_masks = True  # train.mask_annealing sets attn_mask_probs (engine/optim.py)

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        num_queries: int = 100,
        num_blocks: int = 4,
        num_upscale: int = 2,
        offset_learning: bool = False,
    ):
        super().__init__()
        width = in_channels[-1]
        self.backbone_blocks = num_blocks  # Segmentor hands them over (`hand_over_blocks`)
        self.q = nn.Embedding(num_queries, width)
        self.class_head = nn.Linear(width, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
        )
        self.upscale = nn.Sequential(*(ScaleBlock(width) for _ in range(num_upscale)))
        self.offset_learning = OffsetLearningMask(width) if offset_learning else None
        self.register_buffer('attn_mask_probs', torch.ones(num_blocks))

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """transformers' EoMT head names -> ours (the official ones, which pass unchanged)."""
        converted = {}
        for key, value in state.items():
            for pattern, replacement in HEAD_RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        return converted

    def forward(self, vit: HandedOver):
        if not isinstance(vit, HandedOver):
            raise ValueError('EoMT runs the last blocks of a ViT backbone (dinov2, dinov3); it cannot take maps')
        queries = self.q.weight.shape[0]
        tokens = torch.cat([self.q.weight.expand(vit.tokens.shape[0], -1, -1).to(vit.tokens.dtype), vit.tokens], 1)
        cls_scores, mask_preds = [], []
        for block, probability in zip(vit.blocks, self.attn_mask_probs):
            mask = None
            if self.training:
                class_logits, mask_logits = self.predict(vit.final_norm(tokens), vit)
                cls_scores.append(class_logits)
                mask_preds.append(mask_logits)
                if probability > 0:
                    mask = self.attention_mask(mask_logits, vit, queries, probability, attention_dtype(tokens))
            tokens = block(tokens, attention_mask=mask)
        class_logits, mask_logits = self.predict(vit.final_norm(tokens), vit)
        if not self.training:
            return MaskClassification(class_logits, mask_logits)
        return {'cls_scores': [*cls_scores, class_logits], 'mask_preds': [*mask_preds, mask_logits]}

    def predict(self, tokens: torch.Tensor, vit: HandedOver) -> tuple:
        """(class logits (B, Q, K+1), mask logits (B, Q, h·4, w·4)) from normed tokens [queries, prefix, patches]."""
        queries = self.q.weight.shape[0]
        query_tokens = tokens[:, :queries]
        patches = tokens[:, queries + vit.prefix :].transpose(1, 2).reshape(tokens.shape[0], -1, *vit.grid)
        features = self.upscale(patches)
        embeddings = self.mask_head(query_tokens)
        if self.offset_learning is not None:
            mask_logits = self.offset_learning(embeddings, features)
        else:
            mask_logits = torch.einsum('bqc,bchw->bqhw', embeddings, features)
        return self.class_head(query_tokens), mask_logits

    @staticmethod
    def attention_mask(mask_logits, vit: HandedOver, queries: int, probability, dtype) -> torch.Tensor:
        """Additive (B, 1, T, T) mask: a query attends to the patches its mask covers (logit > 0 at the
        patch grid), to the other queries and to the prefix; every other token attends to all. Each
        (image, query) keeps its mask with `probability`, otherwise it attends to all (one draw of
        torch.rand(B, Q) when `probability` < 1, as the official code draws it)."""
        batch, total = mask_logits.shape[0], queries + vit.tokens.shape[1]
        covered = F.interpolate(mask_logits, vit.grid, mode='bilinear').flatten(2) > 0  # (B, Q, h·w)
        if probability < 1:
            covered = covered | (torch.rand(batch, queries, device=mask_logits.device) > probability)[..., None]
        allowed = torch.ones(batch, total, total, dtype=torch.bool, device=mask_logits.device)
        allowed[:, :queries, queries + vit.prefix :] = covered
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def attention_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The dtype the blocks' attention computes in (autocast's, under mixed precision): an additive mask
    must match it."""
    device = tokens.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype


HEAD_RENAMES = [
    (r'^query\.', 'q.'),
    (r'^class_predictor\.', 'class_head.'),
    (r'^mask_head\.fc([123])\.', lambda m: f'mask_head.{2 * (int(m[1]) - 1)}.'),
    (r'^upscale_block\.block\.(\d+)\.layernorm2d\.', r'upscale.\1.norm.'),
    (r'^upscale_block\.block\.(\d+)\.', r'upscale.\1.'),
]
"""transformers' EoMT head names -> the official ones, used here."""

TRANSFORMERS_BACKBONES = {
    'dinov3': [(r'^layers\.', 'model.layer.'), (r'^layernorm\.', 'norm.')],
    'dinov2': [(r'^layers\.', 'encoder.layer.'), (r'\.attention\.out_proj\.', '.attention.o_proj.')],
}
"""The ViT names of transformers' DINOv3 / DINOv2 EoMT -> those of DINOv3ViTModel / Dinov2Model, which the
backbones' key maps read."""

OFFICIAL_DINOV3 = [(r'^patch_embed\.', 'embeddings.'), (r'^blocks\.', 'model.layer.')]
"""tue-mps/eomt's DINOv3 is transformers' DINOv3ViTModel (4.56) with timm's attribute names -> today's names."""


def checkpoint_parts(state: dict, differences: bool = False):
    """An EoMT checkpoint, official or transformers', in the prefix contract's form (models/weights.py):
    the ViT under `backbone.`, the head under `decode_head.`, the loss's class weights and the input
    normalisation dropped; None for any other file. `differences`: the file holds differences to where
    training started (`holds_differences`), which the caller adds."""
    if 'network.q.weight' in state:
        return official_checkpoint_parts(state, differences)
    if 'class_predictor.weight' in state and 'query.weight' in state:
        return transformers_checkpoint_parts(state)
    return None


def holds_differences(state: dict) -> bool:
    """tue-mps/eomt's DINOv3 checkpoints: each tensor is its difference to where training started, the
    pretrained DINOv3 ViT and zero for every other parameter (`official_training_start`)."""
    return 'network.encoder.backbone.patch_embed.patch_embeddings.weight' in state


def official_training_start(model: nn.Module) -> dict:
    """The state an official DINOv3 EoMT checkpoint's differences are to, in our names, from `model` built
    with the pretrained ViT: every parameter outside the backbone zeroed (as tue-mps/eomt's
    `_zero_init_outside_encoder`), the buffers as built."""
    start = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    return {
        key: torch.zeros_like(value) if key in parameters and not key.startswith('backbone.') else value
        for key, value in start.items()
    }


def official_checkpoint_parts(state: dict, differences: bool) -> dict:
    """tue-mps/eomt's Lightning state_dict: `network.encoder.backbone.` holds timm's DINOv2 (the dinov2
    backbone's key map reads it) or, renamed, DINOv3ViTModel; `network.` the head under the names used here."""
    if holds_differences(state) and not differences:
        raise ValueError(
            'an official DINOv3 EoMT checkpoint holds each weight as its difference to the pretrained DINOv3 '
            'weights training started from; convert it with tools/convert_checkpoint.py --base <that DINOv3 '
            '.pth file or transformers folder>'
        )
    renames = OFFICIAL_DINOV3 if holds_differences(state) else []
    parts = {}
    for key, value in state.items():
        if key.startswith('network.encoder.backbone.'):
            key = key.removeprefix('network.encoder.backbone.')
            for pattern, replacement in renames:
                key = re.sub(pattern, replacement, key)
            parts[f'backbone.{key}'] = value
        elif key.startswith('network.') and not key.startswith('network.encoder.'):
            parts[f'decode_head.{key.removeprefix("network.")}'] = value
    return parts


def transformers_checkpoint_parts(state: dict) -> dict:
    """transformers' `EomtDinov3ForUniversalSegmentation` or `EomtForUniversalSegmentation` (no part
    prefixes): its ViT's names become DINOv3ViTModel's or Dinov2Model's."""
    family = 'dinov2' if 'embeddings.position_embeddings.weight' in state else 'dinov3'
    parts = {}
    for key, value in state.items():
        if key.startswith('criterion.'):
            continue
        if key == 'embeddings.position_embeddings.weight':  # an nn.Embedding of the patches' positions
            key = 'embeddings.position_embeddings'
        if key.startswith(('embeddings.', 'layers.', 'layernorm.')):
            for pattern, replacement in TRANSFORMERS_BACKBONES[family]:
                key = re.sub(pattern, replacement, key)
            parts[f'backbone.{key}'] = value
        else:
            parts[f'decode_head.{key}'] = value
    return parts
