"""Optimizer with parameter groups from name-substring rules, iteration-based LR schedules, and the moving
average of the weights."""

import math

import torch
from torch.optim.swa_utils import AveragedModel

from .config import ConfigError

RULE_OPTIONS = ('lr_mult', 'decay_mult')


def group_rule(name: str, rules: dict):
    """mmcv's rule: among the keys contained in `name`, the longest wins (ties: alphabetical)."""
    matches = sorted((key for key in rules if key in name), key=lambda key: (-len(key), key))
    return matches[0] if matches else None


def build_optimizer(model: torch.nn.Module, optimizer_cfg: dict, rules: dict):
    """AdamW or SGD over groups formed by `rules` ({substring: {lr_mult, decay_mult}}); returns the
    optimizer and a table of the groups for the log."""
    check_rules(rules)
    lr, weight_decay = optimizer_cfg['lr'], optimizer_cfg['weight_decay']
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = group_rule(name, rules)
        options = rules.get(rule, {})
        group = groups.setdefault(
            rule,
            {
                'params': [],
                'name': rule or 'default',
                'lr': lr * options.get('lr_mult', 1.0),
                'weight_decay': weight_decay * options.get('decay_mult', 1.0),
            },
        )
        group['params'].append(param)
    params = list(groups.values())
    if optimizer_cfg['type'] == 'sgd':
        optimizer = torch.optim.SGD(params, lr=lr, momentum=optimizer_cfg['momentum'], weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(optimizer_cfg['betas']), weight_decay=weight_decay)
    table = [f'{"rule":<16}{"lr":>10}{"decay":>10}{"tensors":>9}{"params":>12}']
    for rule, group in groups.items():
        table.append(
            f'{rule or "(default)":<16}{group["lr"]:>10.3g}{group["weight_decay"]:>10.3g}'
            f'{len(group["params"]):>9}{sum(p.numel() for p in group["params"]):>12,}'
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


def lr_factor(iteration: int, max_iters: int, schedule: dict) -> float:
    """Multiplier of the base LR at `iteration`: linear warm-up from `warmup_ratio`, then the schedule
    over the remaining iterations (mmseg 1.x: LinearLR followed by PolyLR from the end of warm-up).
    The decay part ends at `min_lr`, given as a fraction of the base LR."""
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


def build_scheduler(optimizer, max_iters: int, schedule: dict):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, max_iters, schedule))


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
