"""Sampling for iteration-based training and for distributed evaluation."""

import itertools

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """An endless stream of (index, draw) for this process: epoch e is a permutation seeded by
    (seed, e), dealt round-robin over ranks. `draw` is the sample's global position in the stream,
    which seeds its augmentation. Starting at `start` (samples already consumed by this rank)
    continues a resumed run exactly where it stopped. It is DistributedSampler with set_epoch for
    iteration-based training: the same shards and reshuffles, plus a resumable position."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self):
        for position in itertools.count(self.start * self.world_size + self.rank, self.world_size):
            epoch, offset = divmod(position, self.size)
            order = self.permutation(epoch)
            yield int(order[offset]), position

    def permutation(self, epoch: int) -> torch.Tensor:
        if getattr(self, '_epoch', None) != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        return self._order


def shard(size: int, rank: int, world_size: int) -> list:
    """Indices rank, rank + W, ...: every sample evaluated exactly once across processes, no padding."""
    return list(range(rank, size, world_size))
