"""train.py as users launch it: under torchrun (2 processes, gloo) and killed with SIGKILL then resumed.

The model has no batch statistics (MiT + the OffSeg head: LayerNorm and GroupNorm only) and no
dropout, and the data no ignored pixels, so two processes with half the batch each must take the
same steps as one process with the whole batch.
"""

import copy
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import train
from engine.checkpoint import load_checkpoint
from engine.training import has_unused_parameters

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
    backbone: {{type: mit, variant: b0, drop_path_rate: 0.0}}
    head: {{type: offseg, dropout: 0.0}}
    data:
      type: folder
      root: {root}
      num_classes: 3
      workers: 0
      train: {{pipeline: [{{type: random_flip}}]}}
    train:
      max_iters: {max_iters}
      batch_size: 4
      val_interval: {val_interval}
      log_interval: 1
      optimizer: {{type: sgd, lr: 0.01, weight_decay: 0.0001}}
    eval: {{size_divisor: 32}}
"""


def write_rectangles(root: Path, split: str, count: int, seed: int) -> None:
    """Images of a few coloured rectangles on a grey ground; the label is the rectangle's class (no ignore)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[90, 90, 90], [220, 40, 40], [40, 40, 220]], np.uint8)
    (root / 'images' / split).mkdir(parents=True)
    (root / 'annotations' / split).mkdir(parents=True)
    for i in range(count):
        label = np.zeros((64, 64), np.uint8)
        for cls in rng.integers(1, 3, size=3):
            y, x = rng.integers(0, 48, size=2)
            label[y : y + rng.integers(8, 16), x : x + rng.integers(8, 16)] = cls
        image = colours[label] + rng.integers(0, 30, size=(64, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(root / 'images' / split / f'{i:03d}.png'), image[..., ::-1])
        cv2.imwrite(str(root / 'annotations' / split / f'{i:03d}.png'), label)


@pytest.fixture(scope='module')
def rectangles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('rectangles')
    write_rectangles(root, 'train', 16, seed=0)
    write_rectangles(root, 'val', 5, seed=1)  # odd: the two processes score 3 and 2 images
    return root


def write_config(folder: Path, root: Path, max_iters: int, val_interval: int) -> Path:
    config = folder / 'rectangles.yaml'
    config.write_text(textwrap.dedent(CONFIG.format(root=root, max_iters=max_iters, val_interval=val_interval)))
    return config


def environment() -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(REPO)}


def train_arguments(config, work_dir) -> list:
    """train.py and its arguments for a run of `config` in `work_dir` on the CPU."""
    return [str(REPO / 'train.py'), '--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu']


def torchrun_command(config, work_dir, *options: str) -> list:
    """train.py under `torchrun --nproc_per_node=2` (gloo on the CPU), with torchrun's `options`."""
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *options]
    return [*torchrun, *train_arguments(config, work_dir)]


def torchrun_two_processes(config, work_dir, timeout: int = 300) -> None:
    """train.py under torchrun with two processes; fails the test if it fails."""
    result = subprocess.run(
        torchrun_command(config, work_dir), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


def logged(work_dir: Path, pattern: str) -> list:
    return re.findall(pattern, (work_dir / 'train.log').read_text())


def test_torchrun_two_processes_take_the_single_process_steps(rectangles, tmp_path):
    config = write_config(tmp_path, rectangles, max_iters=4, val_interval=4)
    train.main(['--config', str(config), '--work-dir', str(tmp_path / 'single'), '--device', 'cpu'])
    torchrun_two_processes(config, tmp_path / 'ddp')

    single, ddp = tmp_path / 'single', tmp_path / 'ddp'
    assert '2 process(es) on cpu; batch 4 = 2 x 2' in (ddp / 'train.log').read_text()
    assert sorted(p.name for p in ddp.glob('*.pth')) == ['best.pth', 'iter_000004.pth', 'last.pth']
    expected, actual = load_checkpoint(single / 'last.pth'), load_checkpoint(ddp / 'last.pth')
    assert actual['iteration'] == 4 and len(actual['rng']) == 2  # both ranks' RNG states: both ran
    for key, value in expected['model'].items():
        torch.testing.assert_close(actual['model'][key], value, rtol=1e-4, atol=1e-6, msg=key)
    torch.manual_seed(0)
    initial = train.create_model(train.load_config(config)).state_dict()
    moved = 'head.align.conv.weight'
    assert not torch.allclose(initial[moved], expected['model'][moved]), 'no step taken: the comparison proves nothing'
    # Losses per iteration agree, and distributed validation counts each of the 5 images once.
    loss = r'iter (\d+)/4: loss ([\d.]+)'
    np.testing.assert_allclose(
        [float(v) for _, v in logged(ddp, loss)], [float(v) for _, v in logged(single, loss)], rtol=1e-4
    )
    miou = r'iter 4: mIoU ([\d.]+)'
    assert logged(ddp, miou) == logged(single, miou)


def test_killed_run_resumes_with_the_same_losses(rectangles, tmp_path):
    """SIGKILL a run mid-way (after its first checkpoint), resume it with --resume auto: every later
    iteration logs the loss of an uninterrupted run, to the printed digit."""
    iters = 12
    config = write_config(tmp_path, rectangles, max_iters=iters, val_interval=4)

    def launch(work_dir: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                str(REPO / 'train.py'),
                '--config',
                str(config),
                '--work-dir',
                str(tmp_path / work_dir),
                '--device',
                'cpu',
                *extra,
            ],
            cwd=REPO,
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    reference, killed = launch('reference'), launch('killed')
    deadline = time.monotonic() + 240
    while not (tmp_path / 'killed' / 'last.pth').exists():
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        assert time.monotonic() < deadline, 'no checkpoint within 240 s'
        time.sleep(0.05)
    assert killed.poll() is None, 'the run finished before it could be killed'
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed_from = load_checkpoint(tmp_path / 'killed' / 'last.pth')['iteration']
    assert resumed_from < iters

    resumed = launch('killed', '--resume', 'auto')
    for process in (reference, resumed):
        assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    log = (tmp_path / 'killed' / 'train.log').read_text()
    after_resume = log[log.index(f'resumed from {tmp_path / "killed" / "last.pth"} at iteration {resumed_from}') :]
    losses = dict(re.findall(rf'iter (\d+)/{iters}: (loss .*?)  lr', after_resume))
    expected = dict(logged(tmp_path / 'reference', rf'iter (\d+)/{iters}: (loss .*?)  lr'))
    assert sorted(map(int, losses)) == list(range(resumed_from + 1, iters + 1))
    assert losses == {k: expected[k] for k in losses}
    assert (
        load_checkpoint(tmp_path / 'killed' / 'last.pth')['best']
        == load_checkpoint(tmp_path / 'reference' / 'last.pth')['best']
    )


def test_ddp_searches_for_unused_parameters_only_when_a_step_leaves_some_without_gradient():
    class TwoBranches(torch.nn.Module):
        def __init__(self, use_both: bool):
            super().__init__()
            self.use_both = use_both
            self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            self.b = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.a(x) + self.b(x) if self.use_both else self.a(x)

    model, one_branch = TwoBranches(use_both=True), TwoBranches(use_both=False)
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    assert not has_unused_parameters(model, torch.device('cpu'))
    assert has_unused_parameters(one_branch, torch.device('cpu'))
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the model and the RNG as they were
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
