"""MiT, the SegFormer heads and ConvNeXt: published numbers, shapes at any size, checkpoint key maps."""

import re
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from conftest import VECTORS, assert_close_to_reference, load_vector
from models.backbones.convnext import ConvNeXt
from models.backbones.mit import MiT
from models.heads.segformer import (
    MLP_HEAD_CHANNELS,
    ExtremelyFastSegFormerHead,
    SegFormerHead,
    SegFormerMLPHead,
    UltraFastSegFormerHead,
)
from models.weights import load_pretrained

B0_CHANNELS = [32, 64, 160, 256]
CONV_SEG_150 = 38_550
"""mmseg's unused `conv_seg` (256·150 + 150), counted in the published OL parameter numbers."""


def count(module):
    return sum(p.numel() for p in module.parameters())


def split(state, prefix):
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def strict_load(module, path, part='backbone'):
    """load_pretrained, failing on any missing or unexpected key instead of warning."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_pretrained(module, str(path), part)


# --- (a) published reference vectors ------------------------------------------------------------


@pytest.mark.parametrize('name, offset_learning', [('segformer_b0', False), ('segformer_b0_ol', True)])
def test_segformer_b0_matches_published_code(name, offset_learning):
    d = load_vector(name)
    backbone = MiT('b0')
    head = SegFormerHead(B0_CHANNELS, 150, offset_learning=offset_learning)
    backbone.load_state_dict(MiT.convert_checkpoint(split(d['state_dict'], 'backbone.')), strict=True)
    head.load_state_dict(SegFormerHead.convert_checkpoint(split(d['state_dict'], 'decode_head.')), strict=True)
    backbone.eval()
    head.eval()
    with torch.no_grad():
        features = backbone(d['input'])
        logits = head(features)
        fused = head.fuse(features)
    for level, (ours, ref) in enumerate(zip(features, d['features'], strict=True)):
        assert_close_to_reference(ours, ref, f'{name} features[{level}]')
    assert_close_to_reference(logits, d['logits'], f'{name} logits')
    if 'ol_input' in d:
        assert_close_to_reference(fused, d['ol_input'], f'{name} Offset Learning input')


# --- (b) parameter counts -----------------------------------------------------------------------

MIT_PARAMS_M = {'b0': 3.319, 'b1': 13.151, 'b2': 24.196, 'b3': 44.072, 'b4': 60.843, 'b5': 81.443}
"""MiT encoders alone, as the SegFormer paper counts them."""
OL_PARAMS_M = {'b1': 13.887, 'b2': 24.932, 'b3': 44.807, 'b4': 61.578, 'b5': 82.178}
"""The OffSeg paper's SegFormer + OL with 150 classes, including the unused conv_seg."""
MLP_PARAMS_M = {'b0': 3.753, 'b1': 13.716, 'b2': 27.462, 'b3': 47.338, 'b4': 64.108, 'b5': 84.709}
"""HF SegformerForSemanticSegmentation with 150 classes."""
CONVNEXT_PARAMS_M = {'tiny': 27.82, 'small': 49.45, 'base': 87.56, 'large': 196.23, 'xlarge': 348.14}
"""timm ConvNeXt, features-only."""


def build_on_meta(variant, head=None, **head_args):
    """Shapes without memory or init, so that B5 and ConvNeXt-XL are counted in milliseconds."""
    with torch.device('meta'):
        backbone = MiT(variant)
        return backbone, head and head(backbone.out_channels, 150, **head_args)


@pytest.mark.parametrize('variant', MIT_PARAMS_M)
def test_mit_parameter_count(variant):
    backbone, _ = build_on_meta(variant)
    assert abs(count(backbone) / 1e6 - MIT_PARAMS_M[variant]) < 5e-4


def test_segformer_b0_parameter_counts_are_exact():
    backbone, head = build_on_meta('b0', SegFormerHead)
    assert count(backbone) + count(head) == 3_753_718
    backbone, head = build_on_meta('b0', SegFormerHead, offset_learning=True)
    assert count(backbone) + count(head) == 3_923_490 - CONV_SEG_150


