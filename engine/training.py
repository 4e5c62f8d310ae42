"""The rooms of train.py's loop: the training state a checkpoint holds, one optimisation step, the
progress meter, validation with checkpointing, batch arithmetic and the DDP unused-parameter probe
(what the run reports and where: engine/logger.py)."""

import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from models.weights import load_model_weights

from . import dist
from .checkpoint import save_iteration_checkpoint, save_run_checkpoint
from .config import ConfigError
from .evaluation import evaluate
from .inference import normalize
from .logger import FirstSamples, Logger, log_resources, log_validation
from .visualize import ClassStyle


def per_process_batch(train_cfg: dict, world_size: int, source: str) -> int:
    """Images per forward on each process: the global `train.batch_size` over processes and accumulation steps."""
    batch, steps = train_cfg['batch_size'], train_cfg['accum_steps']
    if steps < 1 or batch % (world_size * steps):
        raise ConfigError(
            f'{source}: train.batch_size {batch} (global) does not divide into {world_size} '
            f'process(es) x {steps} accumulation step(s) (train.accum_steps)'
        )
    return batch // (world_size * steps)


def get_rng_state() -> dict:
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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
        images = torch.randn(2, getattr(model, 'in_channels', 3), size, size, device=device)
        outputs = probe(images)  # logits, [logits, aux], or a dict of lists
        sum(output.float().mean() for output in tree_leaves(outputs)).backward()
    return any(p.requires_grad and p.grad is None for p in probe.parameters())


@dataclass
class Best:
    """The best validation so far of the model or of its moving average."""

    miou: float = -1.0
    iteration: int = 0


@dataclass
class EarlyStop:
    """`train.early_stop` (Keras's EarlyStopping): the validations in a row that have not raised the
    delivered model's mIoU (the moving average's, where the run keeps one) by more than `min_delta`
    over the best so far; `patience` of them end the run."""

    best: float = float('-inf')
    waited: int = 0

    def update(self, miou: float, min_delta: float) -> None:
        if miou > self.best + min_delta:
            self.best, self.waited = miou, 0
        else:
            self.waited += 1

    def ran_out(self, patience) -> bool:
        return patience is not None and self.waited >= patience


class TrainState:
    """Everything a resumed run needs to continue exactly: model, EMA, optimizer, schedule, loss scaler,
    iteration, best validations and every process's RNG. Both checkpoint kinds come from here: the
    whole state (`iter_*.pth`, `last.pth`) and the weights of the best validation (`best*.pth`)."""

    def __init__(self, config: dict, model: nn.Module, optimizer, scheduler, scaler, ema=None):
        self.config, self.model, self.ema = config, model, ema
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.iteration = 0
        self.best = {'model': Best(), 'ema': Best()}
        self.early_stop = EarlyStop()
        self.rng = []

    def candidates(self):
        """(name, module) of what is validated: the model (unless `train.validate_raw_weights` is off and
        there is a moving average), and its moving average if there is one."""
        if self.ema is None or self.config['train']['validate_raw_weights']:
            yield 'model', self.model
        if self.ema is not None:
            yield 'ema', self.ema.module

    def state_dict(self) -> dict:
        """The whole state; a collective call (it gathers every process's RNG state)."""
        return {
            'model': self.model.state_dict(),
            'ema': self.ema_state() if self.ema else None,
            'config': self.config,
            'iteration': self.iteration,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'best': {name: asdict(best) for name, best in self.best.items()},
            'early_stop': asdict(self.early_stop),
            'rng': dist.all_gather(get_rng_state()),
        }

    def frozen_ema_part(self) -> dict:
        """The moving average's copy of a frozen backbone's frozen part: the part itself (an average of a
        constant), so checkpoints leave it out and a resume takes it from the model."""
        frozen = self.model.frozen_part()
        if frozen is None:
            return {}
        path = next(name for name, module in self.model.named_modules() if module is frozen)
        return frozen.state_dict(prefix=f'module.{path}.')

    def ema_state(self) -> dict:
        frozen = self.frozen_ema_part()
        return {key: value for key, value in self.ema.state_dict().items() if key not in frozen}

    def load_state_dict(self, checkpoint: dict, source: str) -> None:
        load_model_weights(self.model, checkpoint, source)
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self.scheduler.load_state_dict(checkpoint['scheduler'])
        self.scaler.load_state_dict(checkpoint['scaler'])
        if self.ema and checkpoint.get('ema'):
            self.ema.load_state_dict({**self.frozen_ema_part(), **checkpoint['ema']})
        self.iteration, self.rng = checkpoint['iteration'], checkpoint['rng']
        self.best.update({name: Best(**best) for name, best in checkpoint['best'].items()})
        self.early_stop = EarlyStop(**checkpoint.get('early_stop', {}))  # checkpoints before early stopping lack it

    def best_checkpoint(self, name: str, module: nn.Module) -> dict:
        return {
            'model': module.state_dict(),
            'config': self.config,
            'iteration': self.iteration,
            'miou': self.best[name].miou,
        }

    def seed_processes(self, seed: int, rank: int, world_size: int) -> None:
        """Restore this process's RNG as it was saved, or (a fresh run, or a resume on another number of
        processes) start per-process randomness (dropout, drop path) anew. Call it after the data loader
        has drawn its worker base seed."""
        if len(self.rng) == world_size:
            set_rng_state(self.rng[rank])
        else:
            torch.manual_seed(seed + rank + self.iteration)


