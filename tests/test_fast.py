"""engine/fast.py: conv+BN folding is exact and only where it is safe, channels_last and compile keep
the outputs, the model handed in (a training model) is never changed, and on CPU freed memory stays
with the process."""

import argparse
import copy
import sys

import pytest
import torch
from torch import nn

from engine import fast
from engine.config import resolve
from engine.fast import (
    find_conv_bn_pairs,
    fold_conv_bn,
    keep_freed_memory,
    on_off_auto,
    prepare_for_inference,
    uses_channels_last,
)
from engine.inference import padded_size
from tools.measure import rss_mb
from train import create_model

FAMILIES = {
    'resnet_deeplabv3plus': (
        {'type': 'resnet', 'variant': 'test'},
        {'type': 'aspp', 'channels': 16, 'dilations': [1, 2], 'c1_channels': 8},
    ),
    'convnext_deeplabv3': (
        {'type': 'convnext', 'variant': 'test'},
        {'type': 'deeplabv3', 'channels': 16, 'dilations': [1, 2]},
    ),
    'mit_segformer_ol': (
        {'type': 'mit', 'variant': 'test'},
        {'type': 'segformer', 'channels': 32, 'offset_learning': True},
    ),
    'mscan_lightham': (
        {'type': 'mscan', 'variant': 'test'},
        {'type': 'ham', 'channels': 32, 'ham_channels': 32, 'md_r': 4, 'nmf_seed': 0},
    ),
    'efficientformerv2_offseg': (
        # bias tables sized for 64x64: exported there, the graph must still resize them at other sizes
        {'type': 'efficientformerv2', 'variant': 'test', 'resolution': 64},  # FreqFusion + Offset Learning
        {'type': 'offseg', 'channels': 32},
    ),
    'resnet_mask2former_ol': (
        {'type': 'resnet', 'variant': 'test'},
        {
            'type': 'mask2former',
            'channels': 32,
            'num_queries': 8,
            'num_decoder_layers': 3,
            'num_encoder_layers': 1,
            'encoder_ffn_channels': 64,
            'decoder_ffn_channels': 64,
            'offset_learning': True,
        },
    ),
    'dinov2_segformer': (
        {'type': 'dinov2', 'variant': 'test'},  # sides of multiples of 28: the probes are rounded up to them
        {'type': 'segformer', 'channels': 16},
    ),
}
"""One small model per backbone family (its test-sized variant) and head type, 5 classes."""
CROPS = {'dinov2_segformer': [56, 56]}
"""Training crops for the families that cannot take the default 512 (a multiple of 28)."""
UNFOLDED_NORMS = {'mscan_lightham', 'dinov2_segformer'}
"""MSCAN's pre-norms (next test) and the ViT pyramid's BatchNorm after a transposed conv stay."""


def tiny_config(family: str) -> dict:
    backbone, head = FAMILIES[family]
    cfg = resolve(
        {
            'backbone': backbone,
            'head': head,
            'data': {
                'type': 'demo',
                'root': 'data/demo',
                'num_classes': 5,
                **(
                    {'train': {'pipeline': [{'type': 'random_crop', 'size': CROPS[family]}]}} if family in CROPS else {}
                ),
            },
            'train': {'max_iters': 1, 'batch_size': 1},
        },
        [],
        source=f'{family} (test)',
    )
    return cfg


def tiny_model(family: str) -> nn.Module:
    """create_model of the family's config with random weights, BN statistics and class embeddings
    drawn so that folding has something to fold and Offset Learning's LayerNorm over the classes
    is well conditioned (at its init, std 0.02, it turns 1e-7 float noise into 1e-5)."""
    torch.manual_seed(0)
    model = create_model(tiny_config(family))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        for name, parameter in model.named_parameters():
            if name.endswith('cls_repr'):
                parameter.normal_()
    return model.eval()


def sample_images(model, dtype=torch.float32) -> torch.Tensor:
    """A 64x96 batch, its sides rounded up to what the backbone's patch grid takes."""
    return torch.randn(1, 3, *padded_size((64, 96), getattr(model.backbone, 'size_multiple', 1)), dtype=dtype)


def relative_difference(actual, expected) -> float:
    """Largest over the outputs (logits, or mask classification's class and mask logits)."""
    pairs = zip(actual, expected) if isinstance(expected, tuple) else [(actual, expected)]
    return max(((a - e).abs().max() / e.abs().max()).item() for a, e in pairs)


def run(model, images):
    torch.manual_seed(0)  # LightHam without nmf_seed would draw here; with it, a no-op
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_folding_keeps_the_outputs(family):
    model = tiny_model(family)
    images = sample_images(model)
    folded = copy.deepcopy(model)
    assert fold_conv_bn(folded) > 0
    if family not in UNFOLDED_NORMS:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert relative_difference(run(folded, images), run(model, images)) < 1e-5


