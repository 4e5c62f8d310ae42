"""Train a semantic-segmentation model described by one YAML file.

    python train.py --config configs/demo.yaml [--work-dir DIR] [--set train.max_iters=200 ...]
    torchrun --nproc_per_node=8 train.py --config configs/offseg_b.yaml
    python train.py --config configs/demo.yaml --resume auto          # continue exactly after a stop or kill
    python train.py --config configs/camvid.yaml --load-from CKPT     # fine-tune from a checkpoint's weights

The factories below map the config to models; the rest of the file is the training loop.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import DATASETS, DatasetError
from datasets.sampler import TrainSampler, shard
from datasets.transforms import TRANSFORMS
from engine import dist
from engine.checkpoint import load_checkpoint, remove_partial_writes, save_checkpoint, save_iteration_checkpoint
from engine.config import DEFAULTS, ConfigError, check_kwargs, choose, dump_config, read_config, resolve
from engine.evaluation import evaluate
from engine.inference import normalize
from engine.losses import SegmentationLoss, check_loss_config
from engine.optim import build_optimizer, build_scheduler, check_rules
from engine.outputs import OutputError
from engine.training import (FirstSamples, Logger, count_params, get_rng_state, has_unused_parameters,
                             load_weights_from, log_resources, log_validation, per_process_batch, resume_path,
                             set_rng_state, stop_if_not_finite)
from engine.visualize import ClassStyle
from models import BACKBONES, HEADS, Segmentor
from models.pretrained import CheckpointError, load_into, load_pretrained

__all__ = ['load_config', 'create_backbone', 'get_backbone_channels', 'create_head', 'create_model']

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def amp_dtype_for(cfg: dict, device: torch.device):
    """The autocast dtype of `train.amp` on CUDA; None (full float32) on CPU or with AMP off."""
    return AMP_DTYPES.get(cfg['train']['amp']) if device.type == 'cuda' else None


# ----------------------------------------------------------------------------------------- factories

def backbone_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg['backbone'].items() if k not in ('type', 'pretrained')}


def create_backbone(cfg: dict) -> nn.Module:
    """The backbone named by `backbone.type`, with `backbone.pretrained` weights loaded if given."""
    spec = cfg['backbone']
    cls = choose('backbone', spec['type'], BACKBONES, cfg.get('_source', 'config'))
    backbone = cls(**backbone_kwargs(cfg))
    if spec['pretrained']:
        load_pretrained(backbone, spec['pretrained'], cls.convert_checkpoint)
    return backbone


def get_backbone_channels(cfg: dict) -> list:
    """Channels of the 4 maps, read from the backbone itself (built on the meta device: no memory, no weights)."""
    cls = choose('backbone', cfg['backbone']['type'], BACKBONES, cfg.get('_source', 'config'))
    with torch.device('meta'):
        return list(cls(**backbone_kwargs(cfg)).out_channels)


def create_head(cfg: dict, in_channels: list, num_classes: int, section: str = 'head') -> nn.Module:
    """The head named by `<section>.type`; its other keys are the head's constructor arguments."""
    spec = cfg[section]
    cls = choose(section, spec['type'], HEADS, cfg.get('_source', 'config'))
    kwargs = {k: v for k, v in spec.items() if k not in ('type', 'loss_weight')}
    return cls(in_channels, num_classes, **kwargs)


def create_model(cfg: dict) -> Segmentor:
    """Backbone + head (+ auxiliary head). In eval mode: normalised (B,3,H,W) -> logits at the head's stride."""
    channels, num_classes = get_backbone_channels(cfg), cfg['data']['num_classes']
    aux_head = create_head(cfg, channels, num_classes, 'aux_head') if cfg['aux_head'] else None
    return Segmentor(create_backbone(cfg), create_head(cfg, channels, num_classes), aux_head)


