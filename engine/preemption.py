"""Stopping a run when asked: SIGTERM (what Slurm and Kubernetes send before they kill a job), SIGUSR1
(Slurm's `--signal` warning) and SIGINT (Ctrl-C) let the current step finish, then train.py writes a
training checkpoint at that iteration and ends with exit code 128 + the signal's number (143 for
SIGTERM, as a process killed by it reports); `--resume auto` continues exactly from there.

The handlers only take note, so a checkpoint being written when a signal arrives is finished first.
Under torchrun every process must stop at the same iteration (saving is collective), so they agree
after each step over a CPU (gloo) group: no GPU synchronisation. The same signal a second time (Ctrl-C
pressed again) stops at once, without a checkpoint (the last one written is intact); another signal
does not (torchrun answers Ctrl-C by sending SIGTERM to its workers).
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGUSR2', 'SIGINT', 'SIGHUP')
"""The signals a run can be told to stop on (`train.py --stop-signals`)."""
STOP_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGINT')
"""The default ones."""


class StopRequest:
    """The first stop signal this process received (`received`: its number, 0 for none) while the
    handlers are installed (as a context manager)."""

    def __init__(self, names=STOP_SIGNALS):
        self.signals = [signal.Signals[name] for name in names]
        self.received, self.previous, self.group = 0, {}, None

    def __enter__(self) -> 'StopRequest':
        self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        if dist.is_initialized():
            # A CPU group beside NCCL's: agreeing on a flag then costs no wait for the GPU.
            self.group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, frame) -> None:
        if self.received == number:
            print(f'\n{signal.Signals(number).name} again: stopping now, without a checkpoint', file=sys.stderr)
            os._exit(128 + number)
        self.received = self.received or number

    def agreed(self) -> int:
        """The stop signal of any process (the largest number if several), 0 for none; collective."""
        if self.group is None:
            return self.received
        flag = torch.tensor(self.received)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: Slurm signals every process of a job step, and a worker that
    died of it would end the run (PyTorch raises in the main process) before its checkpoint is
    written. Workers end with the main process anyway."""
    for name in SIGNALS:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
