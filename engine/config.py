"""YAML configs: `_base_` inheritance, `--set key=value` overrides, and validation before anything is built.

A config is plain data. Every key has a default in `DEFAULTS` (see configs/README.md); the model
sections (`backbone`, `head`, `aux_head`) and pipeline steps take the keyword arguments of the class
they name, checked against its signature, and so do the `data` keys beyond the generic ones (a
dataset's own options). Any mistake raises `ConfigError` naming the key and file.
"""

import copy
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types as at
import yaml

from .loss_terms import LOSS_TERMS
from .mask_losses import MaskClassificationLoss
from .metrics import DEFAULT_METRICS


class ConfigError(ValueError):
    """A config that cannot describe a run: the message names the key, the file and what was expected."""


REQUIRED = '<required>'

DEFAULTS = {
    'backbone': {'type': REQUIRED, 'pretrained': None, 'frozen': False, 'with_cp': False},
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
        'in_channels': 3,
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
        'checkpoint_interval': None,
        'log_interval': 50,
        'seed': 0,
        'amp': False,
        'grad_clip': None,
        'ema_decay': None,
        'validate_raw_weights': True,
        'early_stop': {'patience': None, 'min_delta': 0.0},
        'layer_decay': {'rate': None, 'num_layers': None, 'embeddings_as_first_block': False},
        'mask_annealing': {'start': None, 'end': None, 'power': 0.9},
        'channels_last': False,
        'keep_checkpoints': 3,
        'optimizer': {'type': 'adamw', 'lr': 6e-5, 'weight_decay': 0.01, 'betas': [0.9, 0.999], 'momentum': 0.9},
        'param_groups': {},
        'schedule': {
            'type': 'poly',
            'power': 1.0,
            'min_lr': 0.0,
            'warmup_iters': 0,
            'warmup_ratio': 1e-6,
            'backbone_warmup': None,
        },
        'loss': {},  # each term of engine/loss_terms.py: its weight, then its options (filled below)
        'mask_loss': {},  # the set-prediction loss's settings: engine/mask_losses.py (filled below)
    },
    'eval': {
        'mode': 'whole',
        'crop_size': None,
        'stride': None,
        'scales': [1.0],
        'flip': False,
        'size_divisor': 32,
        'metrics': list(DEFAULT_METRICS),
    },
    'output': {'work_dir': None, 'loggers': ['tensorboard']},
    'paper': None,
}

# Keys whose default is None, or whose values may take several types, and the types they accept.
TYPES = {
    'backbone.type': (str,),
    'backbone.pretrained': (str, bool, type(None)),
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
    'train.checkpoint_interval': (int, type(None)),
    'train.ema_decay': (float, type(None)),
    'train.early_stop.patience': (int, type(None)),
    'train.early_stop.min_delta': (float, int),
    'train.layer_decay.rate': (float, int, type(None)),
    'train.layer_decay.num_layers': (int, type(None)),
    'train.layer_decay.embeddings_as_first_block': (bool,),
    'train.schedule.backbone_warmup': (list, type(None)),
    'train.mask_annealing.start': (list, type(None)),
    'train.mask_annealing.end': (list, type(None)),
    'eval.crop_size': (list, type(None)),
    'eval.stride': (list, type(None)),
    'output.work_dir': (str, type(None)),
    'output.loggers': (list,),
    'paper': (dict, type(None)),
}


@dataclass(frozen=True)
class Each:
    """Every item of a list is a number meeting `bounds` (annotated_types constraints)."""

    bounds: tuple


