"""YAML configs: `_base_` inheritance, `--set key=value` overrides, and validation before anything is built.

A config is plain data. Every key has a default in `DEFAULTS` (see configs/README.md); the model
sections (`backbone`, `head`, `aux_head`) and pipeline steps take the keyword arguments of the class
they name, checked against its signature, and so do the `data` keys beyond the generic ones (a
dataset's own options). Any mistake raises `ConfigError` naming the key and file.
"""
import copy
import difflib
import inspect
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config that cannot describe a run: the message names the key, the file and what was expected."""


REQUIRED = '<required>'

DEFAULTS = {
    'backbone': {'type': REQUIRED, 'pretrained': None},
    'head': {'type': REQUIRED},
    'aux_head': None,
    'data': {
        'type': 'folder',
        'root': REQUIRED,
        'num_classes': REQUIRED,
        'ignore_index': 255,
        'reduce_zero_label': False,
        'class_names': None,
        'palette': None,
        'mean': [123.675, 116.28, 103.53],
        'std': [58.395, 57.12, 57.375],
        'workers': 2,
        'train': {'split': 'train', 'pipeline': []},
        'val': {'split': 'val', 'pipeline': []},
    },
    'train': {
        'max_iters': REQUIRED,
        'batch_size': REQUIRED,
        'accum_steps': 1,
        'val_interval': 1000,
        'log_interval': 50,
        'seed': 0,
        'amp': False,
        'grad_clip': None,
        'ema_decay': None,
        'channels_last': False,
        'keep_checkpoints': 3,
        'optimizer': {'type': 'adamw', 'lr': 6e-5, 'weight_decay': 0.01, 'betas': [0.9, 0.999], 'momentum': 0.9},
        'param_groups': {},
        'schedule': {'type': 'poly', 'power': 1.0, 'min_lr': 0.0, 'warmup_iters': 0, 'warmup_ratio': 1e-6},
        'loss': {'class_weight': None, 'ce': 1.0, 'ohem': None, 'dice': 0.0, 'lovasz': 0.0},
    },
    'eval': {'mode': 'whole', 'crop_size': None, 'stride': None, 'scales': [1.0], 'flip': False, 'size_divisor': 32},
    'output': {'work_dir': None},
    'paper': None,
}

# Keys whose default is None, or whose values may take several types, and the types they accept.
TYPES = {
    'backbone.type': (str,),
    'backbone.pretrained': (str, type(None)),
    'head.type': (str,),
    'data.root': (str,),
    'data.num_classes': (int,),
    'train.max_iters': (int,),
    'train.batch_size': (int,),
    'aux_head': (dict, type(None)),
    'data.class_names': (list, type(None)),
    'data.palette': (list, type(None)),
    'train.amp': (bool, str),
    'train.grad_clip': (float, int, type(None)),
    'train.ema_decay': (float, type(None)),
    'train.loss.class_weight': (list, type(None)),
    'train.loss.ohem': (dict, type(None)),
    'eval.crop_size': (list, type(None)),
    'eval.stride': (list, type(None)),
    'output.work_dir': (str, type(None)),
    'paper': (dict, type(None)),
}

# Sections whose keys are free-form mappings (name substring -> options) rather than fixed keys.
FREE_FORM = {'train.param_groups'}

# Sections that also take the keyword arguments of the class their `type` names (checked by check_kwargs).
CLASS_OPTIONS = ('backbone', 'head', 'data')

CHOICES = {
    'train.amp': (False, 'bf16', 'fp16'),
    'train.optimizer.type': ('adamw', 'sgd'),
    'train.schedule.type': ('poly', 'cosine', 'constant'),
    'eval.mode': ('whole', 'slide'),
}


def read_config(path: str, overrides=()) -> dict:
    """Read `path` with its `_base_` chain, apply `key=value` overrides, fill defaults, validate.

    Model- and pipeline-specific keys are checked later by `check_kwargs` against the classes they name.
    """
    return resolve(read_yaml(Path(path)), overrides, str(path))


def resolve(cfg: dict, overrides=(), source: str = 'config') -> dict:
    """Overrides, then defaults, then validation, for a config already in memory (e.g. a checkpoint's)."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        merge(cfg, parse_override(override))
    cfg = merge(copy.deepcopy(DEFAULTS), cfg)
    validate(cfg, DEFAULTS, source)
    return cfg


def read_yaml(path: Path, seen=()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ includes itself in a cycle")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    bases = cfg.pop('_base_', [])
    merged = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merge(merged, read_yaml(path.parent / base, seen + (path.resolve(),)))
    return merge(merged, cfg)


def merge(base: dict, update: dict) -> dict:
    """Recursive merge into `base`: mappings merge key by key, anything else is replaced (later wins)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_override(text: str) -> dict:
    """'train.max_iters=200' -> {'train': {'max_iters': 200}}; the value is parsed as YAML."""
    key, sep, value = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. train.max_iters=200")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set '{text}': value is not valid YAML ({error})") from error
    result = parsed
    for part in reversed(key.strip().split('.')):
        result = {part: result}
    return result


def validate(cfg: dict, schema: dict, source: str, prefix: str = '') -> None:
    for key, value in cfg.items():
        name = prefix + key
        if key not in schema and prefix.rstrip('.') not in CLASS_OPTIONS:
            raise ConfigError(f"{source}: unknown key '{name}'{did_you_mean(key, schema)}")
        if key not in schema:
            continue  # keyword arguments of the backbone, head or dataset: checked against it by check_kwargs
        expected = schema[key]
        if value == REQUIRED:
            raise ConfigError(f"{source}: '{name}' is required")
        check_type(name, value, expected, source)
        if isinstance(expected, dict) and isinstance(value, dict) and name not in FREE_FORM:
            validate(value, expected, source, name + '.')


def check_type(name: str, value, default, source: str) -> None:
    if name not in TYPES and default in (REQUIRED, None):
        return
    allowed = TYPES.get(name) or (type(default),)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = ' or '.join('null' if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{source}: '{name}' must be {names}, got {type(value).__name__} {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{source}: '{name}' must be one of {list(CHOICES[name])}, got {value!r}"
                          f"{did_you_mean(str(value), [str(c) for c in CHOICES[name]])}")


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def choose(section: str, name, registry: dict, source: str):
    """The class `registry[name]`, or a ConfigError listing the valid names."""
    if name not in registry:
        raise ConfigError(f"{source}: '{section}.type' is '{name}'; valid: {', '.join(registry)}"
                          f"{did_you_mean(str(name), registry)}")
    return registry[name]


def check_kwargs(cls, kwargs: dict, section: str, source: str, provided=('in_channels', 'num_classes'),
                 suggest=()) -> None:
    """Check YAML keys against `cls.__init__`: names (with a did-you-mean, also among the section's
    other valid keys `suggest`) and annotated types."""
    params, hints = keyword_parameters(cls)
    params = {n: p for n, p in params.items() if n not in provided}
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(f"{source}: unknown key '{section}.{key}' for {cls.__name__} (accepts: "
                              f"{', '.join(params) or 'nothing'}){did_you_mean(key, [*params, *suggest])}")
        if key in hints and not matches(value, hints[key]):
            raise ConfigError(f"{source}: '{section}.{key}' must be {describe(hints[key])}, "
                              f"got {type(value).__name__} {value!r}")


def keyword_parameters(cls) -> tuple:
    """({name: Parameter}, {name: annotation}) of `cls.__init__`, following `**kwargs` into the base
    classes: a subclass that adds options and passes the rest on accepts both."""
    params, hints = {}, {}
    for klass in cls.__mro__:
        init = vars(klass).get('__init__')
        if not inspect.isfunction(init):
            continue
        signature = inspect.signature(init)
        for name, param in signature.parameters.items():
            if name != 'self' and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                params.setdefault(name, param)
        hints = {**typing.get_type_hints(init), **hints}
        if all(p.kind != p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return params, hints


def matches(value, hint) -> bool:
    """A small runtime check of YAML values against simple annotations (int, float, list, Optional...)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True


def describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return ' or '.join(describe(a) for a in typing.get_args(hint))
    return 'null' if hint is type(None) else getattr(hint, '__name__', str(hint))


def dump_config(cfg: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