def check_config(cfg: dict) -> None:
    """Model and pipeline keys against the classes they name: cheap, and done before anything is built."""
    source = cfg['_source']
    check_kwargs(choose('backbone', cfg['backbone']['type'], BACKBONES, source), backbone_kwargs(cfg),
                 'backbone', source)
    pretrained = cfg['backbone']['pretrained']
    if pretrained and not Path(pretrained).expanduser().exists():
        raise ConfigError(f"{source}: backbone.pretrained '{pretrained}' not found (a local file or folder is "
                          "expected; nothing is downloaded; --set backbone.pretrained=null trains from scratch)")
    for section in ('head', 'aux_head'):
        if cfg[section]:
            kwargs = {k: v for k, v in cfg[section].items() if k not in ('type', 'loss_weight')}
            check_kwargs(choose(section, cfg[section].get('type'), HEADS, source), kwargs, section, source)
    check_rules(cfg['train']['param_groups'], source)
    try:
        check_loss_config(cfg['train']['loss'], cfg['data']['num_classes'])
    except ConfigError as error:
        raise ConfigError(f'{source}: {error}') from None
    dataset = choose('data', cfg['data']['type'], DATASETS, source)
    check_kwargs(dataset, dataset_options(cfg['data']), 'data', source, provided=DATASET_ARGUMENTS,
                 suggest=DEFAULTS['data'])
    for split in ('train', 'val'):
        for i, step in enumerate(cfg['data'][split]['pipeline']):
            where = f'data.{split}.pipeline[{i}]'
            if not isinstance(step, dict):
                raise ConfigError(f"{source}: '{where}' must be a mapping with a 'type'")
            cls = choose(where, step.get('type'), TRANSFORMS, source)
            check_kwargs(cls, {k: v for k, v in step.items() if k != 'type'}, where, source, ('ignore_index',))


def load_config(path: str, overrides=()) -> dict:
    """The resolved config of `path` (with `_base_` files and `key=value` overrides), fully validated;
    `_source` remembers the file for later messages."""
    cfg = read_config(path, overrides)
    cfg['_source'] = str(path)
    check_config(cfg)
    return cfg


def config_for_checkpoint(checkpoint: dict, checkpoint_path, config_path=None, overrides=()) -> dict:
    """The run's config: `config_path` if given, else the one stored in the checkpoint; then overrides."""
    if config_path:
        return load_config(config_path, overrides)
    cfg = resolve(checkpoint['config'], overrides, source=f'{checkpoint_path} (stored config)')
    cfg['_source'] = f'{checkpoint_path} (stored config)'
    check_config(cfg)
    return cfg


# Dataset arguments that build_dataset fills from the generic `data` keys; the other keys of `data`
# that are not in DEFAULTS are the dataset's own options (label_map, on_invalid, ...).
DATASET_ARGUMENTS = ('root', 'split', 'num_classes', 'pipeline', 'ignore_index', 'reduce_zero_label',
                     'class_names', 'palette', 'seed', 'mean')


def dataset_options(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in DEFAULTS['data']}


def build_dataset(cfg: dict, split: str):
    """The dataset of `split` ('train' or 'val'). Its scan is cached in <work_dir>/scan_cache unless
    data.cache_dir says otherwise; under torchrun rank 0 builds first, so the others read its cache."""
    data, work_dir = cfg['data'], cfg['output']['work_dir']
    options = dataset_options(data)
    if work_dir:
        options.setdefault('cache_dir', str(Path(work_dir) / 'scan_cache'))
    if not dist.is_main():
        dist.barrier()
    dataset = DATASETS[data['type']](
        data['root'], data[split]['split'], data['num_classes'], pipeline=data[split]['pipeline'],
        ignore_index=data['ignore_index'], reduce_zero_label=data['reduce_zero_label'],
        class_names=data['class_names'], palette=data['palette'], seed=cfg['train']['seed'], mean=data['mean'],
        **options)
    if dist.is_main():
        dist.barrier()
    return dataset


def stored_config(cfg: dict) -> dict:
    """The config as written to the work dir and into checkpoints (without the in-memory `_source`)."""
    return {k: v for k, v in cfg.items() if k != '_source'}