@pytest.mark.parametrize('variant', OL_PARAMS_M)
def test_segformer_offset_learning_parameter_count(variant):
    # the published count for B2 is 24.932 M; ours is 24,931,458 (+ conv_seg), forced by the B2 encoder
    # (24.196 M, as published) plus the head that B1 shares (13.887 M, as published), so the
    # tolerance is one unit of the last published digit.
    backbone, head = build_on_meta(variant, SegFormerHead, offset_learning=True)
    assert abs((count(backbone) + count(head) + CONV_SEG_150) / 1e6 - OL_PARAMS_M[variant]) <= 1e-3


@pytest.mark.parametrize('variant', MLP_PARAMS_M)
def test_segformer_mlp_head_parameter_count(variant):
    backbone, head = build_on_meta(variant, SegFormerMLPHead, channels=MLP_HEAD_CHANNELS[variant])
    assert abs((count(backbone) + count(head)) / 1e6 - MLP_PARAMS_M[variant]) < 5e-4


@pytest.mark.parametrize('variant', CONVNEXT_PARAMS_M)
def test_convnext_parameter_count(variant):
    with torch.device('meta'):
        backbone = ConvNeXt(variant)
    assert abs(count(backbone.body) / 1e6 - CONVNEXT_PARAMS_M[variant]) < 5e-3
    assert count(backbone.norms) == 2 * sum(backbone.out_channels)


# --- (c) shapes at any input size ---------------------------------------------------------------

SIZES = [(64, 64), (96, 128), (100, 75)]


