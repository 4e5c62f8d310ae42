"""OffSeg: EfficientFormerV2 backbone, FreqFusion/CARAFE and OffSegHead against the published code."""

import copy
import itertools
import warnings

import pytest
import torch

from conftest import assert_close_to_reference, load_vector
from models.backbones import efficientformer_v2
from models.backbones.efficientformer_v2 import EfficientFormerV2
from models.heads import freqfusion
from models.heads.freqfusion import carafe
from models.heads.offseg import OffSegHead
from models.weights import load_pretrained

CONV_SEG_150 = 38_550
"""Parameters of mmseg's unused `conv_seg` (256 -> 150, 1x1) that published OffSeg counts include."""

NEW_CHANNELS = {'s1': (32, 32, 64, 128), 's2': (32, 64, 128, 256), 'l': (32, 64, 128, 256)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_offseg_t_matches_reference_vector():
    d = load_vector('offseg_t')
    state = d['state_dict']
    backbone, head = EfficientFormerV2('s1'), OffSegHead([32, 48, 120, 224], 150)
    backbone.eval()  # before loading: nothing derived from the weights may be cached
    head.eval()
    backbone.load_state_dict(
        EfficientFormerV2.convert_checkpoint(
            {k.removeprefix('backbone.'): v for k, v in state.items() if k.startswith('backbone.')}
        ),
        strict=True,
    )
    head.load_state_dict(
        OffSegHead.convert_checkpoint(
            {k.removeprefix('decode_head.'): v for k, v in state.items() if k.startswith('decode_head.')}
        ),
        strict=True,
    )
    seen = {}
    head.classifier.register_forward_hook(lambda module, inputs, output: seen.update(ol_input=inputs[0]))
    with torch.no_grad():
        features = backbone(d['input'])
        logits = head(features)
    assert len(features) == 4
    for level, (ours, ref) in enumerate(zip(features, d['features'])):
        assert_close_to_reference(ours, ref, f'feature {level}')
    assert_close_to_reference(logits, d['logits'], 'logits')
    if 'ol_input' in d:
        assert_close_to_reference(seen['ol_input'], d['ol_input'], 'Offset Learning input')


@pytest.mark.parametrize(
    'variant,backbone_published,total_published,tolerance',
    [
        ('s1', 5_748_360, 6_222_176, 0),  # exact counts (the reference vector's config)
        ('s2', 12_151_000, 12_955_000, 500),  # published to 1k: |ours - published| <= 500
        ('l', 25_578_000, 26_414_000, 500),
    ],
)
def test_parameter_counts(variant, backbone_published, total_published, tolerance):
    # Published totals include the unused conv_seg (38,550 at 150 classes), which we do not build.
    with torch.device('meta'):
        backbone = EfficientFormerV2(variant)
        head = OffSegHead(backbone.out_channels, 150, NEW_CHANNELS[variant])
    assert abs(count(backbone) - backbone_published) <= tolerance
    assert abs(count(backbone) + count(head) - (total_published - CONV_SEG_150)) <= tolerance


@pytest.mark.parametrize('size', [(64, 64), (96, 128)])
def test_forward_shapes(size):
    torch.manual_seed(0)
    backbone = EfficientFormerV2('s1').eval()
    head = OffSegHead(backbone.out_channels, 19).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *size))
        logits = head(features)
    assert backbone.strides == [4, 8, 16, 32]
    for f, c, s in zip(features, backbone.out_channels, backbone.strides):
        assert f.shape == (1, c, size[0] // s, size[1] // s)
    assert logits.shape == (1, 19, size[0] // 4, size[1] // 4)


def test_unsupported_sizes_raise_clear_errors():
    backbone = EfficientFormerV2('s1').eval()
    with pytest.raises(ValueError, match='ceil\\(H/16\\)'):
        backbone(torch.randn(1, 3, 80, 64))  # stride-16 grid 5 rows: odd
    head = OffSegHead(backbone.out_channels, 19).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 120, 64))  # backbone fine (grids 30/15/8/4), head is not
    with pytest.raises(ValueError, match='exactly twice'):
        head(features)


def test_cached_attention_biases_follow_new_weights_and_sizes(monkeypatch):
    """In eval under no_grad the gathered, resized biases are kept; a load_state_dict after a forward
    and an input of another size must still give what a model recomputing them gives, bit for bit
    (in NCHW throughout: the channels_last stem rounds differently)."""
    monkeypatch.setattr(efficientformer_v2, 'CHANNELS_LAST_LAYERS', 0)
    torch.manual_seed(0)
    model = EfficientFormerV2('s0', resolution=64).eval()
    images = (torch.randn(1, 3, 64, 64), torch.randn(1, 3, 128, 96))  # the tables' own size, and a resize
    with torch.no_grad():
        for x in images:
            model(x)
    recomputing = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in recomputing.named_parameters():
            if name.endswith('attention_biases_seg'):
                parameter.normal_()
    model.load_state_dict(recomputing.state_dict())
    for x in (images[1], images[1], images[0]):  # the size cached last first: a stale bias would be used
        with torch.no_grad():
            cached = model(x)
        recomputed = recomputing(x)  # autograd on: nothing is cached
        assert all(torch.equal(a, b) for a, b in zip(cached, recomputed))


