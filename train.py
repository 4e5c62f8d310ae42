"""Train a semantic-segmentation model described by one YAML file.

    python train.py --config configs/demo.yaml [--work-dir DIR] [--set train.max_iters=200 ...]
    torchrun --nproc_per_node=8 train.py --config configs/offseg_b.yaml
    python train.py --config configs/demo.yaml --resume auto          # continue exactly after a stop or kill
    python train.py --config configs/camvid.yaml --load-from CKPT     # fine-tune from a checkpoint's weights

SIGTERM, SIGUSR1 and SIGINT (Ctrl-C; --stop-signals) finish the current step, write a training
checkpoint at that iteration and end the run with exit code 128 + the signal's number: what a cluster
sends before it preempts a job. --resume auto then continues exactly (engine/preemption.py).

The factories below map the config to models; the rest of the file is the training loop.
"""

import contextlib
import datetime
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from datasets.sampler import TrainSampler, shard
from engine import dist
from engine.checkpoint import (
    claim_work_dir,
    load_checkpoint,
    remove_partial_writes,
    resume_checkpoint,
    run_manifest,
)
from engine.cli import ArgumentParser, amp_dtype_for, config_for_checkpoint, run_cli
from engine.config import choose, dump_config
from engine.data import build_dataset
from engine.logger import METRICS_FILE, Logger, peak_memory, progress_bar
from engine.losses import build_criterion, resolve_class_weight, uses_set_prediction_loss
from engine.optim import anneal_attention_masks, build_ema, build_optimizer, build_scheduler, step_lr
from engine.preemption import SIGNALS, STOP_SIGNALS, StopRequest, ignore_stop_signals
from engine.rules import (
    check_trackers_installed,
    check_training_batch,
    load_config,
    pretrained_file,
    section_kwargs,
    training_warnings,
    with_model_defaults,
)
from engine.training import (
    Batches,
    ProgressMeter,
    RunClock,
    TrainState,
    checkpointed_at,
    count_params,
    has_unused_parameters,
    per_process_batch,
    save_training_state,
    train_step,
    validate_and_checkpoint,
)
from engine.visualize import ClassStyle
from models import BACKBONES, HEADS, Segmentor
from models.activation_checkpointing import enable_activation_checkpointing
from models.input_channels import take_input_channels
from models.weights import load_model_weights, load_pretrained, load_weights_from

__all__ = ['load_config', 'create_backbone', 'get_backbone_channels', 'create_head', 'create_model', 'load_trained']


# ----------------------------------------------------------------------------------------- factories


def create_backbone(cfg: dict) -> nn.Module:
    """The backbone named by `backbone.type` for images of `data.in_channels` bands, with
    `backbone.pretrained` weights loaded if given (an RGB input kernel inflated to the bands), and its
    blocks' activations recomputed in the backward pass with `backbone.with_cp`."""
    cls = choose('backbone', cfg['backbone']['type'], BACKBONES, 'config')
    backbone = cls(**section_kwargs(cfg, 'backbone'))
    if cfg['data']['in_channels'] != 3:
        take_input_channels(backbone, cfg['data']['in_channels'])
    pretrained = pretrained_file(cfg['backbone'])
    if pretrained:
        load_pretrained(backbone, pretrained)
    if cfg['backbone']['with_cp']:
        enable_activation_checkpointing(backbone)
    return backbone


def get_backbone_channels(cfg: dict) -> list:
    """Channels of the 4 maps, read from the backbone itself (built on the meta device: no memory, no weights)."""
    cls = choose('backbone', cfg['backbone']['type'], BACKBONES, 'config')
    with torch.device('meta'):
        return list(cls(**section_kwargs(cfg, 'backbone')).out_channels)


def create_head(cfg: dict, in_channels: list, num_classes: int, section: str = 'head') -> nn.Module:
    """The head named by `<section>.type`; its other keys are the head's constructor arguments."""
    cls = choose(section, cfg[section]['type'], HEADS, 'config')
    return cls(in_channels, num_classes, **section_kwargs(cfg, section))


