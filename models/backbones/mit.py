"""Mix Transformer (MiT, Xie et al. 2021), the SegFormer encoder, through HF transformers.

Four stages, each an overlapping patch embedding (strided conv + LayerNorm), pre-norm blocks of
efficient self-attention (keys and values from tokens reduced by a strided conv) and Mix-FFN
(Linear, depthwise 3x3 conv, GELU, Linear), then a LayerNorm. Outputs are NCHW at strides
4/8/16/32. The modules are transformers' own (`SegformerModel`), built from a local config, so
our keys are HF 5.x's under `segformer.`; `convert_checkpoint` maps mmseg, official NVlabs and
HF 4.x names onto them.
"""

import re
from typing import NamedTuple

import torch
from torch import nn

from .variants import lookup

LAYER_NORM_EPS = 1e-6
"""mmseg's MiT (`norm_cfg=dict(type='LN', eps=1e-6)`), which trained the OffSeg and model-zoo weights,
uses 1e-6 in every LayerNorm; HF builds them all with 1e-5 and ignores `layer_norm_eps`. The
official NVlabs code uses 1e-6 in the blocks and stage ends, 1e-5 in the patch-embed and
reduction norms, a difference far below training noise."""


class MiT(nn.Module):
    """MiT-B0..B5 feature extractor: (B, 3, H, W) -> four maps with `out_channels` at `strides`."""

    def __init__(self, variant: str = 'b0', drop_path_rate: float = 0.1):
        super().__init__()
        spec = lookup('MiT', VARIANTS, variant)
        from transformers import SegformerConfig, SegformerModel  # imported here: a second of start-up

        config = SegformerConfig(hidden_sizes=spec.hidden_sizes, depths=spec.depths, drop_path_rate=drop_path_rate)
        self.segformer = SegformerModel(config)
        for module in self.segformer.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = LAYER_NORM_EPS
        self.out_channels = list(spec.hidden_sizes)
        self.strides = [4, 8, 16, 32]

    @property
    def checkpoint_blocks(self) -> tuple:
        """backbone.with_cp (models/activation_checkpointing.py): transformers' SegformerLayer."""
        return (type(self.segformer.stages[0].blocks[0]),)

    def forward(self, x: torch.Tensor) -> list:
        # The stages are called one by one rather than through SegformerModel.forward, whose
        # `output_hidden_states` collects the same four maps through forward hooks.
        features = []
        for stage in self.segformer.stages:
            x = stage(x)
            features.append(x)
        return features

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """mmseg, official NVlabs (`mit_b*.pth`) or HF 4.x/5.x weights -> ours; classifiers dropped.

        The four namings share no key, so one ordered list of renames serves them all. Fused
        projections are split by rows (mmseg's `in_proj` = [q; k; v], NVlabs' `kv` = [k; v]) and
        mmseg's 1x1-conv FFN weights become Linear weights. Heads (`head.`, `classifier.`,
        Called by models.weights with the backbone part only (HF keys keep their `segformer.` prefix);
        the ImageNet classifiers (`head.`, `classifier.`) are dropped.
        """
        renamed = {}
        for key, value in state.items():
            key = key.removeprefix('segformer.')
            if key.startswith(DROPPED):
                continue
            for pattern, replacement in RENAMES:
                key = re.sub(pattern, replacement, key)
            if re.search(r'mlp\.fc[12]\.weight$', key):
                value = value.flatten(1)
            renamed[key] = value
        for fused, parts in SPLITS.items():
            for key in [k for k in renamed if k.endswith(fused)]:
                chunks = renamed.pop(key).chunk(len(parts))
                renamed.update({key.removesuffix(fused) + part: chunk for part, chunk in zip(parts, chunks)})
        return {f'segformer.{key}': value for key, value in renamed.items()}


def _stage(template: str):
    """A replacement that writes NVlabs' 1-based stage number as HF's 0-based stage index."""
    return lambda match: template.format(int(match[1]) - 1, *match.groups()[1:])


DROPPED = ('head.', 'classifier.')