def test_channels_last_stem_keeps_the_outputs(monkeypatch):
    """Outside autograd the stem and the conv-only stages run channels_last: the features equal those
    of NCHW throughout up to float rounding, and come out NCHW-contiguous either way."""
    torch.manual_seed(0)
    model = EfficientFormerV2('s1', resolution=64).eval()
    x = torch.randn(1, 3, 128, 96)
    outputs = []
    for layers in (0, efficientformer_v2.CHANNELS_LAST_LAYERS):
        monkeypatch.setattr(efficientformer_v2, 'CHANNELS_LAST_LAYERS', layers)
        with torch.no_grad():
            outputs.append(model(x))
    for nchw, mixed in zip(*outputs):
        assert mixed.is_contiguous()
        torch.testing.assert_close(mixed, nchw, rtol=1e-5, atol=1e-5 * nchw.abs().max().item())


def test_gelu_on_a_channels_last_map_is_nn_gelu_of_the_nchw_map():
    x = torch.randn(2, 16, 8, 8)
    out = efficientformer_v2.GELU()(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(out, torch.nn.GELU()(x)) and out.is_contiguous(memory_format=torch.channels_last)


def test_attention_in_query_blocks_matches_one_block(monkeypatch):
    """Blocks of query rows (here of a single row: a tiny LOGITS_PER_CHUNK) give the attention over
    all rows at once."""
    torch.manual_seed(0)
    model = EfficientFormerV2('s0', resolution=64).eval()
    x = torch.randn(2, 3, 128, 96)
    outputs = []
    for per_chunk in (2**62, 64):
        monkeypatch.setattr(efficientformer_v2, 'LOGITS_PER_CHUNK', per_chunk)
        with torch.no_grad():
            outputs.append(model(x))
    for whole, blocks in zip(*outputs):
        torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)


def naive_carafe(features, masks, k, groups, scale):
    """mmcv's formula term by term: out[c, y, x] = Σ mask[g·k² + i·k + j, y, x] · feat[c, y//s + i − k//2, ...]."""
    n, c, h, w = features.shape
    out = torch.zeros(n, c, h * scale, w * scale, dtype=features.dtype)
    for b, ch, y, x, i, j in itertools.product(
        range(n), range(c), range(h * scale), range(w * scale), range(k), range(k)
    ):
        sy, sx = y // scale + i - k // 2, x // scale + j - k // 2
        if 0 <= sy < h and 0 <= sx < w:
            g = ch // (c // groups)
            out[b, ch, y, x] += masks[b, g * k * k + i * k + j, y, x] * features[b, ch, sy, sx]
    return out


@pytest.mark.parametrize('k,groups,scale', [(3, 1, 1), (5, 1, 1), (3, 1, 2), (5, 1, 2), (3, 2, 2)])
@pytest.mark.parametrize('block_bytes', [None, 1])
def test_carafe_matches_naive_loop(k, groups, scale, block_bytes, monkeypatch):
    """In one pass (autograd on), and outside autograd in blocks of one channel."""
    gen = torch.Generator().manual_seed(k * 10 + scale)
    features = torch.randn(2, 4, 4, 5, generator=gen, dtype=torch.float64)
    masks = torch.randn(2, groups * k * k, 4 * scale, 5 * scale, generator=gen, dtype=torch.float64)
    with torch.set_grad_enabled(block_bytes is None):
        monkeypatch.setattr(freqfusion, 'CARAFE_BLOCK_BYTES', block_bytes or freqfusion.CARAFE_BLOCK_BYTES)
        out = carafe(features, masks, k, groups, scale)
    torch.testing.assert_close(out, naive_carafe(features, masks, k, groups, scale))


def published_backbone_state(model: EfficientFormerV2) -> dict:
    """A random state_dict in published OffSeg naming: ours plus the index buffers and the ImageNet leftovers."""
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for name, index in model.named_buffers():
        if name.endswith('attention_bias_idxs_seg'):
            prefix = name.removesuffix('attention_bias_idxs_seg')
            keys = 49 if index.shape[0] == index.shape[1] else 196  # ImageNet 7x7 / 14x14 key grids
            state[name] = index.clone()
            state[prefix + 'attention_biases'] = torch.zeros(8, keys)
            state[prefix + 'attention_bias_idxs'] = torch.ones(49, keys, dtype=torch.long)
    return state


def test_published_backbone_weights_round_trip(tmp_path):
    state = published_backbone_state(EfficientFormerV2('s0'))
    path = tmp_path / 'offseg_backbone.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in state.items()}}, path)
    model = EfficientFormerV2('s0')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # any missing or unexpected key fails the test
        load_pretrained(model, str(path))
    loaded = model.state_dict()
    assert not any(k.endswith(('attention_biases', 'attention_bias_idxs', 'attention_bias_idxs_seg')) for k in loaded)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_convert_drops_imagenet_classifier_and_checks_indices():
    state = published_backbone_state(EfficientFormerV2('s0'))
    imagenet = dict(
        state,
        **{
            'head.weight': torch.zeros(1000, 176),
            'dist_head.bias': torch.zeros(1000),
            'norm.running_mean': torch.zeros(176),
        },
    )
    assert EfficientFormerV2.convert_checkpoint(imagenet).keys() == EfficientFormerV2('s0').state_dict().keys()
    key = 'network.5.attn.attention_bias_idxs_seg'
    state[key] = state[key].flip(0)
    with pytest.raises(ValueError, match=key):
        EfficientFormerV2.convert_checkpoint(state)
