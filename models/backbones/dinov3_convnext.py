"""DINOv3's ConvNeXt-T/S/B/L (Siméoni et al. 2025), distilled from its ViT-7B, through transformers' own
`DINOv3ConvNextModel` built from a local config (nothing is downloaded), as MiT is. Our keys are
transformers 5.x's under `convnext.`; `convert_checkpoint` maps the official
`dinov3_convnext_*_pretrain_*.pth` names and transformers 4.x folders onto them.
"""

import re
from typing import NamedTuple

import torch
from torch import nn

from .variants import lookup


class DINOv3ConvNeXt(nn.Module):
    """DINOv3's ConvNeXt-T/S/B/L: the four stage outputs at strides 4/8/16/32, as transformers'
    `DINOv3ConvNextModel` computes them (not normalised: its final LayerNorm only serves the pooled
    token)."""

    def __init__(self, variant: str = 'tiny', drop_path_rate: float = 0.0):
        super().__init__()
        spec = lookup('DINOv3 ConvNeXt', VARIANTS, variant)
        from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

        config = DINOv3ConvNextConfig(depths=spec.depths, hidden_sizes=spec.widths, drop_path_rate=drop_path_rate)
        self.convnext = DINOv3ConvNextModel(config)
        self.convnext.layer_norm = None  # normalises the pooled token only, which segmentation does not use
        self.out_channels = list(spec.widths)
        self.decay_layers = 4  # stages; mmseg's ConvNeXt-T recipe counts 6 (train.layer_decay.num_layers)
        self.strides = [4, 8, 16, 32]

    def layer_id(self, name: str, num_layers: int) -> int:
        """Stage-wise learning-rate decay (mmseg's for ConvNeXt): the downsampling layers are layer 0,
        the blocks of stage s layer s + 1."""
        stage = re.match(r'convnext\.model\.stages\.(\d+)\.(downsample_layers|layers)\.', name)
        if stage is None:
            return num_layers + 1
        return 0 if stage[2] == 'downsample_layers' else int(stage[1]) + 1

    @property
    def checkpoint_blocks(self) -> tuple:
        """backbone.with_cp (models/activation_checkpointing.py): transformers' DINOv3ConvNextLayer."""
        return (type(self.convnext.model.stages[0].layers[0]),)

    def forward(self, x: torch.Tensor) -> list:
        features = []
        for stage in self.convnext.model.stages:
            x = stage(x)
            features.append(x)
        return features

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """Official `dinov3_convnext_*_pretrain_*.pth` or transformers 4.x/5.x weights -> ours."""
        converted = {}
        for key, value in state.items():
            if key.startswith(('norm.', 'norms.', 'layer_norm.', 'head.')):
                continue  # the final norm of the pooled token (norms.3 is the same tensor), a classifier
            for pattern, replacement in RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[f'convnext.{key}'] = value
        return converted


RENAMES = [
    # official facebookresearch names: the downsampling layers move into their stages
    (r'^downsample_layers\.(\d+)\.', r'model.stages.\1.downsample_layers.'),
    (r'^stages\.(\d+)\.(\d+)\.dwconv\.', r'model.stages.\1.layers.\2.depthwise_conv.'),
    (r'^stages\.(\d+)\.(\d+)\.norm\.', r'model.stages.\1.layers.\2.layer_norm.'),
    (r'^stages\.(\d+)\.(\d+)\.pwconv([12])\.', r'model.stages.\1.layers.\2.pointwise_conv\3.'),
    (r'^stages\.(\d+)\.(\d+)\.gamma$', r'model.stages.\1.layers.\2.gamma'),
    # transformers 4.x: no `model.` level
    (r'^stages\.', 'model.stages.'),
]


class Variant(NamedTuple):
    depths: list
    widths: list


VARIANTS = {
    'tiny': Variant([3, 3, 9, 3], [96, 192, 384, 768]),
    'small': Variant([3, 3, 27, 3], [96, 192, 384, 768]),
    'base': Variant([3, 3, 27, 3], [128, 256, 512, 1024]),
    'large': Variant([3, 3, 27, 3], [192, 384, 768, 1536]),
    'test': Variant([1, 1, 2, 1], [16, 32, 64, 128]),  # for the test suite
}