def load_model_weights(model: nn.Module, checkpoint: dict, source: str) -> None:
    """Strict load of a checkpoint's `model` into `model`: any key difference is an error."""
    load_into(model, checkpoint['model'], source, strict=True)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='YAML file describing the run')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: output.work_dir)')
    parser.add_argument('--set', nargs='+', default=[], action='extend', metavar='KEY=VALUE',
                        help='override config values, e.g. --set train.max_iters=200 head.type=aspp')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--resume', metavar='CKPT|auto',
                        help="continue a run exactly from a checkpoint ('auto': work_dir/last.pth if there is one)")
    parser.add_argument('--load-from', metavar='CKPT',
                        help='initialise the weights from a checkpoint (fine-tuning: a fresh optimizer and schedule; '
                             'ignored when resuming)')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    data_cfg, train_cfg = cfg['data'], cfg['train']
    work_dir = Path(args.work_dir or cfg['output']['work_dir'] or Path('work_dirs') / Path(args.config).stem)
    cfg['output']['work_dir'] = str(work_dir)

    device, rank, world_size = dist.setup(args.device)
    micro_batch, accum_steps = per_process_batch(cfg, world_size), train_cfg['accum_steps']
    amp_dtype = amp_dtype_for(cfg, device)
    memory_format = torch.channels_last if train_cfg['channels_last'] else torch.contiguous_format
    log = Logger(work_dir if dist.is_main() else None)

    # Data first: a wrong folder fails here, before the model is built.
    train_set, val_set = build_dataset(cfg, 'train'), build_dataset(cfg, 'val')
    data_cfg['class_names'], data_cfg['palette'] = train_set.class_names, train_set.palette.tolist()

    resume = resume_path(args.resume, work_dir)
    checkpoint = load_checkpoint(resume) if resume else None
    start_iter = checkpoint['iteration'] if checkpoint else 0
    loader_options = dict(num_workers=data_cfg['workers'], pin_memory=device.type == 'cuda',
                          persistent_workers=data_cfg['workers'] > 0)
    train_loader = DataLoader(train_set, batch_size=micro_batch, **loader_options,
                              sampler=TrainSampler(len(train_set), train_cfg['seed'], rank, world_size,
                                                   start=start_iter * micro_batch * accum_steps))
    val_loader = DataLoader(Subset(val_set, shard(len(val_set), rank, world_size)), batch_size=1, **loader_options)

    torch.manual_seed(train_cfg['seed'])
    model = create_model(cfg).to(device, memory_format=memory_format)
    if args.load_from and not checkpoint:
        for message in load_weights_from(model, args.load_from):
            log(message)
    find_unused = world_size > 1 and has_unused_parameters(model, device)
    if world_size > 1 and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer, groups_table = build_optimizer(model, train_cfg['optimizer'], train_cfg['param_groups'])
    scheduler = build_scheduler(optimizer, train_cfg['max_iters'], train_cfg['schedule'])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train_cfg['ema_decay']), use_buffers=True) \
        if train_cfg['ema_decay'] else None
    best = {'model': (-1.0, 0), 'ema': (-1.0, 0)}  # (mIoU, iteration) of the best validation so far
    if checkpoint:
        load_model_weights(model, checkpoint, str(resume))
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        scaler.load_state_dict(checkpoint['scaler'])
        if ema and checkpoint.get('ema'):
            ema.load_state_dict(checkpoint['ema'])
        best.update(checkpoint['best'])
        log(f'resumed from {resume} at iteration {start_iter}')
    batches = iter(train_loader)  # draws a worker base seed from the global RNG: before it is seeded or restored
    if checkpoint and len(checkpoint['rng']) == world_size:
        set_rng_state(checkpoint['rng'][rank])
    else:  # a fresh run, or a resume on a different number of processes: randomness starts anew
        torch.manual_seed(train_cfg['seed'] + rank + start_iter)  # per-process dropout/drop-path
    train_model = model if world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == 'cuda' else None, find_unused_parameters=find_unused)
    criterion = SegmentationLoss(data_cfg['ignore_index'], train_cfg['loss'],
                                 (cfg['aux_head'] or {}).get('loss_weight', 0.4))

    if dist.is_main():
        work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(stored_config(cfg), work_dir / 'config.yaml')
        log.text('config', (work_dir / 'config.yaml').read_text())
        remove_partial_writes(work_dir)
    split = f"{world_size} x {micro_batch}" + (f" x {accum_steps} steps" if accum_steps > 1 else '')
    log(f"{cfg['backbone']['type']} + {cfg['head']['type']}: {count_params(model) / 1e6:.3f}M parameters; "
        f"{len(train_set)} train / {len(val_set)} val images; {world_size} process(es) on {device}; batch "
        f"{train_cfg['batch_size']} = {split}" + ('; DDP finds unused parameters' if find_unused else '')
        + f"\nparameter groups:\n{groups_table}")

    def state(iteration: int, rng_states: list) -> dict:
        return {'model': model.state_dict(), 'ema': ema.state_dict() if ema else None, 'config': stored_config(cfg),
                'iteration': iteration, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'scaler': scaler.state_dict(), 'best': best, 'rng': rng_states}

    # ------------------------------------------------------------------------------------ the loop
    train_model.train()
    running = {}  # loss terms summed on the device since the last log
    first_bad_iter = torch.full((), -1, device=device)
    window_start, window_iters = time.perf_counter(), 0
    bar = tqdm(total=train_cfg['max_iters'], initial=start_iter, desc='train', dynamic_ncols=True,
               disable=not dist.is_main())
    for iteration in range(start_iter + 1, train_cfg['max_iters'] + 1):
        optimizer.zero_grad(set_to_none=True)
        for step in range(accum_steps):
            images, labels = next(batches)
            images = normalize(images.to(device, non_blocking=True), data_cfg['mean'], data_cfg['std'])
            images = images.contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            last_step = step == accum_steps - 1
            with contextlib.nullcontext() if last_step or world_size == 1 else train_model.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = train_model(images)
                terms = criterion.terms(outputs, labels)
                scaler.scale(terms['loss'] / accum_steps).backward()
            for name, value in terms.items():
                running[name] = running.get(name, 0) + value.detach() / accum_steps
        if train_cfg['grad_clip']:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), train_cfg['grad_clip'])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema:
            ema.update_parameters(model)
        first_bad_iter = torch.where((first_bad_iter < 0) & ~torch.isfinite(running['loss']), iteration,
                                     first_bad_iter)
        window_iters += 1
        bar.update()

        if iteration % train_cfg['log_interval'] == 0 or iteration == train_cfg['max_iters']:
            stop_if_not_finite(first_bad_iter, work_dir)  # the only host sync: once per log interval
            means = {name: value.item() / window_iters for name, value in dist.mean_over_processes(running).items()}
            speed = window_iters * train_cfg['batch_size'] / (time.perf_counter() - window_start)
            lr = optimizer.param_groups[0]['lr']
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f'{lr:.3g}')
            log(f"iter {iteration}/{train_cfg['max_iters']}: " + '  '.join(f'{k} {v:.6f}' for k, v in means.items())
                + f'  lr {lr:.4g}  {speed:.1f} images/s')
            log.scalars(iteration, {**{f'train/{k}': v for k, v in means.items()}, 'train/lr': lr,
                                    'train/images_per_s': speed})
            running.clear()
            window_iters = 0
            window_start = time.perf_counter()

        if iteration % train_cfg['val_interval'] == 0 or iteration == train_cfg['max_iters']:
            stop_if_not_finite(first_bad_iter, work_dir)  # never checkpoint a broken state
            log_resources(log, iteration, optimizer, device)
            for name, candidate in (('model', model), ('ema', ema and ema.module)):
                if candidate is None:
                    continue
                shown = FirstSamples()
                results = evaluate(candidate, val_loader, data_cfg['num_classes'], data_cfg['ignore_index'],
                                   data_cfg['mean'], data_cfg['std'], cfg['eval'], device, amp_dtype,
                                   progress=dist.is_main(), on_sample=shown)
                improved = results['mIoU'] > best[name][0]
                if improved:
                    best[name] = (results['mIoU'], iteration)
                log_validation(log, iteration, name, results, best[name], ClassStyle.of(val_set), shown.samples)
                if improved and dist.is_main():
                    best_state = {'model': candidate.state_dict(), 'config': stored_config(cfg),
                                  'iteration': iteration, 'miou': results['mIoU']}
                    save_checkpoint(best_state, work_dir / ('best.pth' if name == 'model' else 'best_ema.pth'))
            rng_states = dist.all_gather(get_rng_state())
            if dist.is_main():
                save_iteration_checkpoint(state(iteration, rng_states), work_dir, train_cfg['keep_checkpoints'])
            dist.barrier()
            window_start = time.perf_counter()
    bar.close()
    log(f"done: best mIoU {best['model'][0]:.2f} at iteration {best['model'][1]}; checkpoint {work_dir / 'best.pth'}")
    log.close()
    dist.cleanup()


# ------------------------------------------------------------------------------------------ helpers

def run_cli(main_fn) -> None:
    """Bad input (config, data, checkpoint) or an output that must not or cannot be written ends with one
    clear line and exit code 2, not a traceback."""
    try:
        main_fn()
    except (ConfigError, DatasetError, CheckpointError, OutputError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run_cli(main)
