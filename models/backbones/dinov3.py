"""DINOv3 (Siméoni et al. 2025): ViT-S/S+/B/L with patch 16, four register tokens and rotary position
embeddings, through transformers' own `DINOv3ViTModel` built from a local config (nothing is
downloaded), as MiT is. Our keys are transformers 5.x's under `vit.`; `convert_checkpoint` maps the
official `dinov3_vit*16*_pretrain_*.pth` names and transformers 4.x folders onto them. How the blocks
become four maps: models/backbones/vit.py. Built without the training-time random rescaling of the
RoPE coordinates (`pos_embed_rescale`), so a forward in train mode computes what eval does.
"""

from typing import NamedTuple

import torch
from torch import nn

from .variants import lookup
from .vit import VisionTransformer, convert_vit_keys


class DINOv3(VisionTransformer):
    """DINOv3 ViT-S/S+/B/L with patch 16, four register tokens and rotary position embeddings."""

    def __init__(
        self,
        variant: str = 'vits16',
        out_indices=None,
        pyramid: bool = True,
        drop_path_rate: float = 0.0,
    ):
        spec = lookup('DINOv3', VARIANTS, variant)
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        config = DINOv3ViTConfig(
            hidden_size=spec.width,
            num_hidden_layers=spec.depth,
            num_attention_heads=spec.heads,
            intermediate_size=spec.mlp,
            use_gated_mlp=spec.gated,
            hidden_act='silu' if spec.gated else 'gelu',  # the gated MLP reads its activation from here
            num_register_tokens=4,
            patch_size=16,
            pos_embed_rescale=None,
            drop_path_rate=drop_path_rate,
        )
        super().__init__(DINOv3ViTModel(config), spec.width, spec.depth, 16, out_indices, pyramid)
        self.prefix = 1 + 4  # the class token and the registers

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(tokens)

    @property
    def layers(self) -> nn.ModuleList:
        return self.vit.model.layer

    def embed(self, x: torch.Tensor) -> tuple:
        x = x.to(self.vit.embeddings.patch_embeddings.weight.dtype)
        return self.vit.embeddings(x), {'position_embeddings': self.vit.rope_embeddings(x)}

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """Official `dinov3_vit*16*_pretrain_*.pth` or transformers 4.x/5.x weights -> ours."""
        return {
            f'vit.{key}': value for key, value in convert_vit_keys(state, RENAMES, 'model.layer', k_bias=False).items()
        }


RENAMES = [
    # official facebookresearch names
    (r'^cls_token$', 'embeddings.cls_token'),
    (r'^storage_tokens$', 'embeddings.register_tokens'),
    (r'^patch_embed\.proj\.', 'embeddings.patch_embeddings.'),
    (r'\.attn\.proj\.', '.attention.o_proj.'),
    (r'\.ls([12])\.gamma$', r'.layer_scale\1.lambda1'),
    (r'\.mlp\.fc1\.', '.mlp.up_proj.'),
    (r'\.mlp\.fc2\.', '.mlp.down_proj.'),
    (r'\.mlp\.w1\.', '.mlp.gate_proj.'),
    (r'\.mlp\.w2\.', '.mlp.up_proj.'),
    (r'\.mlp\.w3\.', '.mlp.down_proj.'),
    # transformers 4.x: the blocks sat at `layer.{i}`
    (r'^layer\.(\d+)\.', r'model.layer.\1.'),
]


class Variant(NamedTuple):
    width: int
    depth: int
    heads: int
    mlp: int
    gated: bool = False


VARIANTS = {
    'vits16': Variant(384, 12, 6, 1536),
    'vits16plus': Variant(384, 12, 6, 1536, gated=True),
    'vitb16': Variant(768, 12, 12, 3072),
    'vitl16': Variant(1024, 24, 16, 4096),
    'test': Variant(64, 4, 2, 128),  # for the test suite
}