@pytest.mark.parametrize('family', list(FAMILIES))
def test_channels_last_keeps_the_outputs(family):
    """In float64: in float32 the results differ by rounding only, but CPU GroupNorm's channels_last
    kernel rounds worse (OffSeg's head: 1e-5 relative, against 3e-6 contiguous). LightHam's NMF
    draws float32 bases, so that family stays in float32."""
    dtype = torch.float32 if family == 'mscan_lightham' else torch.float64
    model = tiny_model(family).to(dtype)
    images = sample_images(model, dtype)
    fast = prepare_for_inference(model, channels_last=True)
    assert next(p for p in fast.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    assert relative_difference(run(fast, images), run(model, images)) < 1e-5


def test_the_model_handed_in_is_left_unchanged():
    model = tiny_model('resnet_deeplabv3plus').train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_for_inference(model, channels_last=True)
    assert model.training and not fast.training
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert next(model.parameters()).is_contiguous()
    assert len(fast.state_dict()) < len(before)  # BN keys gone: never save a prepared model


def test_lightham_prenorm_batchnorms_are_not_folded():
    """MSCAN's block norms normalise the block input, which also feeds the residual: not foldable."""
    model = tiny_model('mscan_lightham')
    pairs = dict(find_conv_bn_pairs(model, torch.randn(1, 3, 64, 64)))
    assert pairs and not any(bn.endswith(('norm1', 'norm2')) for bn in pairs.values())


class Blocks(nn.Module):
    """Conv+BN arrangements, only the first of which may be folded."""

    def __init__(self):
        super().__init__()

        def pair():
            return nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        self.direct = nn.Sequential(*pair())  # conv -> bn: foldable
        self.conv_act, self.bn_act = pair()  # conv -> relu -> bn
        self.conv_shared_out, self.bn_shared_out = pair()  # conv output also feeds a residual
        self.conv_inplace, self.bn_inplace = pair()  # conv -> in-place add -> bn
        self.conv_twice, self.bn_twice = pair()  # conv called twice
        self.prenorm_conv, self.prenorm = pair()  # bn of the input, then conv

    def forward(self, x):
        x = self.direct(x)
        x = self.bn_act(torch.relu(self.conv_act(x)))
        y = self.conv_shared_out(x)
        x = self.bn_shared_out(y) + y
        y = self.conv_inplace(x)
        x = self.bn_inplace(y.add_(1))
        x = self.bn_twice(self.conv_twice(self.conv_twice(x)))
        return self.prenorm_conv(self.prenorm(x))


def test_only_batchnorms_applied_to_a_conv_output_alone_are_folded():
    torch.manual_seed(0)
    model = Blocks()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.eval()
    images = torch.randn(2, 4, 8, 8)
    assert find_conv_bn_pairs(model, images) == [('direct.0', 'direct.1')]
    folded = prepare_for_inference(model, example=images)
    assert isinstance(folded.direct[1], nn.Identity)
    torch.testing.assert_close(run(folded, images), run(model, images), rtol=1e-5, atol=1e-5)


def test_compile_gives_the_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    fast = prepare_for_inference(model, channels_last=True, compile=True)
    images = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(run(fast, images), run(model, images), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc and /proc: Linux only')
def test_freed_memory_stays_with_the_process_for_the_next_forward():
    """A 64 MB block is over glibc's largest default mmap threshold (32 MiB): by default its memory goes
    back to the kernel on free and the next forward faults it in again; kept, it stays resident."""
    assert keep_freed_memory()
    block = torch.ones(16 * 2**20)
    resident = rss_mb('VmRSS')
    del block
    assert resident - rss_mb('VmRSS') < 16


def test_the_memory_order_is_timed_under_the_autocast_dtype_inference_uses():
    """On CUDA evaluate.py runs under train.amp's autocast, so the probe must time that, not float32."""
    model = tiny_model('mit_segformer_ol').eval()
    seen = []
    model.register_forward_pre_hook(
        lambda module, inputs: seen.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu')))
    )
    images = torch.randn(1, 3, 64, 64)
    fast.channels_last_pays(model, images, rounds=1, amp_dtype=torch.bfloat16)
    assert len(seen) == 4 and set(seen) == {(True, torch.bfloat16)}  # a warm-up and a timed call per order
    seen.clear()
    fast.channels_last_pays(model, images, rounds=1)
    assert len(seen) == 4 and not any(enabled for enabled, _ in seen)


def test_the_memory_order_is_chosen_by_timing_both_when_asked(monkeypatch):
    """channels_last=None times both orders and keeps the faster one; either way the outputs stay."""
    model = tiny_model('mit_segformer_ol')
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model.eval()(images)
    assert isinstance(fast.channels_last_pays(model, images, rounds=1), bool)
    for faster in (True, False):
        monkeypatch.setattr(fast, 'channels_last_pays', lambda model, example, amp_dtype, faster=faster: faster)
        prepared = prepare_for_inference(model, channels_last=None)
        assert uses_channels_last(prepared) == faster
        assert fast.memory_order(prepared) == ('channels_last' if faster else 'NCHW')
        with torch.no_grad():
            torch.testing.assert_close(prepared(images), reference, rtol=1e-4, atol=1e-4)


def test_channels_last_switch_reads_auto_on_off():
    assert [on_off_auto(v) for v in ('auto', 'on', 'off')] == [None, True, False]
    with pytest.raises(argparse.ArgumentTypeError, match="'yes': expected auto, on or off"):
        on_off_auto('yes')