def create_model(cfg: dict) -> Segmentor:
    """Backbone + head (+ auxiliary head). In eval mode: normalised (B,3,H,W) -> logits at the head's stride.
    The heads are sized from the built backbone (get_backbone_channels would build it a second time)."""
    backbone, num_classes = create_backbone(cfg), cfg['data']['num_classes']
    channels = list(backbone.out_channels)
    aux_head = create_head(cfg, channels, num_classes, 'aux_head') if cfg['aux_head'] else None
    head = create_head(cfg, channels, num_classes)
    return Segmentor(backbone, head, aux_head, frozen_backbone=cfg['backbone']['frozen'])


def load_trained(checkpoint, config=None, overrides=()) -> tuple:
    """(model, cfg): a trained model ready for inference (its weights loaded, in eval mode, on the CPU)
    and its resolved config, which is `config` if given, else the one the checkpoint stores, with
    `overrides`. What evaluate.py, infer.py and the export tool start from."""
    stored = load_checkpoint(checkpoint)
    cfg = config_for_checkpoint(stored, checkpoint, config, overrides)
    model = create_model(cfg)
    load_model_weights(model, stored, str(checkpoint))
    return model.eval(), cfg


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--config', required=True, help='YAML file describing the run')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: output.work_dir)')
    parser.add_overrides()
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument(
        '--resume',
        metavar='CKPT|DIR|auto',
        help='continue a run exactly: a training checkpoint, a run folder (its newest intact checkpoint) '
        "or 'auto' (this work dir's, if there is one)",
    )
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help="start afresh in a work dir that holds another run's checkpoints (deletes them)",
    )
    parser.add_argument(
        '--load-from',
        metavar='CKPT',
        help='initialise the weights from a checkpoint (fine-tuning: a fresh optimizer and schedule; '
        'ignored when resuming)',
    )
    parser.add_argument(
        '--stop-signals',
        nargs='+',
        choices=SIGNALS,
        default=list(STOP_SIGNALS),
        metavar='SIGNAL',
        help=f'signals that end the run with a checkpoint at the current iteration (default: {" ".join(STOP_SIGNALS)}; '
        f'any of {", ".join(SIGNALS)})',
    )
    return parser.parse_args(argv)


@dataclass
class Run:
    """Where and how this process trains."""

    work_dir: Path
    device: torch.device
    rank: int
    world_size: int
    micro_batch: int
    amp_dtype: torch.dtype = None
    memory_format: torch.memory_format = torch.contiguous_format


def start_run(args, cfg: dict) -> Run:
    """Work dir, device and processes (torchrun's environment), and each process's share of the batch."""
    work_dir = Path(args.work_dir or cfg['output']['work_dir'] or Path('work_dirs') / Path(args.config).stem)
    device, rank, world_size = dist.setup(args.device)
    return Run(
        work_dir,
        device,
        rank,
        world_size,
        per_process_batch(cfg['train'], world_size, args.config),
        amp_dtype_for(cfg, device),
        torch.channels_last if cfg['train']['channels_last'] else torch.contiguous_format,
    )


def run_config(cfg: dict, run: Run, train_set) -> dict:
    """The config as stored in the work dir and in checkpoints: the resolved one, with the model's
    constructor defaults, the work dir and the dataset's class names and palette filled in, so that it
    shows every setting the run used and evaluate.py and infer.py need nothing else."""
    stored = with_model_defaults(cfg)
    stored['output']['work_dir'] = str(run.work_dir)
    stored['data']['class_names'], stored['data']['palette'] = train_set.class_names, train_set.palette.tolist()
    return stored


def build_model(cfg: dict, run: Run, load_from=None) -> nn.Module:
    """The model on the device, initialised by the seed (and from `load_from`'s weights if given)."""
    torch.manual_seed(cfg['train']['seed'])
    model = create_model(cfg).to(run.device, memory_format=run.memory_format)
    if load_from:
        load_weights_from(model, load_from)
    return model


