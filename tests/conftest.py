import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
VECTORS = SHARED / 'vectors'
CAMVID = SHARED / 'data' / 'camvid'

sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch.set_num_threads(1)


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
