"""ConvNeXt (Liu et al. 2022) through timm, as the official segmentation backbone uses it.

timm's features-only ConvNeXt returns the four stage outputs (strides 4/8/16/32). The official
segmentation code (facebookresearch/ConvNeXt, `semantic_segmentation/backbone/convnext.py`) adds
one channels-first LayerNorm (eps 1e-6) to each output; so do we (`norms`). ImageNet checkpoints
do not have them, so they start as a fresh LayerNorm would.
"""

import re
from typing import NamedTuple

import timm
import torch
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock, checkpoint_filter_fn
from torch import nn

from ..weights import CheckpointError
from .variants import lookup


class ConvNeXt(nn.Module):
    """timm ConvNeXt feature extractor plus per-output LayerNorms.

    Keys are timm's as `FeatureListNet` flattens them (`body.stem_0`, `body.stages_0.blocks.0...`),
    and `norms.{i}`. The official UperNet configs train with drop_path_rate 0.4 (0.3 for small).
    """

    checkpoint_blocks = (ConvNeXtBlock,)  # backbone.with_cp (models/activation_checkpointing.py)

    def __init__(self, variant: str = 'tiny', drop_path_rate: float = 0.0):
        super().__init__()
        spec = lookup('ConvNeXt', VARIANTS, variant)
        self.body = timm.create_model(
            spec.timm_name,
            pretrained=False,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            drop_path_rate=drop_path_rate,
        )
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-6) for c in self.out_channels)
        self.decay_layers = 4  # stages; mmseg's ConvNeXt-T recipe counts 6 (train.layer_decay.num_layers)

    def forward(self, x: torch.Tensor) -> list:
        return [norm(feature) for norm, feature in zip(self.norms, self.body(x))]

    def layer_id(self, name: str, num_layers: int) -> int:
        """Stage-wise learning-rate decay (mmseg's for ConvNeXt): the stem and the downsampling layers are
        layer 0, the blocks of stage s layer s + 1, the output norms come after them."""
        if name.startswith('body.stem'):
            return 0
        stage = re.match(r'body\.stages_(\d+)\.(downsample|blocks)\.', name)
        if stage is None:
            return num_layers + 1
        return 0 if stage[2] == 'downsample' else int(stage[1]) + 1

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """timm, original FB or mmpretrain weights (ImageNet, or a segmentation backbone's `norm{i}`, as
        mmseg's UPerNet checkpoints hold it) -> ours.

        timm's own `checkpoint_filter_fn` renames FB keys (`downsample_layers`, `dwconv`, `pwconv`)
        and reshapes 2-D weights to those of the model it is given, here a timm ConvNeXt of the
        checkpoint's variant on the meta device. The classifier (`head.*`, including the final
        norm) is dropped; missing output norms are filled with LayerNorm's initial ones and zeros.
        """
        state = {
            re.sub(r'\.(depthwise_conv|pointwise_conv[12])\.', lambda m: MMPRETRAIN[m[1]], k): v
            for k, v in state.items()
        }
        variant = _variant_of(state)
        with torch.device('meta'):
            reference = timm.create_model(VARIANTS[variant].timm_name, pretrained=False)
        state = checkpoint_filter_fn(state, reference)
        converted = {}
        for key, value in state.items():
            if key.startswith('head.'):
                continue
            key = re.sub(r'^norm(\d)\.', r'norms.\1.', key)
            converted[re.sub(r'^(stem|stages)\.(\d+)\.', r'body.\1_\2.', key)] = value
        for i, width in enumerate(VARIANTS[variant].dims):
            converted.setdefault(f'norms.{i}.weight', torch.ones(width))
            converted.setdefault(f'norms.{i}.bias', torch.zeros(width))
        return converted


MMPRETRAIN = {'depthwise_conv': '.dwconv.', 'pointwise_conv1': '.pwconv1.', 'pointwise_conv2': '.pwconv2.'}
"""mmpretrain's (mmcls') block names -> FB's, which timm's filter reads."""


def _variant_of(state: dict) -> str:
    """The variant with the checkpoint's stem width and stage-3 depth, in FB or timm naming."""
    stem = state.get('stem.0.weight', state.get('downsample_layers.0.0.weight'))
    depth = len({m[1] for key in state if (m := re.match(r'stages\.2\.(?:blocks\.)?(\d+)\.', key))})
    for name, variant in VARIANTS.items():
        if stem is not None and (stem.shape[0], depth) == (variant.dims[0], variant.depths[2]):
            return name
    raise CheckpointError(
        'not a ConvNeXt checkpoint: no stem weight of a known width '
        f'({", ".join(f"{name}: {v.dims[0]}" for name, v in VARIANTS.items())}) '
        'with the matching stage-3 depth'
    )


class Variant(NamedTuple):
    depths: tuple  # blocks per stage
    dims: tuple  # channels per stage
    timm_name: str  # the timm model it builds


VARIANTS = {
    'tiny': Variant(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), timm_name='convnext_tiny'),
    'small': Variant(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), timm_name='convnext_small'),
    'base': Variant(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), timm_name='convnext_base'),
    'large': Variant(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), timm_name='convnext_large'),
    'xlarge': Variant(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048), timm_name='convnext_xlarge'),
    'test': Variant(depths=(1, 2, 4, 2), dims=(24, 32, 48, 64), timm_name='test_convnext'),  # for tests only
}
