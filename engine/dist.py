"""torchrun plumbing: one process per device, set up from the environment torchrun provides."""

import datetime
import os

import torch
import torch.distributed as dist

from .config import ConfigError


def setup(device_arg: str = 'auto'):
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group:
    NCCL with one GPU per local rank on CUDA, gloo on CPU. Returns (device, rank, world_size)."""
    use_cuda = torch.cuda.is_available() if device_arg == 'auto' else device_arg == 'cuda'
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError('--device cuda: CUDA is not available on this machine (--device cpu, or auto)')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(
            'nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None, **restart_store(world_size)
        )
    return device, rank(), world_size


def restart_store(world_size: int) -> dict:
    """After a restart (`torchrun --max-restarts`), the process group's keys in torchrun's store under a
    prefix of their own: torchrun keeps one store across restarts, and a process that read a peer's
    address left there by the previous attempt would wait for a process that is gone (seen with
    gloo). Empty (plain env:// init) on the first attempt and outside torchrun."""
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
    if not restart:
        return {}
    agent_serves = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    rank = int(os.environ['RANK'])
    store = dist.TCPStore(
        os.environ['MASTER_ADDR'],
        int(os.environ['MASTER_PORT']),
        world_size,
        is_master=rank == 0 and not agent_serves,
        timeout=datetime.timedelta(minutes=10),
    )
    return {'store': dist.PrefixStore(f'restart_{restart}', store), 'rank': rank, 'world_size': world_size}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_gather(value) -> list:
    """`value` of every process, in rank order (a one-item list without torch.distributed)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_processes(values: dict) -> dict:
    """{name: scalar tensor} averaged over all processes (e.g. each rank's loss, for the log)."""
    if not dist.is_initialized():
        return values
    stacked = torch.stack(list(values.values()))
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / dist.get_world_size()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
