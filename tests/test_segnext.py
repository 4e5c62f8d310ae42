"""SegNeXt (MSCAN + LightHamHead): published vectors, parameter counts, shapes, NMF seeding, weight loading."""

import warnings

import pytest
import torch

from conftest import assert_close_to_reference, load_vector
from models.backbones.mscan import MSCAN
from models.heads.ham import NMF2D, LightHamHead
from models.weights import load_pretrained

TINY_CHANNELS = [32, 64, 160, 256]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def part(state: dict, prefix: str) -> dict:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


@pytest.mark.parametrize(
    'name, offset_learning, eval_before_load', [('segnext_t', False, False), ('segnext_t_ol', True, True)]
)
def test_matches_published_vector(name, offset_learning, eval_before_load, monkeypatch):
    d = load_vector(name)
    model = torch.nn.ModuleList([MSCAN('t'), LightHamHead(TINY_CHANNELS, 150, offset_learning=offset_learning)])
    backbone, head = model
    if eval_before_load:  # and never again after loading: nothing derived from the weights may be cached
        model.eval()
    backbone.load_state_dict(MSCAN.convert_checkpoint(part(d['state_dict'], 'backbone.')))
    head.load_state_dict(LightHamHead.convert_checkpoint(part(d['state_dict'], 'decode_head.')))
    if not eval_before_load:
        model.eval()

    drawn, draw = [], head.hamburger.ham.initial_bases

    def recording_draw(*args):
        drawn.append(draw(*args))
        return drawn[-1]

    monkeypatch.setattr(head.hamburger.ham, 'initial_bases', recording_draw)
    classifier_inputs = []
    head.classifier.register_forward_pre_hook(lambda module, args: classifier_inputs.append(args[0]))
    torch.manual_seed(d['nmf_seed'])
    with torch.no_grad():
        features = backbone(d['input'])
        logits = head(features)

    assert torch.equal(drawn[0], d['nmf_bases']), 'the first NMF draw after seeding is not the published one'
    for level, (ours, ref) in enumerate(zip(features, d['features'])):
        assert_close_to_reference(ours, ref, f'{name} feature {level}')
    if offset_learning:
        assert_close_to_reference(classifier_inputs[0], d['ol_input'], f'{name} Offset Learning input')
    assert_close_to_reference(logits, d['logits'], f'{name} logits')


def test_mscan_parameter_counts():
    with torch.device('meta'):
        assert count(MSCAN('t')) == 3_903_584  # the vectors' published backbone, exact
        for variant, millions in (('s', 13.450), ('b', 26.278), ('l', 44.637)):
            assert round(count(MSCAN(variant)) / 1e6, 3) == millions, variant


def test_segnext_t_parameter_counts():
    with torch.device('meta'):
        backbone = MSCAN('t')
        plain = LightHamHead(backbone.out_channels, 150)
        with_ol = LightHamHead(backbone.out_channels, 150, offset_learning=True)
    assert count(backbone) + count(plain) == 4_263_414
    # The published 4,433,186 includes mmseg's conv_seg (150 * 256 + 150 = 38,550), which the OL head
    # builds but never uses; ours does not build it.
    assert count(backbone) + count(with_ol) == 4_433_186 - 38_550


# mmseg 1.x SegNeXt heads: S keeps T's widths, B and L widen ham_channels = channels to 512 / 1024 and
# inherit T's MD_R = 16 (the official repo's B and L use MD_R 64; NMF has no parameters either way).
@pytest.mark.parametrize('variant, width, millions', [('s', 256, 0.483), ('b', 512, 1.358), ('l', 1024, 4.290)])
def test_head_parameter_counts(variant, width, millions):
    with torch.device('meta'):
        channels = MSCAN(variant).out_channels
        head = LightHamHead(channels, 150, ham_channels=width, channels=width, md_r=16)
    assert round(count(head) / 1e6, 3) == millions


@pytest.mark.parametrize('size', [(64, 64), (96, 128)])
def test_forward_shapes(size):
    backbone, head = MSCAN('t').eval(), LightHamHead(TINY_CHANNELS, 19).eval()
    assert backbone.out_channels == TINY_CHANNELS and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, *size))
        logits = head(features)
    for feature, channels, stride in zip(features, backbone.out_channels, backbone.strides):
        assert feature.shape == (2, channels, size[0] // stride, size[1] // stride)
    assert logits.shape == (2, 19, size[0] // 8, size[1] // 8)


def test_nmf_seed_makes_eval_deterministic():
    features = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(TINY_CHANNELS, (4, 8, 16, 32))]
    seeded = LightHamHead(TINY_CHANNELS, 19, nmf_seed=0).eval()
    default = LightHamHead(TINY_CHANNELS, 19).eval()
    default.load_state_dict(seeded.state_dict())
    with torch.no_grad():
        global_rng = torch.get_rng_state()
        first, second = seeded(features), seeded(features)
        assert torch.equal(torch.get_rng_state(), global_rng), 'nmf_seed must not touch the global RNG'
        assert torch.equal(first, second)
        assert not torch.allclose(default(features), default(features))

    x = torch.rand(2, 256, 8, 8)  # in training, nmf_seed changes nothing: both draw from the global RNG
    outputs = []
    for nmf in (NMF2D(seed=0), NMF2D()):
        torch.manual_seed(1)
        outputs.append(nmf.train()(x))
    assert torch.equal(*outputs)


def test_head_gradients_flow_through_nmf():
    head = LightHamHead(TINY_CHANNELS, 19).train()
    features = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(TINY_CHANNELS, (4, 8, 16, 32))]
    head(features).square().mean().backward()
    # ham_in reaches the logits only through the NMF iterations
    assert head.hamburger.ham_in.conv.weight.grad.abs().sum() > 0


def test_official_imagenet_weights_load(tmp_path):
    source = MSCAN('t')
    official = {k.replace('.mlp.dwconv.', '.mlp.dwconv.dwconv.'): v for k, v in source.state_dict().items()}
    official |= {'head.weight': torch.randn(1000, 256), 'head.bias': torch.randn(1000)}
    assert 'block1.0.mlp.dwconv.dwconv.weight' in official
    torch.save({'state_dict': official}, tmp_path / 'mscan_t.pth')

    target = MSCAN('t')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a missing or unexpected key fails the test
        load_pretrained(target, str(tmp_path / 'mscan_t.pth'))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