def build_train_state(cfg: dict, run: Run, model: nn.Module) -> tuple:
    """(TrainState, table of parameter groups): SyncBatchNorm on multi-GPU, EMA, optimizer, schedule, scaler."""
    train_cfg = cfg['train']
    if run.world_size > 1 and run.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer, groups_table = build_optimizer(
        model,
        train_cfg['optimizer'],
        train_cfg['param_groups'],
        train_cfg['layer_decay'],
        split_backbone=train_cfg['schedule']['backbone_warmup'] is not None,
    )
    scheduler = build_scheduler(optimizer, train_cfg['max_iters'], train_cfg['schedule'])
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    ema = build_ema(model, train_cfg['ema_decay']) if train_cfg['ema_decay'] else None
    return TrainState(cfg, model, optimizer, scheduler, scaler, ema), groups_table


def build_loaders(cfg: dict, run: Run, train_set, val_set, start_iter: int) -> tuple:
    """The training loader (resumable: it skips the samples of the first `start_iter` iterations) and
    this process's shard of the validation set."""
    options = dict(
        num_workers=cfg['data']['workers'],
        pin_memory=run.device.type == 'cuda',
        persistent_workers=cfg['data']['workers'] > 0,
        worker_init_fn=ignore_stop_signals,
    )
    samples_per_iter = run.micro_batch * cfg['train']['accum_steps']
    sampler = TrainSampler(
        len(train_set), cfg['train']['seed'], run.rank, run.world_size, start=start_iter * samples_per_iter
    )
    train_loader = DataLoader(train_set, batch_size=run.micro_batch, sampler=sampler, **options)
    val_loader = DataLoader(Subset(val_set, shard(len(val_set), run.rank, run.world_size)), batch_size=1, **options)
    return train_loader, val_loader


def wrap_for_processes(model: nn.Module, run: Run, find_unused: bool) -> nn.Module:
    """The module the step runs: the model itself, or DDP around it under torchrun."""
    if run.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device] if run.device.type == 'cuda' else None, find_unused_parameters=find_unused
    )


def prepare_work_dir(run: Run, stored: dict, log: Logger) -> None:
    if dist.is_main():
        run_manifest(run.work_dir).record(run.work_dir / METRICS_FILE)  # the run's: --overwrite removes it
        dump_config(stored, run.work_dir / 'config.yaml')
        log.config(stored, run.work_dir / 'config.yaml')
        remove_partial_writes(run.work_dir)


def describe_run(
    cfg: dict, run: Run, state: TrainState, groups_table: str, train_set, val_set, find_unused: bool
) -> str:
    accum_steps = cfg['train']['accum_steps']
    split = f'{run.world_size} x {run.micro_batch}' + (f' x {accum_steps} steps' if accum_steps > 1 else '')
    return (
        f'{cfg["backbone"]["type"]} + {cfg["head"]["type"]}: {count_params(state.model) / 1e6:.3f}M parameters; '
        f'{len(train_set)} train / {len(val_set)} val images; {run.world_size} process(es) on {run.device}; '
        f'batch {cfg["train"]["batch_size"]} = {split}'
        + ('; DDP finds unused parameters' if find_unused else '')
        + class_weight_line(cfg, train_set.class_names)
        + f'\nparameter groups:\n{groups_table}'
    )


def class_weight_line(cfg: dict, class_names: list) -> str:
    weights = cfg['train']['loss'].get('class_weight')
    if weights is None or uses_set_prediction_loss(cfg['head']):
        return ''
    return '\nclass weights (train.loss.class_weight): ' + ', '.join(
        f'{n} {w:.4g}' for n, w in zip(class_names, weights)
    )


