"""The pieces of train.py's loop that are not the loop itself: logging, batch arithmetic, RNG state,
the DDP unused-parameter probe, fine-tuning initialisation and the NaN stop."""
import copy
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from models.pretrained import CheckpointError, load_into, read_state_dict

from .config import ConfigError


class Logger:
    """Console (above the progress bar), work_dir/train.log and TensorBoard, on the main process only."""

    def __init__(self, work_dir):
        self.file = self.writer = None
        if work_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            work_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(work_dir / 'train.log', 'a')
            self.writer = SummaryWriter(str(work_dir / 'tensorboard'))

    def __call__(self, message: str) -> None:
        if self.file:
            tqdm.write(message)
            self.file.write(message + '\n')
            self.file.flush()

    def scalars(self, step: int, values: dict) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.writer.close()


def log_validation(log: Logger, iteration: int, name: str, results: dict, best: tuple, class_names: list) -> None:
    """One line and the scalars (`val/*` for the model, `val_ema/*` for its moving average)."""
    label, prefix = ('', 'val') if name == 'model' else (' (EMA)', 'val_ema')
    log(f"iter {iteration}{label}: mIoU {results['mIoU']:.2f}  mAcc {results['mAcc']:.2f}  "
        f"aAcc {results['aAcc']:.2f}  (best {best[0]:.2f} at {best[1]})")
    log.scalars(iteration, {f'{prefix}/{k}': results[k] for k in ('mIoU', 'mAcc', 'aAcc')})
    log.scalars(iteration, {f'{prefix}/IoU/{c}': iou for c, iou in zip(class_names, results['IoU'])
                            if not math.isnan(iou)})


def per_process_batch(cfg: dict, world_size: int) -> int:
    """Images per forward on each process: the global `train.batch_size` over processes and accumulation steps."""
    batch, steps = cfg['train']['batch_size'], cfg['train']['accum_steps']
    if steps < 1 or batch % (world_size * steps):
        raise ConfigError(f"{cfg['_source']}: train.batch_size {batch} (global) does not divide into {world_size} "
                          f"process(es) x {steps} accumulation step(s) (train.accum_steps)")
    return batch // (world_size * steps)


def resume_path(resume, work_dir: Path):
    """The checkpoint to resume from: the given path, or with 'auto' work_dir/last.pth if the run has one."""
    if resume != 'auto':
        return resume
    last = work_dir / 'last.pth'
    return last if last.is_file() else None


def get_rng_state() -> dict:
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_unused_parameters(model: nn.Module, device: torch.device, size: int = 128) -> bool:
    """Whether some trainable parameter gets no gradient in a training step, which is when DDP needs
    `find_unused_parameters` (it costs a graph traversal per step otherwise). Probed once, on a copy
    with a random batch of two, so the model's weights, BN statistics and the RNG streams are untouched."""
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        outputs = probe(torch.randn(2, 3, size, size, device=device))   # logits, [logits, aux], or a dict of lists
        sum(output.float().mean() for output in tree_leaves(outputs)).backward()
    return any(p.requires_grad and p.grad is None for p in probe.parameters())


def load_weights_from(model: nn.Module, path) -> list:
    """Fine-tuning initialisation from a checkpoint of this repo (train.py or tools/convert_checkpoint.py):
    what fits is loaded; missing, unexpected and shape-mismatched keys (e.g. a classifier for another
    number of classes) are left as initialised and reported. Returns the report lines."""
    state = read_state_dict(path)
    own = model.state_dict()
    if not any(k.startswith('backbone.') and k in own and v.shape == own[k].shape for k, v in state.items()):
        raise CheckpointError(f"{path}: none of its backbone weights fit this model (a checkpoint of another "
                              "architecture? published files need tools/convert_checkpoint.py first)")
    messages = load_into(model, state, str(path), skip_mismatched=True)
    return [f'loaded weights from {path}'] + [f'{path}: {message}' for message in messages]


def stop_if_not_finite(first_bad_iter: torch.Tensor, work_dir: Path) -> None:
    """Raise if the loss went NaN/Inf at some iteration (a host sync: call it at log/checkpoint time only)."""
    if first_bad_iter.item() >= 0:
        raise FloatingPointError(f'loss became NaN/Inf at iteration {first_bad_iter.item()}; stopping '
                                 f'(last good checkpoint: {work_dir / "last.pth"})')