# The ranges of numeric keys, declared beside their defaults and types and checked with them (the
# class options of backbones, heads, datasets and pipeline steps declare theirs with typing.Annotated).
BOUNDS = {
    'data.num_classes': (at.Ge(1),),
    'data.in_channels': (at.Ge(1),),
    'data.mean': (at.Len(1), Each((at.Ge(0),))),  # one per band of data.in_channels (engine/rules.py)
    'data.std': (at.Len(1), Each((at.Gt(0),))),
    'data.workers': (at.Ge(0),),
    'train.max_iters': (at.Ge(1),),
    'train.batch_size': (at.Ge(1),),
    'train.accum_steps': (at.Ge(1),),
    'train.val_interval': (at.Ge(1),),
    'train.checkpoint_interval': (at.Ge(1),),
    'train.log_interval': (at.Ge(1),),
    'train.seed': (at.Ge(0), at.Lt(2**32)),
    'train.grad_clip': (at.Gt(0),),
    'train.ema_decay': (at.Gt(0), at.Lt(1)),
    'train.early_stop.patience': (at.Ge(1),),
    'train.early_stop.min_delta': (at.Ge(0),),
    'train.layer_decay.rate': (at.Gt(0), at.Le(1)),
    'train.layer_decay.num_layers': (at.Ge(1),),
    'train.keep_checkpoints': (at.Ge(0),),
    'train.optimizer.lr': (at.Gt(0),),
    'train.optimizer.weight_decay': (at.Ge(0),),
    'train.optimizer.betas': (at.Len(2, 2), Each((at.Ge(0), at.Lt(1)))),
    'train.optimizer.momentum': (at.Ge(0), at.Lt(1)),
    'train.schedule.power': (at.Gt(0),),
    'train.schedule.min_lr': (at.Ge(0), at.Le(1)),
    'train.schedule.warmup_iters': (at.Ge(0),),
    'train.schedule.warmup_ratio': (at.Gt(0), at.Le(1)),
    'eval.crop_size': (at.Len(2, 2), Each((at.Ge(1),))),
    'eval.stride': (at.Len(2, 2), Each((at.Ge(1),))),
    'eval.scales': (at.Len(1), Each((at.Gt(0),))),
    'eval.size_divisor': (at.Ge(1),),
    'eval.metrics': (at.Len(1),),
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


def read_config(path: str, overrides=(), accepts=None) -> dict:
    """Read `path` with its `_base_` chain, apply `key=value` overrides, fill defaults, validate.

    Model- and pipeline-specific keys are checked later by `check_kwargs` against the classes they name;
    `accepts` (see `merge`) lets a change of a section's `type` drop the keys the new type does not take.
    """
    return resolve(read_yaml(Path(path), accepts=accepts), overrides, str(path), accepts)


def resolve(cfg: dict, overrides=(), source: str = 'config', accepts=None) -> dict:
    """Overrides, then defaults, then validation, for a config already in memory (e.g. a checkpoint's)."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        merge(cfg, translate(parse_override(override), f"--set '{override}'"), accepts)
    cfg = merge(copy.deepcopy(DEFAULTS), cfg)
    check_finite(cfg, source)
    validate(cfg, DEFAULTS, source)
    return cfg


def check_finite(value, source: str, name: str = '') -> None:
    """No number anywhere in the config is infinite or NaN (YAML's .inf and .nan): every bound below
    reads as 'a number >= ...', which infinity would otherwise pass."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, source, f'{name}.{key}' if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(item, source, f'{name}[{index}]')
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{name}' must be a finite number, got {value}")


def read_yaml(path: Path, seen=(), accepts=None) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    if path.resolve() in seen:
        raise ConfigError(f'{path}: _base_ includes itself in a cycle')
    try:
        cfg = yaml.load(path.read_text(encoding='utf-8'), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f'{path}: not a UTF-8 text file (byte {error.start}); configs are YAML in UTF-8') from None
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f', line {mark.line + 1}' if mark else ''
        raise ConfigError(f'{path}{where}: not valid YAML ({getattr(error, "problem", None) or error})') from None
    if not isinstance(cfg, dict):
        raise ConfigError(f'{path}: expected a mapping of sections at the top level')
    translate(cfg, str(path))
    bases = cfg.pop('_base_', [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: '_base_' must be a file name or a list of them, got {bases!r}")
    merged = {}
    for base in bases:
        merge(merged, read_yaml(path.parent / base, seen + (path.resolve(),), accepts), accepts)
    return merge(merged, cfg, accepts)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error: YAML keeps the last
    silently, and a config where `lr` appears twice is one whose author meant one of them."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def merge(base: dict, update: dict, accepts=None, prefix: str = '') -> dict:
    """Recursive merge into `base`: mappings merge key by key, anything else is replaced (later wins).

    A mapping with `_delete_: true` replaces the one below it instead of merging into it. A model section
    that changes `type` (`--set head.type=segformer` over an `aspp` head) keeps only the keys that
    `accepts(section, new_type)` names (the new class's arguments and the section's generic keys), so
    that swapping a model part is one line; without `accepts`, or for a type it does not know, all stay.
    """
    for key, value in update.items():
        below = base.get(key)
        if isinstance(value, dict) and value.get('_delete_') is True:
            base[key] = copy.deepcopy({k: v for k, v in value.items() if k != '_delete_'})
        elif isinstance(value, dict) and isinstance(below, dict):
            new_type = value.get('type', below.get('type'))
            keep = accepts(prefix + key, new_type) if accepts and new_type != below.get('type') else None
            if keep is not None:
                base[key] = below = {k: v for k, v in below.items() if k in keep}
            merge(below, value, accepts, prefix + key + '.')
        else:
            base[key] = copy.deepcopy(value)
    return base


# SegHiero's vocabulary (its architecture guide), read as this repo's own: each YAML file and each
# `--set` override is translated as it is read, before anything is merged, so the rest of the code
# sees one vocabulary and checkpoints store it (the mapping is documented in configs/README.md):
#     backbone: {type: segformer}      -> {type: mit}
#     backbone: {variant: mit-b0}      -> {variant: b0}
#     backbone: {depth: 101}           -> {variant: '101'}
#     head: {proj_dim: 128}            -> {channels: 128}   (the head's width)
# SegHiero's head names (aspp, segformer, ultrafast_segformer, extremely_fast_segformer) are ours already;
# `backbone.pretrained: true` is resolved by engine.rules.pretrained_file.


def translate(cfg: dict, source: str) -> dict:
    """`cfg` (a whole config or an override, as a nested dict) with SegHiero's keys renamed, in place."""
    backbone, head = cfg.get('backbone'), cfg.get('head')
    if isinstance(backbone, dict):
        if backbone.get('type') == 'segformer':
            backbone['type'] = 'mit'
        if isinstance(backbone.get('variant'), str) and backbone['variant'].startswith('mit-'):
            backbone['variant'] = backbone['variant'].removeprefix('mit-')
        rename(backbone, 'depth', 'variant', 'backbone', source, str)
        rename(backbone, 'checkpointing', 'with_cp', 'backbone', source)  # its name before one option served all
    if isinstance(head, dict):
        rename(head, 'proj_dim', 'channels', 'head', source)
    return cfg


def rename(section: dict, alias: str, key: str, name: str, source: str, convert=lambda value: value) -> None:
    if alias not in section:
        return
    if key in section:
        raise ConfigError(f"{source}: '{name}.{alias}' and '{name}.{key}' say the same thing; give one")
    section[key] = convert(section.pop(alias))


def flatten(sections: dict, prefix: str = '') -> dict:
    """{'train.optimizer.lr': 0.001, ...}: nested sections as dotted keys, as overrides name them (an
    empty section stays a value)."""
    flat = {}
    for key, value in sections.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


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


FOREIGN_KEYS = {  # keys of other repos' configs (SegHiero's guide) that are command-line choices here
    'device': 'the device is chosen on the command line: --device cuda (or cpu; default auto, CUDA where there is one)',
}


def validate(cfg: dict, schema: dict, source: str, prefix: str = '') -> None:
    for key, value in cfg.items():
        name = prefix + key
        if name in FOREIGN_KEYS:
            raise ConfigError(f"{source}: '{name}' is not a config key: {FOREIGN_KEYS[name]}")
        if key not in schema and prefix.rstrip('.') not in CLASS_OPTIONS:
            raise ConfigError(f"{source}: unknown key '{name}'{did_you_mean(key, schema)}")
        if key not in schema:
            continue  # keyword arguments of the backbone, head or dataset: checked against it by check_kwargs
        expected = schema[key]
        if value == REQUIRED:
            raise ConfigError(f"{source}: '{name}' is required")
        check_type(name, value, expected, source)
        if name in BOUNDS and value is not None:
            check_bounds(name, value, BOUNDS[name], source)
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
        raise ConfigError(
            f"{source}: '{name}' must be one of {list(CHOICES[name])}, got {value!r}"
            f'{did_you_mean(str(value), [str(c) for c in CHOICES[name]])}'
        )


def check_bounds(name: str, value, bounds, source: str) -> None:
    """`value` meets every constraint of `bounds`, or a ConfigError saying which and what was given."""
    for bound in bounds:
        if not holds(value, bound):
            raise ConfigError(f"{source}: '{name}' must be {describe_bound(bound)}, got {value!r}")


def holds(value, bound) -> bool:
    if isinstance(bound, Each):
        return isinstance(value, (list, tuple)) and all(
            is_number(item) and all(holds(item, b) for b in bound.bounds) for item in value
        )
    if isinstance(bound, at.GroupedMetadata):
        return all(holds(value, part) for part in bound)
    if isinstance(bound, at.Predicate):
        return bool(bound.func(value))
    if isinstance(bound, (at.MinLen, at.MaxLen)):
        return hasattr(value, '__len__') and (
            len(value) >= bound.min_length if isinstance(bound, at.MinLen) else len(value) <= bound.max_length
        )
    limit = {
        at.Gt: lambda: value > bound.gt,
        at.Ge: lambda: value >= bound.ge,
        at.Lt: lambda: value < bound.lt,
        at.Le: lambda: value <= bound.le,
    }
    return is_number(value) and limit[type(bound)]()


def describe_bound(bound) -> str:
    if isinstance(bound, Each):
        return 'a list of numbers, each ' + ' and '.join(describe_bound(b) for b in bound.bounds)
    if isinstance(bound, at.Len):
        exact = bound.min_length == bound.max_length
        return (f'a list of {bound.min_length}' if exact else f'a list of at least {bound.min_length}') + (
            ' items' if exact or bound.max_length is None else f' to {bound.max_length} items'
        )
    if isinstance(bound, at.Predicate):
        return bound.func.__name__.replace('_', ' ')
    for kind, attribute, symbol in ((at.Gt, 'gt', '>'), (at.Ge, 'ge', '>='), (at.Lt, 'lt', '<'), (at.Le, 'le', '<=')):
        if isinstance(bound, kind):
            return f'a number {symbol} {getattr(bound, attribute)}'
    return ' and '.join(describe_bound(part) for part in bound)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def choose(section: str, name, registry: dict, source: str):
    """The class `registry[name]`, or a ConfigError listing the valid names."""
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(
            f"{source}: '{section}.type' is '{name}'; valid: {', '.join(registry)}{did_you_mean(str(name), registry)}"
        )
    return registry[name]


def check_kwargs(
    cls, kwargs: dict, section: str, source: str, provided=('in_channels', 'num_classes'), suggest=()
) -> None:
    """Check YAML keys against `cls.__init__`: names (with a did-you-mean, also among the section's
    other valid keys `suggest`) and annotated types."""
    params, hints = keyword_parameters(cls)
    params = {n: p for n, p in params.items() if n not in provided}
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(
                f"{source}: unknown key '{section}.{key}' for {cls.__name__} (accepts: "
                f'{", ".join(params) or "nothing"}){did_you_mean(key, [*params, *suggest])}'
            )
        hint, bounds = unannotated(hints.get(key))
        if hint is not None and not matches(value, hint):
            raise ConfigError(
                f"{source}: '{section}.{key}' must be {describe(hint)}, got {type(value).__name__} {value!r}"
            )
        if value is not None:
            check_bounds(f'{section}.{key}', value, bounds, source)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"{source}: '{section}' ({cls.__name__}) needs {', '.join(repr(n) for n in missing)}")


def unannotated(hint) -> tuple:
    """(the type, its constraints) of an annotation: `Annotated[float, Ge(0)]` -> (float, (Ge(0),)).
    A string in the metadata documents the option (`option_doc`) and constrains nothing."""
    if typing.get_origin(hint) is typing.Annotated:
        return hint.__origin__, tuple(m for m in hint.__metadata__ if not isinstance(m, str))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [unannotated(arg) for arg in typing.get_args(hint)]
        return typing.Union[tuple(part for part, _ in parts)], tuple(b for _, bounds in parts for b in bounds)
    return hint, ()


def option_doc(hint) -> str:
    """The description an option's annotation carries (`Annotated[bool, 'what it does'] = True`), or ''."""
    if typing.get_origin(hint) is typing.Annotated:
        return ' '.join(m for m in hint.__metadata__ if isinstance(m, str))
    return ''


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
        hints = {**typing.get_type_hints(init, include_extras=True), **hints}
        if all(p.kind != p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return params, hints


def matches(value, hint) -> bool:
    """A small runtime check of YAML values against simple annotations (int, float, list, Optional...)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
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
    if typing.get_origin(hint) is typing.Literal:
        return f'one of {list(typing.get_args(hint))}'
    return 'null' if hint is type(None) else getattr(hint, '__name__', str(hint))


def class_schema(section: str, cls, provided=()) -> dict:
    """The defaults of a section whose keys are the keyword arguments of `cls` (less `provided`),
    their types, bounds and choices entered in TYPES, BOUNDS and CHOICES: declared once, in the class."""
    params, hints = keyword_parameters(cls)
    defaults = {}
    for name, param in params.items():
        if name in provided:
            continue
        key, (hint, bounds) = f'{section}.{name}', unannotated(hints.get(name))
        defaults[name] = param.default
        if bounds:
            BOUNDS[key] = bounds
        if typing.get_origin(hint) is typing.Literal:
            CHOICES[key] = typing.get_args(hint)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):  # a Literal member: its values' type
            literal = typing.Literal
            TYPES[key] = tuple(
                type(typing.get_args(a)[0]) if typing.get_origin(a) is literal else a for a in typing.get_args(hint)
            )
    return defaults


def loss_schema() -> dict:
    """train.loss: each term's weight under its name (a number >= 0), followed by its options."""
    defaults = {}
    for name, term in LOSS_TERMS.items():
        defaults[name] = term.weight
        BOUNDS[f'train.loss.{name}'] = (at.Ge(0),)
        defaults.update(class_schema('train.loss', term))
    return defaults


DEFAULTS['train']['loss'] = loss_schema()
DEFAULTS['train']['mask_loss'] = class_schema('train.mask_loss', MaskClassificationLoss, provided=('ignore_index',))


def dump_config(cfg: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
