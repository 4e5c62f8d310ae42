"""DINOv2 (Oquab et al. 2023): ViT-S/B/L/g with patch 14, with and without four register tokens, through
transformers' own modules (`Dinov2Model`, `Dinov2WithRegistersModel`) built from a local config (nothing
is downloaded), as MiT is. Our keys are transformers 5.x's under `vit.`; `convert_checkpoint` maps the
official `dinov2_vit*14[_reg4]_pretrain.pth` names and transformers 4.x folders onto them. How the
blocks become four maps: models/backbones/vit.py.
"""

import math
from typing import NamedTuple

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from .variants import lookup
from .vit import VisionTransformer, convert_vit_keys


class DINOv2(VisionTransformer):
    """DINOv2 ViT-S/B/L/g with patch 14 (`_reg4`: with four register tokens).

    `patch_size` 16 and `image_size` 512 build the ViT as EoMT runs DINOv2 (its checkpoints and
    transformers' `EomtForUniversalSegmentation` hold a 16-pixel patch kernel and a 32x32 position
    table); `image_size` is the side the position table is for (other sides interpolate it)."""

    def __init__(
        self,
        variant: str = 'vits14',
        out_indices=None,
        pyramid: bool = True,
        drop_path_rate: float = 0.0,
        patch_size: int = 14,
        image_size: int = 518,
    ):
        spec = lookup('DINOv2', VARIANTS, variant)
        if patch_size not in (14, 16) or image_size % patch_size:
            raise ValueError(f'patch_size: 14 or 16, image_size: a multiple of it; got {patch_size}, {image_size}')
        from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        options = dict(
            hidden_size=spec.width,
            num_hidden_layers=spec.depth,
            num_attention_heads=spec.heads,
            use_swiglu_ffn=spec.swiglu,
            image_size=image_size,  # 518: the 37x37 grid of the published position embeddings
            patch_size=patch_size,
            layer_norm_eps=1e-6,
            drop_path_rate=drop_path_rate,
        )
        if spec.registers:
            vit = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **options))
        else:
            vit = Dinov2Model(Dinov2Config(use_mask_token=False, **options))
        super().__init__(vit, spec.width, spec.depth, patch_size, out_indices, pyramid)
        self.prefix = 1 + (4 if spec.registers else 0)  # the class token and the registers

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vit.layernorm(tokens)

    @property
    def layers(self) -> nn.ModuleList:
        return self.vit.encoder.layer

    def embed(self, x: torch.Tensor) -> tuple:
        return self.vit.embeddings(x), {}

    def fit_checkpoint(self, state: dict) -> dict:
        """Weights of another patch size or position grid (the official patch-14, 37x37 files in EoMT's
        patch-16 ViT) resized to this model's as the official EoMT code loads them through timm: the patch
        kernel by FlexiViT's resampling, the position table bicubically (the class token's row kept)."""
        embeddings = self.vit.embeddings
        kernel, table = 'vit.embeddings.patch_embeddings.projection.weight', 'vit.embeddings.position_embeddings'
        own_kernel, own_table = embeddings.patch_embeddings.projection.weight, embeddings.position_embeddings
        state = dict(state)
        if kernel in state and state[kernel].shape[-2:] != own_kernel.shape[-2:]:
            state[kernel] = resample_patch_embed(state[kernel], list(own_kernel.shape[-2:]))
        if table in state and state[table].shape[1] != own_table.shape[1] and state[table].shape[0] == 1:
            side = math.isqrt(own_table.shape[1] - 1)
            state[table] = resample_abs_pos_embed(state[table], [side, side], num_prefix_tokens=1)
        return state

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """Official `dinov2_vit*14[_reg4]_pretrain.pth`, transformers 4.x/5.x weights (an image classifier's
        under `dinov2.`) or timm's (EoMT's) -> ours. A position table without a row for the class token
        (timm's `no_embed_class`, as EoMT holds it: a square number of patches) gets a zero row in front:
        the class token takes no position there."""
        state = {key.removeprefix('dinov2.').removeprefix('dinov2_with_registers.'): v for key, v in state.items()}
        converted = convert_vit_keys(state, RENAMES, 'encoder.layer', k_bias=True)
        table = converted.get('embeddings.position_embeddings')
        if table is not None:
            table = table.reshape(1, -1, table.shape[-1])
            if math.isqrt(table.shape[1]) ** 2 == table.shape[1]:
                table = torch.cat([table.new_zeros(1, 1, table.shape[2]), table], dim=1)
            converted['embeddings.position_embeddings'] = table
        return {f'vit.{key}': value for key, value in converted.items()}


RENAMES = [
    # official facebookresearch names
    (r'^cls_token$', 'embeddings.cls_token'),
    (r'^pos_embed$', 'embeddings.position_embeddings'),
    (r'^register_tokens$', 'embeddings.register_tokens'),
    (r'^reg_token$', 'embeddings.register_tokens'),  # timm's
    (r'^patch_embed\.proj\.', 'embeddings.patch_embeddings.projection.'),
    (r'\.attn\.proj\.', '.attention.o_proj.'),
    (r'\.ls([12])\.gamma$', r'.layer_scale\1.lambda1'),
    (r'\.mlp\.w3\.', '.mlp.down_proj.'),
    (r'^norm\.', 'layernorm.'),
    # transformers 4.x
    (r'\.attention\.attention\.query\.', '.attention.q_proj.'),
    (r'\.attention\.attention\.key\.', '.attention.k_proj.'),
    (r'\.attention\.attention\.value\.', '.attention.v_proj.'),
    (r'\.attention\.output\.dense\.', '.attention.o_proj.'),
    (r'\.mlp\.weights_out\.', '.mlp.down_proj.'),
]


class Variant(NamedTuple):
    width: int
    depth: int
    heads: int
    swiglu: bool = False
    registers: bool = False


VARIANTS = {
    f'{name}{suffix}': Variant(*spec, registers=bool(suffix))
    for name, spec in {
        'vits14': (384, 12, 6),
        'vitb14': (768, 12, 12),
        'vitl14': (1024, 24, 16),
        'vitg14': (1536, 40, 24, True),
        'test': (64, 4, 2),  # for the test suite
    }.items()
    for suffix in ('', '_reg4')
}