class Batches:
    """The training stream: (images, labels) on the device, images normalised and in the model's memory layout."""

    def __init__(self, loader, device: torch.device, mean, std, memory_format=torch.contiguous_format):
        self.batches = iter(loader)  # draws the workers' base seed from the global RNG
        self.device, self.mean, self.std, self.memory_format = device, mean, std, memory_format
        self.waited = 0.0  # seconds spent waiting for the loader since `take_waited`

    def take_waited(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def __next__(self) -> tuple:
        start = time.perf_counter()
        images, labels = next(self.batches)
        self.waited += time.perf_counter() - start
        images = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
        return images.contiguous(memory_format=self.memory_format), labels.to(self.device, non_blocking=True)


def train_step(
    train_model: nn.Module,
    state: TrainState,
    criterion,
    batches: Batches,
    accum_steps: int = 1,
    amp_dtype=None,
    grad_clip=None,
) -> dict:
    """One optimisation step over `accum_steps` micro-batches; returns the loss terms, averaged over the
    micro-batches and left on the device (no host sync). DDP synchronises gradients on the last one only."""
    optimizer, scaler = state.optimizer, state.scaler
    optimizer.zero_grad(set_to_none=True)
    terms_sum = {}
    for step in range(accum_steps):
        images, labels = next(batches)
        accumulating = step < accum_steps - 1 and isinstance(train_model, nn.parallel.DistributedDataParallel)
        with train_model.no_sync() if accumulating else contextlib.nullcontext():
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = train_model(images)
            terms = criterion.terms(outputs, labels)
            scaler.scale(terms['loss'] / accum_steps).backward()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0) + value.detach() / accum_steps
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    state.iteration += 1
    return terms_sum


