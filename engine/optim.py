"""Optimizer with parameter groups from name-substring rules, iteration-based LR schedules, and the moving
average of the weights."""

import functools
import math

import torch
from torch.optim.swa_utils import AveragedModel

from .config import ConfigError

RULE_OPTIONS = ('lr_mult', 'decay_mult')


def group_rule(name: str, rules: dict):
    """mmcv's rule: among the keys contained in `name`, the longest wins (ties: alphabetical)."""
    matches = sorted((key for key in rules if key in name), key=lambda key: (-len(key), key))
    return matches[0] if matches else None


def layer_scale(model: torch.nn.Module, name: str, layer_decay: dict) -> tuple:
    """(layer, lr factor) of a parameter under layer-wise decay (BEiT; mmseg's LearningRateDecay
    constructor): a backbone parameter of layer i of n gets rate^(n + 1 - i), so the embeddings learn
    slowest and the head (as the layers after the last, n + 1) at the full rate; (None, 1) without it.
    `embeddings_as_first_block`: layer 0 decays as layer 1, as tue-mps/eomt's optimizer decays its ViT."""
    if layer_decay is None or layer_decay['rate'] is None:
        return None, 1.0
    backbone = model.backbone
    num_layers = layer_decay['num_layers'] or backbone.decay_layers
    layer = backbone.layer_id(name.removeprefix('backbone.'), num_layers) if name.startswith('backbone.') else None
    layer = num_layers + 1 if layer is None else layer
    if layer == 0 and layer_decay.get('embeddings_as_first_block'):
        layer = 1
    return layer, layer_decay['rate'] ** (num_layers + 1 - layer)


def build_optimizer(
    model: torch.nn.Module, optimizer_cfg: dict, rules: dict, layer_decay: dict = None, split_backbone: bool = False
):
    """AdamW or SGD over groups formed by `rules` ({substring: {lr_mult, decay_mult}}) and, with
    `layer_decay` ({rate, num_layers}), by the backbone layer; with `split_backbone` (a schedule of its
    own for the backbone) no group holds both backbone and other parameters, and each says which it
    holds (`backbone`). Returns the optimizer and a table of the groups for the log."""
    check_rules(rules)
    lr, weight_decay = optimizer_cfg['lr'], optimizer_cfg['weight_decay']
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = group_rule(name, rules)
        options = rules.get(rule, {})
        layer, scale = layer_scale(model, name, layer_decay)
        backbone = split_backbone and name.startswith('backbone.')
        group = groups.setdefault(
            (rule, layer, backbone),
            {
                'params': [],
                'name': (rule or 'default') + ('' if layer is None else f' layer {layer}'),
                'lr': lr * options.get('lr_mult', 1.0) * scale,
                'weight_decay': weight_decay * options.get('decay_mult', 1.0),
                'backbone': backbone,
            },
        )
        group['params'].append(param)
    params = list(groups.values())
    # fused: one kernel per parameter tensor for the whole update, on CPU as on CUDA (AdamW 3.4x faster
    # on a CPU core than the loop); the same update up to float rounding.
    if optimizer_cfg['type'] == 'sgd':
        momentum = optimizer_cfg['momentum']
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    else:
        betas = tuple(optimizer_cfg['betas'])
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    table = [f'{"rule":<16}{"layer":>6}{"lr":>10}{"decay":>10}{"tensors":>9}{"params":>12}']
    for (rule, layer, backbone), group in groups.items():
        label = (rule or '(default)') + (' (backbone)' if backbone else '')
        table.append(
            f'{label:<16}{"" if layer is None else layer:>6}{group["lr"]:>10.3g}'
            f'{group["weight_decay"]:>10.3g}{len(group["params"]):>9}{sum(p.numel() for p in group["params"]):>12,}'
        )
    return optimizer, '\n'.join(table)


def check_rules(rules: dict, source: str = 'config') -> None:
    """Each rule is {lr_mult, decay_mult} (numbers >= 0): a misspelt option would otherwise do nothing."""
    for key, options in rules.items():
        rule = f'train.param_groups.{key}'
        if not isinstance(options, dict):
            raise ConfigError(
                f"{source}: '{rule}' must be a mapping of {' and/or '.join(RULE_OPTIONS)}, got {options!r}"
            )
        for option, value in options.items():
            if option not in RULE_OPTIONS:
                raise ConfigError(f"{source}: unknown key '{rule}.{option}' (valid: {', '.join(RULE_OPTIONS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{source}: '{rule}.{option}' must be a number >= 0, got {value!r}")


