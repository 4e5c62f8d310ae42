"""Stopping on a signal (engine/preemption.py): the run writes a training checkpoint at the iteration it
stopped at and exits with 128 + the signal, in one line; --resume auto then ends with exactly the model
and optimizer of an uninterrupted run. Through the real CLI (signals to subprocesses, torchrun with two
processes and a restart) and in-process for a signal that arrives while a checkpoint is written."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import REPO, environment, torchrun_command, train_arguments, write_config, write_rectangles

import train
from engine import checkpoint as checkpoint_module
from engine.checkpoint import load_checkpoint

MAX_ITERS, VAL_INTERVAL = 12, 5


@pytest.fixture(scope='module')
def rectangles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('rectangles')
    write_rectangles(root, 'train', 16, seed=0)
    write_rectangles(root, 'val', 3, seed=1)
    return root


@pytest.fixture(scope='module')
def config(rectangles, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp('config'), rectangles, MAX_ITERS, VAL_INTERVAL)


@pytest.fixture(scope='module')
def reference(config, tmp_path_factory) -> dict:
    """The uninterrupted run's final training state."""
    work_dir = tmp_path_factory.mktemp('reference')
    train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu'])
    return load_checkpoint(work_dir / 'last.pth')


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


def train_command(config: Path, work_dir: Path) -> list:
    return [sys.executable, *train_arguments(config, work_dir)]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f'the run ended before {what}: {process.communicate()[1][-3000:]}'
        assert time.monotonic() < deadline, f'no {what} within {timeout} s'
        time.sleep(0.02)


def logged_iterations(work_dir: Path) -> list:
    log = work_dir / 'train.log'
    return [int(i) for i in re.findall(r'iter (\d+)/', log.read_text())] if log.exists() else []


@pytest.mark.parametrize('stop_signal', [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_mid_iteration_saves_and_the_run_resumes_exactly(stop_signal, config, reference, tmp_path):
    """Sent while steps run, past the first validation (so the checkpoint is the signal's own). Ctrl-C
    stops as SIGTERM does; its resume is the same code, run for SIGTERM."""
    work_dir = tmp_path / 'run'
    command = train_command(config, work_dir)
    process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(i > VAL_INTERVAL for i in logged_iterations(work_dir)), process, 'iteration 6')
    process.send_signal(stop_signal)
    stdout, stderr = (stream.decode() for stream in process.communicate(timeout=120))
    assert process.returncode == 128 + stop_signal, stderr[-3000:]
    assert 'Traceback' not in stdout + stderr
    (line,) = [line for line in stdout.splitlines() if re.match(r'[\d-]+ [\d:]+  stopped by', line)]  # time-stamped
    stopped_at = int(re.search(rf'stopped by {stop_signal.name} at iteration (\d+);', line).group(1))
    assert VAL_INTERVAL < stopped_at < MAX_ITERS and str(work_dir / 'last.pth') in line
    assert load_checkpoint(work_dir / 'last.pth')['iteration'] == stopped_at
    if stop_signal != signal.SIGTERM:
        return
    resumed = subprocess.run(
        [*command, '--resume', 'auto'], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed from {work_dir / "last.pth"} at iteration {stopped_at}' in resumed.stdout
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), reference)


def test_a_signal_while_a_checkpoint_is_written_lets_it_finish(config, reference, tmp_path, monkeypatch):
    """SIGTERM arrives inside torch.save of the first validation's checkpoint: the file is completed
    and renamed into place, the run stops there (no second write), and resuming ends as the
    uninterrupted run."""
    work_dir, real_save, sent = tmp_path / 'run', torch.save, []
    handler = signal.getsignal(signal.SIGTERM)

    def save_then_signal(state, file):
        real_save(state, file)
        if 'optimizer' in state and not sent:  # the training checkpoint, before its rename
            sent.append(state['iteration'])
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint_module.torch, 'save', save_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu'])
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM and sent == [VAL_INTERVAL]
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['best.pth', f'iter_{VAL_INTERVAL:06d}.pth', 'last.pth']
    assert not list(work_dir.glob('.*.pth.*'))  # nothing half-written
    assert 'stopped by SIGTERM at iteration 5' in (work_dir / 'train.log').read_text()
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are the caller's again

    train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu', '--resume', 'auto'])
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), reference)


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


def torchrun(config: Path, work_dir: Path, *options: str) -> list:
    return [*torchrun_command(config, work_dir, *options), '--resume', 'auto']


def test_torchrun_processes_stop_together_and_the_restarted_group_resumes_by_itself(config, tmp_path):
    """SIGTERM to rank 1 alone: both processes agree to stop at one iteration, rank 0 writes the
    checkpoint, and torchrun (--max-restarts 1) starts the group again, which resumes by itself
    (--resume auto) and ends with the uninterrupted torchrun run's model and optimizer."""
    uninterrupted = subprocess.run(
        torchrun(config, tmp_path / 'reference'), cwd=REPO, env=environment(), capture_output=True, timeout=300
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    work_dir = tmp_path / 'run'
    command = torchrun(config, work_dir, '--max-restarts=1')
    process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(i > VAL_INTERVAL for i in logged_iterations(work_dir)), process, 'iteration 6')
    (rank_1,) = [pid for pid in children(process.pid) if rank_of(pid) == 1]
    os.kill(rank_1, signal.SIGTERM)
    stdout, stderr = (stream.decode() for stream in process.communicate(timeout=300))
    assert process.returncode == 0, stderr[-3000:]
    log = (work_dir / 'train.log').read_text()
    stopped_at = int(re.search(r'stopped by SIGTERM at iteration (\d+);', log).group(1))
    assert f'resumed from {work_dir / "last.pth"} at iteration {stopped_at}' in log
    assert_same_training_state(
        load_checkpoint(work_dir / 'last.pth'), load_checkpoint(tmp_path / 'reference' / 'last.pth')
    )