BACKBONES = {
    'mit_b0': (lambda: MiT('b0'), [32, 64, 160, 256], lambda n, s: -(-n // s)),
    'convnext_tiny': (lambda: ConvNeXt('tiny'), [96, 192, 384, 768], lambda n, s: n // s),
}
"""Builder, channels, and the map size at stride s: MiT's patch embeddings pad (ceil), ConvNeXt's
patchify stem and downsampling convs do not (floor)."""


@pytest.fixture(scope='module')
def mit_b0():
    return MiT('b0').eval()


@pytest.mark.parametrize('name', BACKBONES)
def test_backbone_features(name):
    build, channels, size_at = BACKBONES[name]
    backbone = build().eval()
    assert backbone.out_channels == channels and backbone.strides == [4, 8, 16, 32]
    for size in SIZES:
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, *size))
        for feature, c, stride in zip(features, channels, backbone.strides, strict=True):
            assert feature.shape == (1, c, size_at(size[0], stride), size_at(size[1], stride))


HEADS = [(SegFormerHead, 4), (UltraFastSegFormerHead, 8), (ExtremelyFastSegFormerHead, 16), (SegFormerMLPHead, 4)]


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('offset_learning', [False, True])
@pytest.mark.parametrize('head_class, stride', HEADS)
def test_heads_give_logits_at_their_stride(head_class, stride, offset_learning, size, mit_b0):
    head = head_class(B0_CHANNELS, 19, offset_learning=offset_learning).eval()
    with torch.no_grad():
        features = mit_b0(torch.randn(2, 3, *size))
        logits = head(features)
    level = features[mit_b0.strides.index(stride)]
    expected = level.shape[2:]
    if offset_learning and stride == 4:  # OL after a 2x2 max-pool, at stride 8 (floor)
        expected = (expected[0] // 2, expected[1] // 2)
    assert logits.shape == (2, 19, *expected)
    assert logits.min() < 0 < logits.max()


def test_fast_heads_do_a_fraction_of_the_work():
    """MACs (conv and matmul, FlopCounterMode / 2) scale with pixels, so one size tells for all."""
    features = [torch.randn(1, c, 128 // s, 128 // s) for c, s in zip(B0_CHANNELS, [4, 8, 16, 32])]

    def macs(head_class):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            head_class(B0_CHANNELS, 150).eval()(features)
        return counter.get_total_flops() / 2

    full, ultra, extreme = map(macs, (SegFormerHead, UltraFastSegFormerHead, ExtremelyFastSegFormerHead))
    assert ultra < full / 10 and extreme < ultra / 5


# --- (d) checkpoint key maps --------------------------------------------------------------------


def randomized(module):
    """A state_dict of `module` with every float entry random, so a misplaced tensor shows."""
    torch.manual_seed(0)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def rename(state, rules):
    for pattern, replacement in rules:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    return state


def fuse_rows(state, parts, fused):
    """Concatenate e.g. `k_proj.weight` and `v_proj.weight` into one `kv.weight`, as the published MiTs store them."""
    for key in [k for k in state if k.endswith(parts[0])]:
        stem = key.removesuffix(parts[0])
        state[stem + fused] = torch.cat([state.pop(stem + part) for part in parts])
    return state


def stage_plus_one(template):
    return lambda m: template.format(int(m[1]) + 1, *m.groups()[1:])


def to_official(ours):
    """Our MiT keys in NVlabs naming (`mit_b*.pth`), plus its ImageNet classifier."""
    state = {k.removeprefix('segformer.'): v for k, v in ours.items()}
    for suffix in ('weight', 'bias'):
        state = fuse_rows(state, [f'attention.k_proj.{suffix}', f'attention.v_proj.{suffix}'], f'attn.kv.{suffix}')
    state = rename(
        state,
        [
            (r'^stages\.(\d+)\.patch_embeddings\.proj\.', stage_plus_one('patch_embed{}.proj.')),
            (r'^stages\.(\d+)\.patch_embeddings\.layer_norm\.', stage_plus_one('patch_embed{}.norm.')),
            (r'^stages\.(\d+)\.blocks\.(\d+)\.', stage_plus_one('block{}.{}.')),
            (r'^stages\.(\d+)\.layer_norm\.', stage_plus_one('norm{}.')),
            (r'layernorm_before', 'norm1'),
            (r'layernorm_after', 'norm2'),
            (r'attention\.q_proj', 'attn.q'),
            (r'attention\.o_proj', 'attn.proj'),
            (r'attention\.sequence_reduction\.sequence_reduction', 'attn.sr'),
            (r'attention\.sequence_reduction\.layer_norm', 'attn.norm'),
        ],
    )
    return {**state, 'head.weight': torch.randn(1000, 256), 'head.bias': torch.randn(1000)}


def to_mmseg(ours):
    """Our MiT keys in mmseg naming (1x1-conv FFN, nn.MultiheadAttention), as a whole mmseg checkpoint."""
    state = {k.removeprefix('segformer.'): v for k, v in ours.items()}
    state = {k: v[..., None, None] if re.search(r'mlp\.fc[12]\.weight$', k) else v for k, v in state.items()}
    for suffix in ('weight', 'bias'):
        state = fuse_rows(state, [f'attention.{p}_proj.{suffix}' for p in 'qkv'], f'attn.attn.in_proj_{suffix}')
    state = rename(
        state,
        [
            (r'^stages\.(\d+)\.patch_embeddings\.proj\.', r'layers.\1.0.projection.'),
            (r'^stages\.(\d+)\.patch_embeddings\.layer_norm\.', r'layers.\1.0.norm.'),
            (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'layers.\1.1.\2.'),
            (r'^stages\.(\d+)\.layer_norm\.', r'layers.\1.2.'),
            (r'layernorm_before', 'norm1'),
            (r'layernorm_after', 'norm2'),
            (r'attention\.o_proj', 'attn.attn.out_proj'),
            (r'attention\.sequence_reduction\.sequence_reduction', 'attn.sr'),
            (r'attention\.sequence_reduction\.layer_norm', 'attn.norm'),
            (r'mlp\.fc1', 'ffn.layers.0'),
            (r'mlp\.dwconv\.dwconv', 'ffn.layers.1'),
            (r'mlp\.fc2', 'ffn.layers.4'),
        ],
    )
    head = SegFormerHead(B0_CHANNELS, 150).state_dict()
    head = {k.replace('classifier.conv.', 'conv_seg.'): v for k, v in head.items()}
    return {
        'state_dict': {
            **{f'backbone.{k}': v for k, v in state.items()},
            **{f'decode_head.{k}': v for k, v in head.items()},
        }
    }


@pytest.mark.parametrize('naming', [to_official, to_mmseg], ids=['nvlabs', 'mmseg'])
def test_mit_checkpoint_round_trip(naming, tmp_path):
    source = randomized(MiT('b0'))
    saved = naming(source)
    if naming is to_mmseg and (VECTORS / 'segformer_b0.pt').is_file():
        d = load_vector('segformer_b0')  # this mmseg naming must be the published one, key for key
        published = {k: v.shape for k, v in d['state_dict'].items() if k.startswith('backbone.')}
        assert {k: v.shape for k, v in saved['state_dict'].items() if k.startswith('backbone.')} == published
    torch.save(saved, tmp_path / 'mit.pth')
    target = MiT('b0')
    strict_load(target, tmp_path / 'mit.pth')
    for key, value in target.state_dict().items():
        assert torch.equal(value, source[key]), key


HF_4X_NAMES = [
    (r'segformer\.stages\.(\d+)\.patch_embeddings\.', r'segformer.encoder.patch_embeddings.\1.'),
    (r'segformer\.stages\.(\d+)\.blocks\.(\d+)\.', r'segformer.encoder.block.\1.\2.'),
    (r'segformer\.stages\.(\d+)\.layer_norm\.', r'segformer.encoder.layer_norm.\1.'),
    (r'attention\.q_proj', 'attention.self.query'),
    (r'attention\.k_proj', 'attention.self.key'),
    (r'attention\.v_proj', 'attention.self.value'),
    (r'attention\.sequence_reduction\.sequence_reduction', 'attention.self.sr'),
    (r'attention\.sequence_reduction\.layer_norm', 'attention.self.layer_norm'),
    (r'attention\.o_proj', 'attention.output.dense'),
    (r'mlp\.fc1', 'mlp.dense1'),
    (r'mlp\.fc2', 'mlp.dense2'),
    (r'layernorm_before', 'layer_norm_1'),
    (r'layernorm_after', 'layer_norm_2'),
    (r'decode_head\.linear_projections', 'decode_head.linear_c'),
]
"""transformers' conversion_mapping.py renames, reversed: what 4.x saved."""


@pytest.mark.parametrize('version', ['5.x', '4.x'])
def test_hf_segformer_folder_gives_hf_logits(version, tmp_path):
    config = SegformerConfig(num_labels=19)
    hf = SegformerForSemanticSegmentation(config).eval()
    hf.load_state_dict(randomized(hf))
    for module in hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6  # ours, as mmseg; HF's 1e-5 would differ by ~1e-5 relative
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.abs_()
    state = hf.state_dict()
    save_file(rename(state, HF_4X_NAMES) if version == '4.x' else state, tmp_path / 'model.safetensors')
    config.save_pretrained(tmp_path)
    reread, info = SegformerForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())  # transformers itself reads the folder back, 4.x names included
    assert all(torch.equal(v, state[k]) for k, v in reread.state_dict().items())

    backbone, head = MiT('b0').eval(), SegFormerMLPHead(B0_CHANNELS, 19).eval()
    strict_load(backbone, tmp_path)
    strict_load(head, tmp_path, 'head')
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        reference = hf(pixel_values=x).logits
        logits = head(backbone(x))
    assert_close_to_reference(logits, reference, f'HF {version} folder logits')


def to_fb(timm_state):
    """timm ConvNeXt keys in the original facebookresearch naming, wrapped as FB saved them."""
    return {
        'model': rename(
            timm_state,
            [
                (r'^stem\.', 'downsample_layers.0.'),
                (r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'),
                (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.'),
                (r'conv_dw', 'dwconv'),
                (r'mlp\.fc(\d)', r'pwconv\1'),
                (r'^head\.norm\.', 'norm.'),
                (r'^head\.fc\.', 'head.'),
            ],
        )
    }


def to_mmpretrain(timm_state):
    """The FB naming with mmpretrain's block names, as mmseg's ConvNeXt UPerNet checkpoints hold them."""
    fb = to_fb(timm_state)['model']
    return rename(fb, [(r'\.dwconv\.', '.depthwise_conv.'), (r'\.pwconv(\d)\.', r'.pointwise_conv\1.')])


@pytest.mark.parametrize('naming', [dict, to_fb, to_mmpretrain], ids=['timm', 'fb', 'mmpretrain'])
def test_convnext_checkpoint_round_trip(naming, tmp_path):
    source = randomized(timm.create_model('convnext_tiny'))
    torch.save(naming(source), tmp_path / 'convnext.pth')
    target = ConvNeXt('tiny')
    strict_load(target, tmp_path / 'convnext.pth')
    for key, value in target.body.state_dict().items():
        assert torch.equal(value, source[re.sub(r'^(stem|stages)_(\d+)\.', r'\1.\2.', key)]), key
    for norm in target.norms:  # ImageNet checkpoints have no output norms: fresh ones
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
