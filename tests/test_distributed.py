"""train.py as users launch it under torchrun (2 processes, gloo): the steps of one process, and a
group that stops on a signal to one rank and restarts by itself (signals to one process: test_preemption.py).

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
    backbone: {{type: mit, variant: test, drop_path_rate: 0.0}}
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
      keep_checkpoints: 4  # every validation's: the first is compared
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


MAX_ITERS, VAL_INTERVAL = 16, 5
"""The runs of this file and test_preemption.py: validations at 5, 10, 15 and 16, so a run can be stopped
between a validation's checkpoint and the next, with iterations to spare (a step of the test MiT takes
tens of milliseconds)."""


def rectangles_config(folder: Path) -> Path:
    """Rectangles in `folder` and a config of MAX_ITERS iterations on them."""
    write_rectangles(folder, 'train', 16, seed=0)
    write_rectangles(folder, 'val', 5, seed=1)  # odd: the two processes score 3 and 2 images
    return write_config(folder, folder, MAX_ITERS, VAL_INTERVAL)


@pytest.fixture(scope='module')
def config(tmp_path_factory) -> Path:
    return rectangles_config(tmp_path_factory.mktemp('rectangles'))


@pytest.fixture(scope='module')
def torchrun_run(config, tmp_path_factory) -> Path:
    """The work dir of an uninterrupted torchrun run (two processes)."""
    work_dir = tmp_path_factory.mktemp('torchrun') / 'work'
    torchrun_two_processes(config, work_dir)
    return work_dir


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f'the run ended before {what}: {process.communicate()[1][-3000:]}'
        assert time.monotonic() < deadline, f'no {what} within {timeout} s'
        time.sleep(0.02)


def logged_iterations(work_dir: Path) -> list:
    log = work_dir / 'train.log'
    return [int(i) for i in re.findall(r'iter (\d+)/', log.read_text())] if log.exists() else []


def assert_same_training_state(actual: dict, expected: dict) -> None:
    """Every tensor of the model and the optimizer, bit for bit, and the iteration and best scores."""
    assert actual['iteration'] == expected['iteration'] == MAX_ITERS
    assert actual['best'] == expected['best']
    for key, value in expected['model'].items():
        assert torch.equal(actual['model'][key], value), key
    expected_state, actual_state = expected['optimizer']['state'], actual['optimizer']['state']
    assert actual_state.keys() == expected_state.keys() and expected_state
    for index, tensors in expected_state.items():
        for name, value in tensors.items():
            assert torch.equal(actual_state[index][name], value), (index, name)


def test_torchrun_two_processes_take_the_single_process_steps(config, torchrun_run, tmp_path):
    single, ddp = tmp_path / 'single', torchrun_run
    train.main(['--config', str(config), '--work-dir', str(single), '--device', 'cpu'])
    assert '2 process(es) on cpu; batch 4 = 2 x 2' in (ddp / 'train.log').read_text()
    validations = ['iter_000005.pth', 'iter_000010.pth', 'iter_000015.pth', 'iter_000016.pth']
    assert sorted(p.name for p in ddp.glob('*.pth')) == ['best.pth', *validations, 'last.pth']
    assert len(load_checkpoint(ddp / 'last.pth')['rng']) == 2  # both ranks' RNG states: both ran
    # the weights at the first validation (rounding differences grow over more steps: the losses cover those)
    expected, actual = (load_checkpoint(run / f'iter_{VAL_INTERVAL:06d}.pth') for run in (single, ddp))
    for key, value in expected['model'].items():
        torch.testing.assert_close(actual['model'][key], value, rtol=1e-4, atol=1e-6, msg=key)
    torch.manual_seed(0)
    initial = train.create_model(train.load_config(config)).state_dict()
    moved = 'head.align.conv.weight'
    assert not torch.allclose(initial[moved], expected['model'][moved]), 'no step taken: the comparison proves nothing'
    # Losses per iteration agree, and distributed validation counts each of the 5 images once.
    loss = rf'iter (\d+)/{MAX_ITERS}: loss ([\d.]+)'
    np.testing.assert_allclose(
        [float(v) for _, v in logged(ddp, loss)], [float(v) for _, v in logged(single, loss)], rtol=1e-4
    )
    miou = r'iter (\d+): mIoU ([\d.]+)'
    (first, *later), (ddp_first, *ddp_later) = logged(single, miou), logged(ddp, miou)
    assert ddp_first == first == (str(VAL_INTERVAL), first[1]) and len(later) == len(ddp_later) == 3
    np.testing.assert_allclose([float(v) for _, v in ddp_later], [float(v) for _, v in later], atol=0.02)


def children(pid: int) -> list:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rank_of(pid: int) -> int:
    environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    return int(next(v for v in environ if v.startswith(b'RANK=')).split(b'=')[1])


def test_torchrun_processes_stop_together_and_the_restarted_group_resumes_by_itself(config, torchrun_run, tmp_path):
    """SIGTERM to rank 1 alone: both processes agree to stop at one iteration, rank 0 writes the
    checkpoint, and torchrun (--max-restarts 1) starts the group again, which resumes by itself
    (--resume auto) and ends with the uninterrupted torchrun run's model and optimizer."""
    work_dir = tmp_path / 'run'
    command = [*torchrun_command(config, work_dir, '--max-restarts=1'), '--resume', 'auto']
    process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(i > VAL_INTERVAL for i in logged_iterations(work_dir)), process, 'iteration 6')
    (rank_1,) = [pid for pid in children(process.pid) if rank_of(pid) == 1]
    os.kill(rank_1, signal.SIGTERM)
    stdout, stderr = (stream.decode() for stream in process.communicate(timeout=300))
    assert process.returncode == 0, stderr[-3000:]
    log = (work_dir / 'train.log').read_text()
    stopped_at = int(re.search(r'stopped by SIGTERM at iteration (\d+);', log).group(1))
    assert f'resumed from {work_dir / "last.pth"} at iteration {stopped_at}' in log
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), load_checkpoint(torchrun_run / 'last.pth'))


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