class ProgressMeter:
    """Loss terms summed on the device between log lines, the first iteration whose loss was not finite,
    the training speed (time spent validating excluded) and the time spent waiting for data."""

    def __init__(self, device: torch.device, batch_size: int):
        self.batch_size = batch_size
        self.first_bad_iter = torch.full((), -1, device=device)
        self.running, self.iterations, self.data_seconds = {}, 0, 0.0
        self.start, self.excluded = time.perf_counter(), 0.0

    def add(self, iteration: int, terms: dict, data_seconds: float = 0.0) -> None:
        for name, value in terms.items():
            self.running[name] = self.running.get(name, 0) + value
        self.first_bad_iter = torch.where(
            (self.first_bad_iter < 0) & ~torch.isfinite(terms['loss']), iteration, self.first_bad_iter
        )
        self.iterations += 1
        self.data_seconds += data_seconds

    def check_finite(self, work_dir: Path) -> None:
        """Raise if the loss went NaN/Inf at some iteration (a host sync: at log and checkpoint time only)."""
        if self.first_bad_iter.item() >= 0:
            raise FloatingPointError(
                f'loss became NaN/Inf at iteration {self.first_bad_iter.item()}; stopping '
                f'(last good checkpoint: {work_dir / "last.pth"})'
            )

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation, checkpointing) does not count towards the training speed."""
        start = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - start

    def take(self) -> tuple:
        """({term: mean over processes and iterations}, images/s, seconds per iteration waiting for data)
        since the last call, and start anew."""
        means = {name: value.item() / self.iterations for name, value in dist.mean_over_processes(self.running).items()}
        speed = self.iterations * self.batch_size / (time.perf_counter() - self.start - self.excluded)
        data_time = self.data_seconds / self.iterations
        self.running, self.iterations, self.data_seconds = {}, 0, 0.0
        self.start, self.excluded = time.perf_counter(), 0.0
        return means, speed, data_time


class RunClock:
    """Where this process's time in the training loop went, for the closing line: the steps (of which
    waiting for data), validation with its pictures and checkpoints, and logging."""

    PARTS = ('steps', 'validation and checkpoints', 'logging')

    def __init__(self):
        self.start, self.waited = time.perf_counter(), 0.0
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start

    def seconds_by_part(self) -> dict:
        """{part: seconds}, with 'waiting for data' (within 'steps'), 'the rest' and 'total'."""
        total = time.perf_counter() - self.start
        rest = total - sum(self.seconds.values())
        return {**self.seconds, 'waiting for data': self.waited, 'the rest': rest, 'total': total}

    def summary(self, seconds: dict) -> str:
        """The closing line of `seconds_by_part`: each part's share of the total."""
        share = {name: f'{100 * value / seconds["total"]:.1f}%' for name, value in seconds.items()}
        return (
            f'time in the loop: {seconds["total"] / 60:.1f} min; steps {share["steps"]} (waiting for data '
            f'{share["waiting for data"]}), validation and checkpoints {share["validation and checkpoints"]}, '
            f'logging {share["logging"]}, the rest {share["the rest"]}'
        )


def validate_and_checkpoint(
    state: TrainState, val_loader, cfg: dict, device, amp_dtype, log: Logger, work_dir: Path, style: ClassStyle
) -> None:
    """Score the model (and its EMA) on the validation set, log the scores and pictures (classes drawn
    in `style`), write `best*.pth` when one improved, count towards early stopping (the last candidate,
    the moving average where there is one, is the delivered model), then the iteration checkpoint
    (rank 0 writes; every process takes part)."""
    log_resources(log, state.iteration, state.optimizer, device)
    for name, module in state.candidates():
        shown = FirstSamples()
        results = evaluate(module, val_loader, cfg, device, amp_dtype, progress=dist.is_main(), on_sample=shown)
        improved = results['mIoU'] > state.best[name].miou
        if improved:
            state.best[name] = Best(results['mIoU'], state.iteration)
        metric_names = cfg['eval']['metrics']
        log_validation(log, state.iteration, name, results, metric_names, state.best[name], style, shown.samples)
        if improved and dist.is_main():
            save_run_checkpoint(state.best_checkpoint(name, module), work_dir / BEST_FILES[name])
    state.early_stop.update(results['mIoU'], cfg['train']['early_stop']['min_delta'])
    save_training_state(state, work_dir, cfg['train']['keep_checkpoints'])


def save_training_state(state: TrainState, work_dir: Path, keep: int) -> None:
    """The iteration checkpoint a run resumes from: rank 0 writes it, every process waits for it."""
    checkpoint = state.state_dict()
    if dist.is_main():
        save_iteration_checkpoint(checkpoint, work_dir, keep)
    dist.barrier()


def checkpointed_at(iteration: int, train_cfg: dict) -> bool:
    """Whether the loop writes the training state at `iteration`: at every validation (each
    `val_interval` and the last iteration) and each `checkpoint_interval` between them."""
    every = [train_cfg['val_interval'], train_cfg['checkpoint_interval'] or 0]
    return iteration == train_cfg['max_iters'] or any(n and iteration % n == 0 for n in every)


BEST_FILES = {'model': 'best.pth', 'ema': 'best_ema.pth'}
