import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
VECTORS = SHARED / 'vectors'
CAMVID = SHARED / 'data' / 'camvid'
INTERPRETER_DIR = os.path.dirname(sys.executable)
"""A PATH on which `python` is the interpreter running the tests (and so its virtual environment)."""

sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ['OMP_NUM_THREADS'] = '1'  # also for the scripts tests run as subprocesses: one core per worker
torch.set_num_threads(1)


TINY_DATA = """
    data:
      type: demo
      root: {root}
      num_classes: 5
      workers: 0
      train:
        pipeline:
          - {{type: random_resize, scale: [128, 128], ratio_range: [0.5, 1.0]}}
          - {{type: random_crop, size: [64, 64]}}
          - {{type: random_flip}}
          - {{type: pad, size: [64, 64]}}
      val:
        pipeline: [{{type: resize, scale: [64, 64], keep_ratio: false}}]
"""
"""The generated scenes at 64x64 (validated at 64x64 too, scored at their 128x128), for tiny runs of any model."""

TINY = (
    """
    backbone: {{type: resnet, variant: test}}
    head: {{type: aspp, channels: 16, dilations: [1, 2], c1_channels: 8}}"""
    + TINY_DATA
    + """\
    train: {{max_iters: 6, batch_size: 4, val_interval: 3, log_interval: 2}}
"""
)
"""A tiny run on the demo scenes (timm's few-channel test ResNet + DeepLabV3+); `.format(root=...)` gives its YAML."""


MULTI_PROCESS_FILES = ('test_preemption.py', 'test_distributed.py', 'test_mask2former_training.py', 'test_ablation.py')
"""The files whose tests run trainings in several processes: marked `slow`, and scheduled first, so
that the two workers end on short tests instead of one of them finishing a long file alone."""

SHARED_SETUP_FILES = (
    *MULTI_PROCESS_FILES,
    'test_eomt.py',
    'test_visualize.py',
    'test_end_to_end.py',
    'test_mask2former.py',
    'test_bad_input.py',
)
"""The files whose module-scoped fixtures take seconds (a training, a conversion): each runs on one
worker (an xdist group), so the fixture runs once; every other test goes to whichever worker is free."""


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in MULTI_PROCESS_FILES:
            item.add_marker(pytest.mark.slow)
        if item.path.name in SHARED_SETUP_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items.sort(key=lambda item: item.path.name not in MULTI_PROCESS_FILES)  # stable: file order kept otherwise


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory) -> Path:
    """The demo scenes, generated once per test process, for the tests that only read them."""
    from datasets.demo import generate

    root = tmp_path_factory.mktemp('scenes') / 'demo'
    generate(root)
    return root


def input_sizes(family: str) -> list:
    """Two input sizes (square, and not) every test-sized variant of a backbone family takes: multiples
    of its coarsest stride, 32, or DINOv2's 28 (twice its patch of 14)."""
    unit = 28 if family == 'dinov2' else 32
    return [(2 * unit, 2 * unit), (3 * unit, 4 * unit)]


def load_vector(name: str) -> dict:
    """A reference vector from ../shared/vectors with its bf16 weights cast to float32; skips if absent."""
    path = VECTORS / f'{name}.pt'
    if not path.is_file():
        pytest.skip(f'reference vector {path} not available')
    data = torch.load(path, weights_only=True)
    data['state_dict'] = {k: v.float() if v.is_floating_point() else v for k, v in data['state_dict'].items()}
    return data


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The vectors' tolerance: max |ours - ref| <= 1e-4 * max |ref|."""
    assert ours.shape == ref.shape, f'{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}'
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f'{what}: max abs diff {err:.3g} > 1e-4 * {scale:.3g}'


def published_offset_learning_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Offset Learning in the official code's order of operations: the offsets ΔE (HW, C) and ΔW are
    formed, then the scores (E+ΔE)·(W+ΔW)ᵀ. The module reassociates these products; this reference
    shows it gives the same numbers and, counted, the published number of MACs."""
    b, c, h, w = x.shape
    feats = x.flatten(2).transpose(1, 2)  # E: (B, HW, C)
    classes = module.cls_repr.expand(b, -1, -1)  # W: (B, K, C)
    attn = classes @ feats.transpose(1, 2)  # A: (B, K, HW)
    class_offset = torch.nn.functional.linear(attn.softmax(dim=-1) @ feats, module.cls_offset_proj.weight)
    feat_offset = torch.nn.functional.linear(
        attn.softmax(dim=1).transpose(1, 2) @ classes, module.feat_offset_proj.weight
    )
    masks = module.mask_norm((feats + feat_offset) @ (classes + class_offset).transpose(1, 2))
    return masks.transpose(1, 2).reshape(b, -1, h, w)
