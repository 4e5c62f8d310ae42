"""Stopping on a signal (engine/preemption.py): the run writes a training checkpoint at the iteration it
stopped at and exits with 128 + the signal, in one line; --resume auto then ends with exactly the model
and optimizer of an uninterrupted run. A run killed outright (SIGKILL) resumes from its last checkpoint
with the losses of an uninterrupted run. Through the real CLI for SIGTERM and SIGKILL, in-process for a
signal that arrives while a checkpoint is written (torchrun: test_distributed.py)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import (
    MAX_ITERS,
    REPO,
    VAL_INTERVAL,
    assert_same_training_state,
    environment,
    logged,
    logged_iterations,
    rectangles_config,
    train_arguments,
    wait_for,
)

import train
from engine import checkpoint as checkpoint_module
from engine.checkpoint import load_checkpoint


@pytest.fixture(scope='module')
def config(tmp_path_factory) -> Path:
    return rectangles_config(tmp_path_factory.mktemp('rectangles'))


@pytest.fixture(scope='module')
def reference(config, tmp_path_factory) -> Path:
    """The work dir of the uninterrupted run."""
    work_dir = tmp_path_factory.mktemp('reference')
    train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu'])
    return work_dir


def train_command(config: Path, work_dir: Path) -> list:
    return [sys.executable, *train_arguments(config, work_dir)]


def test_sigterm_mid_iteration_saves_and_the_run_resumes_exactly(config, reference, tmp_path):
    """Sent while steps run, past the first validation (so the checkpoint is the signal's own)."""
    work_dir = tmp_path / 'run'
    command = train_command(config, work_dir)
    process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: any(i > VAL_INTERVAL for i in logged_iterations(work_dir)), process, 'iteration 6')
    process.send_signal(signal.SIGTERM)
    stdout, stderr = (stream.decode() for stream in process.communicate(timeout=120))
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert 'Traceback' not in stdout + stderr
    (line,) = [line for line in stdout.splitlines() if re.match(r'[\d-]+ [\d:]+  stopped by', line)]  # time-stamped
    stopped_at = int(re.search(r'stopped by SIGTERM at iteration (\d+);', line).group(1))
    assert VAL_INTERVAL < stopped_at < MAX_ITERS and str(work_dir / 'last.pth') in line
    assert load_checkpoint(work_dir / 'last.pth')['iteration'] == stopped_at
    resumed = subprocess.run(
        [*command, '--resume', 'auto'], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed from {work_dir / "last.pth"} at iteration {stopped_at}' in resumed.stdout
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), load_checkpoint(reference / 'last.pth'))


def test_a_killed_run_resumes_with_the_same_losses(config, reference, tmp_path):
    """SIGKILL a run mid-way (after its first checkpoint), resume it with --resume auto: every later
    iteration logs the loss of an uninterrupted run, to the printed digit."""
    work_dir = tmp_path / 'killed'
    command = train_command(config, work_dir)
    killed = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for((work_dir / 'last.pth').exists, killed, 'checkpoint')
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed_from = load_checkpoint(work_dir / 'last.pth')['iteration']
    assert resumed_from < MAX_ITERS, 'the run finished before it could be killed'

    resumed = subprocess.run(
        [*command, '--resume', 'auto'], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (work_dir / 'train.log').read_text()
    after_resume = log[log.index(f'resumed from {work_dir / "last.pth"} at iteration {resumed_from}') :]
    losses = dict(re.findall(rf'iter (\d+)/{MAX_ITERS}: (loss .*?)  lr', after_resume))
    expected = dict(logged(reference, rf'iter (\d+)/{MAX_ITERS}: (loss .*?)  lr'))
    assert sorted(map(int, losses)) == list(range(resumed_from + 1, MAX_ITERS + 1))
    assert losses == {k: expected[k] for k in losses}
    assert load_checkpoint(work_dir / 'last.pth')['best'] == load_checkpoint(reference / 'last.pth')['best']


@pytest.mark.parametrize('stop_signal', [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_while_a_checkpoint_is_written_lets_it_finish(stop_signal, config, reference, tmp_path, monkeypatch):
    """The signal arrives inside torch.save of the first validation's checkpoint: the file is completed
    and renamed into place, the run stops there (no second write), and resuming ends as the
    uninterrupted run. Ctrl-C (SIGINT) stops as SIGTERM does; its resume is the same code, run for SIGTERM."""
    work_dir, real_save, sent = tmp_path / 'run', torch.save, []
    handler = signal.getsignal(stop_signal)

    def save_then_signal(state, file):
        real_save(state, file)
        if 'optimizer' in state and not sent:  # the training checkpoint, before its rename
            sent.append(state['iteration'])
            os.kill(os.getpid(), stop_signal)

    monkeypatch.setattr(checkpoint_module.torch, 'save', save_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu'])
    monkeypatch.undo()
    assert stopped.value.code == 128 + stop_signal and sent == [VAL_INTERVAL]
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['best.pth', f'iter_{VAL_INTERVAL:06d}.pth', 'last.pth']
    assert not list(work_dir.glob('.*.pth.*'))  # nothing half-written
    assert f'stopped by {stop_signal.name} at iteration 5' in (work_dir / 'train.log').read_text()
    assert signal.getsignal(stop_signal) is handler  # the handlers are the caller's again
    if stop_signal != signal.SIGTERM:
        return

    train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu', '--resume', 'auto'])
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), load_checkpoint(reference / 'last.pth'))


def test_checkpoints_between_validations_change_nothing_and_a_run_resumes_from_one(config, reference, tmp_path):
    """train.checkpoint_interval writes the training state between validations (a run killed there loses
    at most that many iterations): the run ends as one without it, and resumed from such a checkpoint
    (the later files gone, as if killed right after it) it ends the same too."""
    work_dir = tmp_path / 'often'
    every_two = ['--set', 'train.checkpoint_interval=2', 'train.keep_checkpoints=0']
    train.main(['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu', *every_two])
    written = sorted(int(p.stem.split('_')[1]) for p in work_dir.glob('iter_*.pth'))
    assert written == [2, 4, 5, 6, 8, 10, 12, 14, 15, 16]
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), load_checkpoint(reference / 'last.pth'))

    for path in work_dir.glob('*.pth'):
        if path.name != 'iter_000004.pth':
            path.unlink()
    train.main(
        ['--config', str(config), '--work-dir', str(work_dir), '--device', 'cpu', *every_two, '--resume', 'auto']
    )
    assert f'resumed from {work_dir / "iter_000004.pth"} at iteration 4' in (work_dir / 'train.log').read_text()
    assert_same_training_state(load_checkpoint(work_dir / 'last.pth'), load_checkpoint(reference / 'last.pth'))