def lr_factor(iteration: int, max_iters: int, schedule: dict, backbone: bool = False) -> float:
    """Multiplier of the base LR at `iteration`: linear warm-up from `warmup_ratio`, then the schedule
    over the remaining iterations (mmseg 1.x: LinearLR followed by PolyLR from the end of warm-up).
    The decay part ends at `min_lr`, given as a fraction of the base LR. With `backbone_warmup`
    ([delay, ramp], EoMT's two-stage warm-up) a backbone group stays at 0 for `delay` iterations, warms
    up from 0 over `ramp`, then decays over the rest."""
    if backbone and schedule.get('backbone_warmup'):
        delay, ramp = schedule['backbone_warmup']
        if iteration < delay:
            return 0.0
        shifted = {**schedule, 'warmup_iters': ramp, 'warmup_ratio': 0.0, 'backbone_warmup': None}
        return lr_factor(iteration - delay, max_iters - delay, shifted)
    warmup = schedule['warmup_iters']
    if iteration < warmup:
        ratio = schedule['warmup_ratio']
        return ratio + (1 - ratio) * iteration / warmup
    progress = min((iteration - warmup) / max(max_iters - warmup, 1), 1.0)
    floor = schedule['min_lr']
    if schedule['type'] == 'poly':
        return floor + (1 - floor) * (1 - progress) ** schedule['power']
    if schedule['type'] == 'cosine':
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def step_lr(iteration: int, train_cfg: dict) -> float:
    """The base learning rate (train.optimizer.lr times the schedule) the `iteration`-th step (from 1) took."""
    return train_cfg['optimizer']['lr'] * lr_factor(iteration - 1, train_cfg['max_iters'], train_cfg['schedule'])


def mask_probability(iteration: int, start: int, end: int, power: float) -> float:
    """EoMT's masked-attention annealing (the official `mask_annealing`): 1 before `start`, then
    (1 - (iteration - start) / (end - start))^power, 0 from `end` on."""
    if iteration < start:
        return 1.0
    if iteration >= end:
        return 0.0
    return (1 - (iteration - start) / (end - start)) ** power


def annealing_windows(annealing: dict, blocks: int, max_iters: int) -> tuple:
    """(starts, ends) of each block's annealing: `train.mask_annealing`'s, or by default the rule of the
    official DINOv2 configs, block k of n annealed over [(k + 1) T / (n + 2), (k + 2) T / (n + 2)): one
    after the other from the first, all masks gone at (n + 1) / (n + 2) of the T iterations."""
    if annealing['start'] is not None:
        return annealing['start'], annealing['end']
    return [(k + 1) * max_iters // (blocks + 2) for k in range(blocks)], [
        (k + 2) * max_iters // (blocks + 2) for k in range(blocks)
    ]


def anneal_attention_masks(model: torch.nn.Module, iteration: int, train_cfg: dict) -> None:
    """Set a masked-attention head's per-block mask probabilities (EoMT's `attn_mask_probs`) for this
    iteration; other heads have none."""
    probabilities = getattr(model.head, 'attn_mask_probs', None)
    if probabilities is None:
        return
    annealing = train_cfg['mask_annealing']
    starts, ends = annealing_windows(annealing, len(probabilities), train_cfg['max_iters'])
    values = [mask_probability(iteration, s, e, annealing['power']) for s, e in zip(starts, ends)]
    probabilities.copy_(torch.tensor(values))


def build_scheduler(optimizer, max_iters: int, schedule: dict):
    """One LR factor per group: the backbone's groups (`backbone`, see build_optimizer) may have their own."""
    factors = [
        functools.partial(lr_factor, max_iters=max_iters, schedule=schedule, backbone=group.get('backbone', False))
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def normalised_ema(decay: float):
    """AveragedModel's `multi_avg_fn` for an exponential moving average normalised as Adam normalises its
    moments: after t updates it is sum_k (1 - d) d^(t-k) w_k / (1 - d^t), whose weights sum to one.
    torch's own EMA leaves the first weights, still close to the random start, the mass d^(t-1) instead
    (5% after 600 steps at d = 0.995), which holds the average's score down early in a run. The new
    weights' share of update t is (1 - d) / (1 - d^t), computed on the device: no host sync. Integer
    buffers (BatchNorm's step count) are copied, not averaged."""

    @torch.no_grad()
    def update(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        step = n_averaged.double() + 1  # update 1 is AveragedModel's copy; this is update n_averaged + 1
        share = (1 - decay) / (1 - torch.pow(decay, step))
        torch._foreach_lerp_(averaged, current, share.to(averaged[0].dtype))

    return update


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The normalised moving average of the model's weights and buffers (BatchNorm statistics included)."""
    return AveragedModel(model, multi_avg_fn=normalised_ema(decay), use_buffers=True)