def log_progress(log: Logger, meter: ProgressMeter, state: TrainState, run: Run, bar) -> None:
    """One line and the scalars for the iterations since the last one: the loss terms, the step's base
    learning rate, the speed, the time waiting for data, the peak memory and the time left at this speed."""
    means, speed, data_time = meter.take()
    train_cfg = state.config['train']
    lr, max_iters = step_lr(state.iteration, train_cfg), train_cfg['max_iters']
    eta = datetime.timedelta(seconds=round((max_iters - state.iteration) * meter.batch_size / speed))
    (memory_key, memory), *_ = peak_memory(run.device).items()
    bar.set_postfix(loss=f'{means["loss"]:.4f}', lr=f'{lr:.3g}')
    log(
        f'iter {state.iteration}/{max_iters}: '
        + '  '.join(f'{k} {v:.6f}' for k, v in means.items())
        + f'  lr {lr:.4g}  {format_speed(speed)}  data {data_time:.3f} s/iter  memory {memory:.0f} MiB  eta {eta}'
    )
    values = {**means, 'lr': lr, 'images_per_s': speed, 'data_s_per_iter': data_time, memory_key: memory}
    log.scalars(state.iteration, {f'train/{k}': v for k, v in values.items()})
    log.record(state.iteration, 'train', values)


def format_speed(images_per_s: float) -> str:
    return f'{images_per_s:.1f} images/s' if images_per_s >= 0.1 else f'{1 / images_per_s:.1f} s/image'


def due(iteration: int, interval: int, max_iters: int) -> bool:
    return iteration % interval == 0 or iteration == max_iters


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    check_trackers_installed(cfg, args.config)
    run = start_run(args, cfg)
    check_training_batch(cfg, run.micro_batch, args.config)
    lock = claim_work_dir(run.work_dir, args.resume is not None, args.overwrite) if dist.is_main() else None
    try:
        with lock or contextlib.nullcontext():
            resume = resume_checkpoint(args.resume, run.work_dir)  # before anything is written there
            with Logger(run.work_dir if dist.is_main() else None, cfg['output']['loggers']) as log:
                fit(args, cfg, run, log, *resume)
    finally:
        dist.cleanup()


