"""DINOv2 (Oquab et al. 2023): ViT-S/B/L/g with patch 14, with and without four register tokens, through
transformers' own modules (`Dinov2Model`, `Dinov2WithRegistersModel`) built from a local config (nothing
is downloaded), as MiT is. Our keys are transformers 5.x's under `vit.`; `convert_checkpoint` maps the
official `dinov2_vit*14[_reg4]_pretrain.pth` names and transformers 4.x folders onto them. How the
blocks become four maps: models/backbones/vit.py.
"""

from typing import NamedTuple

import torch
from torch import nn

from .variants import lookup
from .vit import VisionTransformer, convert_vit_keys


class DINOv2(VisionTransformer):
    """DINOv2 ViT-S/B/L/g with patch 14 (`_reg4`: with four register tokens)."""

    def __init__(
        self,
        variant: str = 'vits14',
        out_indices=None,
        pyramid: bool = True,
        drop_path_rate: float = 0.0,
        checkpointing: bool = False,
    ):
        spec = lookup('DINOv2', VARIANTS, variant)
        from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        options = dict(
            hidden_size=spec.width,
            num_hidden_layers=spec.depth,
            num_attention_heads=spec.heads,
            use_swiglu_ffn=spec.swiglu,
            image_size=518,  # the 37x37 grid of the published position embeddings
            patch_size=14,
            layer_norm_eps=1e-6,
            drop_path_rate=drop_path_rate,
        )
        if spec.registers:
            vit = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **options))
        else:
            vit = Dinov2Model(Dinov2Config(use_mask_token=False, **options))
        super().__init__(vit, spec.width, spec.depth, 14, out_indices, pyramid, checkpointing)
        self.prefix = 1 + (4 if spec.registers else 0)  # the class token and the registers

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vit.layernorm(tokens)

    @property
    def layers(self) -> nn.ModuleList:
        return self.vit.encoder.layer

    def embed(self, x: torch.Tensor) -> tuple:
        return self.vit.embeddings(x), {}

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """Official `dinov2_vit*14[_reg4]_pretrain.pth` or transformers 4.x/5.x weights (an image
        classifier's under `dinov2.`) -> ours."""
        state = {key.removeprefix('dinov2.').removeprefix('dinov2_with_registers.'): v for key, v in state.items()}
        return {
            f'vit.{key}': value for key, value in convert_vit_keys(state, RENAMES, 'encoder.layer', k_bias=True).items()
        }


RENAMES = [
    # official facebookresearch names
    (r'^cls_token$', 'embeddings.cls_token'),
    (r'^pos_embed$', 'embeddings.position_embeddings'),
    (r'^register_tokens$', 'embeddings.register_tokens'),
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
