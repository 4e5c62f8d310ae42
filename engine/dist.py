"""torchrun plumbing: one process per device, set up from the environment torchrun provides."""

import os

import torch
import torch.distributed as dist


def setup(device_arg: str = 'auto'):
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group:
    NCCL with one GPU per local rank on CUDA, gloo on CPU. Returns (device, rank, world_size)."""
    use_cuda = torch.cuda.is_available() if device_arg == 'auto' else device_arg == 'cuda'
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError('--device cuda was requested but CUDA is not available')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group('nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None)
    return device, rank(), world_size


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