RENAMES = [
    # mmseg: layers.{i}.0 = patch embed, layers.{i}.1.{j} = blocks, layers.{i}.2 = stage norm
    (r'^layers\.(\d+)\.0\.projection\.', r'stages.\1.patch_embeddings.proj.'),
    (r'^layers\.(\d+)\.0\.norm\.', r'stages.\1.patch_embeddings.layer_norm.'),
    (r'^layers\.(\d+)\.1\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^layers\.(\d+)\.2\.', r'stages.\1.layer_norm.'),
    (r'\.attn\.attn\.in_proj_', '.attention.in_proj_'),
    (r'\.attn\.attn\.out_proj\.', '.attention.o_proj.'),
    (r'\.ffn\.layers\.0\.', '.mlp.fc1.'),
    (r'\.ffn\.layers\.1\.', '.mlp.dwconv.dwconv.'),
    (r'\.ffn\.layers\.4\.', '.mlp.fc2.'),
    # official NVlabs: patch_embed{s}, block{s}.{j}, norm{s} with s = 1..4
    (r'^patch_embed(\d)\.proj\.', _stage('stages.{}.patch_embeddings.proj.')),
    (r'^patch_embed(\d)\.norm\.', _stage('stages.{}.patch_embeddings.layer_norm.')),
    (r'^block(\d)\.(\d+)\.', _stage('stages.{}.blocks.{}.')),
    (r'^norm(\d)\.', _stage('stages.{}.layer_norm.')),
    (r'\.attn\.q\.', '.attention.q_proj.'),
    (r'\.attn\.kv\.', '.attention.kv.'),
    (r'\.attn\.proj\.', '.attention.o_proj.'),
    # shared by mmseg and NVlabs
    (r'\.norm1\.', '.layernorm_before.'),
    (r'\.norm2\.', '.layernorm_after.'),
    (r'\.attn\.sr\.', '.attention.sequence_reduction.sequence_reduction.'),
    (r'\.attn\.norm\.', '.attention.sequence_reduction.layer_norm.'),
    # HF 4.x (what transformers' conversion_mapping.py renames on load)
    (r'^encoder\.patch_embeddings\.(\d+)\.', r'stages.\1.patch_embeddings.'),
    (r'^encoder\.block\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^encoder\.layer_norm\.(\d+)\.', r'stages.\1.layer_norm.'),
    (r'\.attention\.self\.query\.', '.attention.q_proj.'),
    (r'\.attention\.self\.key\.', '.attention.k_proj.'),
    (r'\.attention\.self\.value\.', '.attention.v_proj.'),
    (r'\.attention\.self\.sr\.', '.attention.sequence_reduction.sequence_reduction.'),
    (r'\.attention\.self\.layer_norm\.', '.attention.sequence_reduction.layer_norm.'),
    (r'\.attention\.output\.dense\.', '.attention.o_proj.'),
    (r'\.mlp\.dense1\.', '.mlp.fc1.'),
    (r'\.mlp\.dense2\.', '.mlp.fc2.'),
    (r'\.layer_norm_1\.', '.layernorm_before.'),
    (r'\.layer_norm_2\.', '.layernorm_after.'),
]
"""Applied in order to every key; HF 5.x keys match none of them."""

SPLITS = {
    '.in_proj_weight': ('.q_proj.weight', '.k_proj.weight', '.v_proj.weight'),
    '.in_proj_bias': ('.q_proj.bias', '.k_proj.bias', '.v_proj.bias'),
    '.kv.weight': ('.k_proj.weight', '.v_proj.weight'),
    '.kv.bias': ('.k_proj.bias', '.v_proj.bias'),
}


# All variants: heads (1, 2, 5, 8), reduction ratios (8, 4, 2, 1), MLP ratio 4, patches (7, 3, 3, 3).
class Variant(NamedTuple):
    hidden_sizes: tuple  # channels per stage
    depths: tuple  # blocks per stage


VARIANTS = {
    'b0': Variant(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    'b1': Variant(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    'b2': Variant(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    'b3': Variant(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    'b4': Variant(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    'b5': Variant(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
    'test': Variant(hidden_sizes=(16, 32, 80, 128), depths=(1, 1, 1, 1)),  # for tests only
}