def fit(args, cfg: dict, run: Run, log: Logger, resume=None, checkpoint=None) -> None:
    """Build, restore (from `checkpoint`, read from `resume`), then train to `train.max_iters`,
    validating and checkpointing on the way."""
    train_cfg, data_cfg = cfg['train'], cfg['data']
    # Data first: a wrong folder fails here, before the model is built.
    train_set, val_set = build_dataset(cfg, 'train', run.work_dir), build_dataset(cfg, 'val', run.work_dir)
    cfg = resolve_class_weight(cfg, train_set)
    stored = run_config(cfg, run, train_set)
    model = build_model(cfg, run, load_from=None if checkpoint else args.load_from)
    find_unused = run.world_size > 1 and has_unused_parameters(model, run.device)
    state, groups_table = build_train_state(stored, run, model)
    if checkpoint:
        state.load_state_dict(checkpoint, str(resume))
        log(f'resumed from {resume} at iteration {state.iteration}')
    train_loader, val_loader = build_loaders(cfg, run, train_set, val_set, state.iteration)
    batches = Batches(train_loader, run.device, data_cfg['mean'], data_cfg['std'], run.memory_format)
    state.seed_processes(train_cfg['seed'], run.rank, run.world_size)  # after the loader drew its base seed
    train_model = wrap_for_processes(state.model, run, find_unused)
    criterion = build_criterion(cfg)
    prepare_work_dir(run, stored, log)
    log(describe_run(cfg, run, state, groups_table, train_set, val_set, find_unused))
    log.record(state.iteration, 'start', {})
    for warning in training_warnings(cfg):
        log(f'warning: {warning}')
    style = ClassStyle.of(val_set)

    train_model.train()
    meter, max_iters = ProgressMeter(run.device, train_cfg['batch_size']), train_cfg['max_iters']
    clock = RunClock()
    stop, patience = StopRequest(args.stop_signals), train_cfg['early_stop']['patience']
    with stop, progress_bar(total=max_iters, initial=state.iteration, desc='train') as bar:
        while state.iteration < max_iters and not state.early_stop.ran_out(patience):
            anneal_attention_masks(state.model, state.iteration, train_cfg)
            with clock.part('steps'):
                accum_steps, grad_clip = train_cfg['accum_steps'], train_cfg['grad_clip']
                terms = train_step(train_model, state, criterion, batches, accum_steps, run.amp_dtype, grad_clip)
            waited = batches.take_waited()
            meter.add(state.iteration, terms, waited)
            clock.waited += waited
            bar.update()
            if due(state.iteration, train_cfg['log_interval'], max_iters):
                with clock.part('logging'):
                    meter.check_finite(run.work_dir)  # the only host sync: once per log interval
                    log_progress(log, meter, state, run, bar)
            if due(state.iteration, train_cfg['val_interval'], max_iters):
                meter.check_finite(run.work_dir)  # never checkpoint a broken state
                with meter.paused(), clock.part('validation and checkpoints'):
                    validate_and_checkpoint(
                        state, val_loader, stored, run.device, run.amp_dtype, log, run.work_dir, style
                    )
            elif checkpointed_at(state.iteration, train_cfg):  # between validations: train.checkpoint_interval
                meter.check_finite(run.work_dir)
                with meter.paused(), clock.part('validation and checkpoints'):
                    save_training_state(state, run.work_dir, train_cfg['keep_checkpoints'])
            if state.iteration < max_iters and (number := stop.agreed()):
                save_and_stop(state, stored, run, log, meter, number)
    if state.early_stop.ran_out(patience):
        validations = f'{patience} validation{"s" * (patience > 1)}'
        log(
            f'stopped early at iteration {state.iteration}: {validations} without an mIoU above '
            f'{state.early_stop.best:.2f} + {train_cfg["early_stop"]["min_delta"]} (train.early_stop)'
        )
    log(closing_line(state, run.work_dir))
    if clock.seconds['steps']:  # a finished run resumed takes no step: nothing to account for
        seconds = clock.seconds_by_part()
        log(clock.summary(seconds))
        log.record(state.iteration, 'time', {f'{part} (s)': round(value, 3) for part, value in seconds.items()})


def save_and_stop(state: TrainState, cfg: dict, run: Run, log: Logger, meter: ProgressMeter, number: int) -> None:
    """A stop signal reached some process: write the training state at this iteration (unless the loop
    just did), say how to continue, and end with 128 + the signal's number."""
    meter.check_finite(run.work_dir)  # never checkpoint a broken state
    if not checkpointed_at(state.iteration, cfg['train']):
        save_training_state(state, run.work_dir, cfg['train']['keep_checkpoints'])
    log(
        f'stopped by {signal.Signals(number).name} at iteration {state.iteration}; the training state is in '
        f'{run.work_dir / "last.pth"}: continue with --resume auto'
    )
    raise SystemExit(128 + number)


def closing_line(state: TrainState, work_dir: Path) -> str:
    """What the run leaves behind, naming only checkpoints that were written: the best model and, where
    the run keeps one, the best moving average of its weights."""
    best, averaged = state.best['model'], state.best['ema']
    if not (best.iteration or averaged.iteration):
        return (
            f'done: no validation gave an mIoU (no valid label pixel in the validation set?), so no best.pth; '
            f'last checkpoint {work_dir / "last.pth"}'
        )
    lines = []
    if best.iteration:
        lines.append(f'best mIoU {best.miou:.2f} at iteration {best.iteration}; checkpoint {work_dir / "best.pth"}')
    if averaged.iteration:
        lines.append(
            f'moving average of the weights: best mIoU {averaged.miou:.2f} at iteration {averaged.iteration}; '
            f'checkpoint {work_dir / "best_ema.pth"}'
        )
    return 'done: ' + '\n'.join(lines)


if __name__ == '__main__':
    run_cli(main)
