"""Every rule a config must meet, checked in one place before anything is built.

`engine/config.py` checks the shape of the config (known keys, types, choices); `check_config` adds
what needs the classes the config names: the keyword arguments of backbones, heads, datasets and
pipeline steps against their signatures, the loss and parameter-group rules, files that must exist
and combinations that cannot run. Every failure is a `ConfigError` naming the file and the key.
"""

import copy
import functools
import inspect
import json
from pathlib import Path

import torch

from datasets import DATASETS
from datasets.transforms import RGB_ONLY, TRANSFORMS, Pipeline
from models import BACKBONES, HEADS
from models.segmentor import join

from .config import (
    DEFAULTS,
    ConfigError,
    check_kwargs,
    choose,
    did_you_mean,
    is_number,
    keyword_parameters,
    read_config,
)
from .data import DATASET_ARGUMENTS, dataset_options
from .losses import aux_loss_weight, check_loss_config, uses_set_prediction_loss
from .metrics import METRICS
from .optim import check_rules
from .trackers import REQUIREMENTS, TRACKERS, missing_package

PRETRAINED_DIR = Path('pretrained')

PRETRAINED_FILES = {  # `backbone.pretrained: true`: the official ImageNet file, under its published name
    'resnet': 'resnet{variant}.pth',
    'convnext': 'convnext_{variant}.pth',
    'mit': 'mit_{variant}.pth',
    'mscan': 'mscan_{variant}.pth',
    'efficientformerv2': 'eformer_{variant}_450.pth',
    'swin': 'swin_{variant}_patch4_window7_224.pth',
    'dinov2': 'dinov2_{variant}_pretrain.pth',
    'dinov3': 'dinov3_{variant}_pretrain_lvd1689m.pth',  # published with a hash suffix, dropped here
    'dinov3_convnext': 'dinov3_convnext_{variant}_pretrain_lvd1689m.pth',
}

DEEPLAB_SPAN = 288  # the widest ASPP dilation times the output stride in DeepLab v3/v3+ (18 x 16, 36 x 8)

# Keys of a model section that are not constructor arguments.
NOT_ARGUMENTS = {
    'backbone': ('type', 'pretrained', 'frozen', 'with_cp'),
    'head': ('type',),
    'aux_head': ('type', 'loss_weight'),  # its share of the loss (engine/losses.py)
}


def section_kwargs(cfg: dict, section: str) -> dict:
    """The constructor arguments of a model section (`backbone`, `head`, `aux_head`)."""
    return {k: v for k, v in cfg[section].items() if k not in NOT_ARGUMENTS[section]}


def model_defaults(section: str, type_name: str) -> dict:
    """{argument: default} of the constructor of a model section's class, for the arguments whose
    default a YAML file can hold (numbers, strings, lists, mappings, null)."""
    params, _ = keyword_parameters(MODEL_SECTIONS[section][type_name])
    return {
        name: plain(param.default)
        for name, param in params.items()
        if param.default is not inspect.Parameter.empty and is_plain(param.default)
    }


def with_model_defaults(cfg: dict) -> dict:
    """`cfg` with every constructor argument of the backbone and heads that the YAML left out, at its
    default: the settings the model was built with, as a run stores them (config.yaml, checkpoints)."""
    filled = copy.deepcopy(cfg)
    for section in MODEL_SECTIONS:
        if filled.get(section):
            defaults = model_defaults(section, filled[section]['type'])
            filled[section] = {**filled[section], **{k: v for k, v in defaults.items() if k not in filled[section]}}
    return filled


def is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def plain(value):
    """A default as YAML holds it: tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def pretrained_file(backbone: dict, source: str = 'config'):
    """The weights `backbone.pretrained` names: its path, or for `true` the conventional local file of the
    variant under pretrained/ (never downloaded); None for none."""
    pretrained = backbone['pretrained']
    if pretrained is not True:
        return pretrained or None
    if backbone['type'] not in PRETRAINED_FILES:
        raise ConfigError(
            f'{source}: backbone.pretrained: true has no conventional file for '
            f"'{backbone['type']}'; give the path of the weights"
        )
    variant = backbone.get('variant', keyword_parameters(BACKBONES[backbone['type']])[0]['variant'].default)
    return str(PRETRAINED_DIR / PRETRAINED_FILES[backbone['type']].format(variant=variant))


def load_config(path, overrides=()) -> dict:
    """The resolved config of `path` (with `_base_` files and `key=value` overrides), fully checked."""
    cfg = read_config(path, overrides, accepted_keys)
    check_config(cfg, str(path))
    return cfg


MODEL_SECTIONS = {'backbone': BACKBONES, 'head': HEADS, 'aux_head': HEADS}


def accepted_keys(section: str, type_name):
    """The keys a model section of `type_name` takes (its class's arguments and the section's generic
    keys), or None where that is not known (another section, or an unknown type, reported later)."""
    registry = MODEL_SECTIONS.get(section)
    if registry is None or not isinstance(type_name, str) or type_name not in registry:
        return None
    return {*keyword_parameters(registry[type_name])[0], *NOT_ARGUMENTS[section]}


def check_config(cfg: dict, source: str) -> None:
    """All rules of a resolved config; `source` (the file, or a checkpoint's stored config) is named in errors."""
    check_data(cfg, source)
    check_model(cfg, source)
    check_training(cfg, source)
    check_evaluation(cfg['eval'], source)
    check_loggers(cfg['output']['loggers'], source)


def check_loggers(loggers: list, source: str) -> None:
    for name in loggers:
        if name not in TRACKERS:
            raise ConfigError(
                f"{source}: output.loggers: '{name}' is not a tracker (valid: {', '.join(TRACKERS)})"
                f'{did_you_mean(str(name), TRACKERS)}'
            )


def check_trackers_installed(cfg: dict, source: str) -> None:
    """Training only: the packages of the trackers in `output.loggers` (evaluating needs none)."""
    for name in cfg['output']['loggers']:
        package = missing_package(name)
        if package:
            raise ConfigError(
                f"{source}: output.loggers names '{name}', but the {package} package is not installed "
                f'(pip install -r {REQUIREMENTS})'
            )


def check_model(cfg: dict, source: str) -> None:
    check_kwargs(
        choose('backbone', cfg['backbone']['type'], BACKBONES, source),
        section_kwargs(cfg, 'backbone'),
        'backbone',
        source,
    )
    pretrained = pretrained_file(cfg['backbone'], source)
    if pretrained and not Path(pretrained).expanduser().exists():
        raise ConfigError(
            f"{source}: backbone.pretrained '{pretrained}' not found (a local file or folder is "
            'expected; nothing is downloaded; --set backbone.pretrained=null trains from scratch)'
        )
    for section in ('head', 'aux_head'):
        if cfg[section]:
            check_kwargs(
                choose(section, cfg[section].get('type'), HEADS, source), section_kwargs(cfg, section), section, source
            )
    sections = {name: cfg[name] for name in ('backbone', 'head', 'aux_head')}
    problem = model_problem(json.dumps(sections, sort_keys=True), cfg['data']['num_classes'], input_size(cfg))
    if problem:
        raise ConfigError(f'{source}: {problem}')


def check_training_batch(cfg: dict, images: int, source: str) -> None:
    """The model trains on `images` images per process and step (train.py, once the processes are
    known): BatchNorm over a pooled 1x1 map (ASPP's image pooling) cannot train on one image, which
    torchrun or a small batch can leave to a process. Checked on the meta device in training mode."""
    sections = json.dumps({name: cfg[name] for name in ('backbone', 'head', 'aux_head')}, sort_keys=True)
    problem = model_problem(sections, cfg['data']['num_classes'], input_size(cfg), images, training=True)
    if problem and 'Expected more than 1 value per channel' in problem:
        raise ConfigError(
            f'{source}: {problem.split(":")[0]}: BatchNorm over a 1x1 map cannot train on {images} image(s) per '
            'process (train.batch_size / processes / train.accum_steps); give each process at least 2'
        )


def input_size(cfg: dict) -> tuple:
    """The size the model trains on: the first `random_crop` of the pipeline, enlarged by a `pad` step
    after it (a 512 crop padded to 518 for a patch of 14), else 512 x 512."""
    size = None
    for step in cfg['data']['train']['pipeline']:
        if step.get('type') == 'random_crop' and size is None:
            size = tuple(step['size'])
        elif step.get('type') == 'pad' and size is not None:
            size = tuple(max(a, b) for a, b in zip(size, step['size']))
    return size or (512, 512)


@functools.lru_cache(maxsize=256)
def model_problem(sections: str, num_classes: int, size: tuple, batch: int = 1, training: bool = False):
    """Why the model cannot be built or run on a (batch, 3, *size) batch (in eval mode, or training), or
    None. Built and run on the meta device (shapes only: no memory, no arithmetic), so an unknown
    variant, an `in_index` out of range or a backbone whose strides the head cannot take fail when the
    config is read, not after the data scan."""
    sections = json.loads(sections)
    section = 'backbone'
    try:
        with torch.device('meta'):
            backbone = BACKBONES[sections['backbone']['type']](**section_kwargs(sections, 'backbone')).train(training)
            heads = {}
            for section in ('head', 'aux_head'):
                if sections[section]:
                    cls = HEADS[sections[section]['type']]
                    heads[section] = cls(backbone.out_channels, num_classes, **section_kwargs(sections, section)).train(
                        training
                    )
            section = 'head'
            join(backbone, heads.get('head'), heads.get('aux_head'), sections['backbone'].get('frozen', False))
            section = 'backbone'
            features = backbone(torch.empty(batch, 3, *size))
            for section, head in heads.items():
                head(features)
    except NotImplementedError:
        return None  # an operation without a meta kernel: nothing can be concluded
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        return f'{section} ({sections[section]["type"]}) cannot be built or run with this config: {error}'
    return None


def check_training(cfg: dict, source: str) -> None:
    train = cfg['train']
    check_rules(train['param_groups'], source)
    backbone = BACKBONES[cfg['backbone']['type']]
    if train['layer_decay']['rate'] is not None and not hasattr(backbone, 'layer_id'):
        decaying = ', '.join(name for name, cls in BACKBONES.items() if hasattr(cls, 'layer_id'))
        raise ConfigError(
            f'{source}: train.layer_decay needs a backbone whose layers it can number ({decaying}); '
            f"'{cfg['backbone']['type']}' has none"
        )
    check_mask_annealing(cfg, source)
    backbone_warmup = train['schedule']['backbone_warmup']
    if backbone_warmup is not None and not (
        len(backbone_warmup) == 2
        and all(isinstance(n, int) and n >= 0 for n in backbone_warmup)
        and sum(backbone_warmup) < train['max_iters']
    ):
        raise ConfigError(
            f'{source}: train.schedule.backbone_warmup must be [delay, ramp], two iteration counts whose sum is '
            f'below train.max_iters ({train["max_iters"]}); got {backbone_warmup}'
        )
    check_loss_config(train['loss'], cfg['data']['num_classes'], source)
    aux_weight = aux_loss_weight(cfg)
    if not is_number(aux_weight) or aux_weight < 0:
        raise ConfigError(f"{source}: 'aux_head.loss_weight' must be a number >= 0, got {aux_weight!r}")
    unused, used = ('loss', 'mask_loss') if uses_set_prediction_loss(cfg['head']) else ('mask_loss', 'loss')
    changed = [key for key, value in train[unused].items() if value != DEFAULTS['train'][unused][key]]
    if changed:
        raise ConfigError(
            f'{source}: train.{unused}.{changed[0]} set, but the {cfg["head"]["type"]} head trains with '
            f'train.{used} ({"the set-prediction loss" if used == "mask_loss" else "per-pixel terms"}), '
            f'which does not read train.{unused}'
        )


def check_mask_annealing(cfg: dict, source: str) -> None:
    """`train.mask_annealing` windows: both lists or neither, one start and end per block the head
    masks (EoMT's `num_blocks`), each start before its end."""
    annealing = cfg['train']['mask_annealing']
    if annealing['start'] is None and annealing['end'] is None:
        return
    head = HEADS[cfg['head']['type']]
    if not getattr(head, 'anneals_attention_masks', False):
        raise ConfigError(
            f'{source}: train.mask_annealing set, but the {cfg["head"]["type"]} head has no masked attention to anneal'
        )
    blocks = cfg['head'].get('num_blocks', keyword_parameters(head)[0]['num_blocks'].default)
    starts, ends = annealing['start'], annealing['end']
    if starts is None or ends is None or len(starts) != blocks or len(ends) != blocks:
        raise ConfigError(
            f'{source}: train.mask_annealing.start and .end must list one iteration per masked block '
            f'(head.num_blocks = {blocks}); got start {starts}, end {ends}'
        )
    if not all(isinstance(a, int) and isinstance(b, int) and 0 <= a < b for a, b in zip(starts, ends)):
        raise ConfigError(
            f'{source}: train.mask_annealing: each start must be an iteration before its end; got {starts} -> {ends}'
        )


def training_warnings(cfg: dict) -> list:
    """Settings that run but are probably not what was meant (train.py logs them as warnings)."""
    train, found = cfg['train'], []
    if train['schedule']['warmup_iters'] >= train['max_iters']:
        found.append(
            f'train.schedule.warmup_iters ({train["schedule"]["warmup_iters"]}) is not below train.max_iters '
            f'({train["max_iters"]}): the whole run is warm-up, at a fraction of train.optimizer.lr '
            '(--set train.schedule.warmup_iters=N shortens it)'
        )
    span = atrous_span(cfg)
    if span > DEEPLAB_SPAN:
        head, stride = cfg['head'], cfg['backbone'].get('output_stride', 32)
        found.append(
            f'head.dilations {list(head_dilations(head))} at output stride {stride} reach {span} input pixels '
            f'from the centre, beyond the {DEEPLAB_SPAN} DeepLab pairs them with (dilations 12/24/36 at output '
            'stride 8, 6/12/18 at 16, 3/6/9 at 32): dilations meant for another output stride? '
            '(--set head.dilations=[...] or backbone.output_stride=...)'
        )
    return found


def head_dilations(head: dict) -> tuple:
    return tuple(head.get('dilations', keyword_parameters(HEADS[head['type']])[0]['dilations'].default))


def atrous_span(cfg: dict) -> int:
    """How far, in input pixels, the widest atrous branch of a DeepLab head reaches (0 for other heads)."""
    head = cfg['head']
    if 'dilations' not in keyword_parameters(HEADS[head['type']])[0]:
        return 0
    return max(head_dilations(head)) * cfg['backbone'].get('output_stride', 32)


def check_data(cfg: dict, source: str) -> None:
    dataset = choose('data', cfg['data']['type'], DATASETS, source)
    check_kwargs(
        dataset, dataset_options(cfg['data']), 'data', source, provided=DATASET_ARGUMENTS, suggest=DEFAULTS['data']
    )
    bands = cfg['data']['in_channels']
    for key in ('mean', 'std'):
        if len(cfg['data'][key]) != bands:
            raise ConfigError(
                f'{source}: data.{key} has {len(cfg["data"][key])} values for data.in_channels {bands}: give one '
                'per band (on the 0-255 scale of 8-bit images, 0-65535 of 16-bit ones)'
            )
    for split in ('train', 'val'):
        for i, step in enumerate(cfg['data'][split]['pipeline']):
            where = f'data.{split}.pipeline[{i}]'
            if not isinstance(step, dict):
                raise ConfigError(f"{source}: '{where}' must be a mapping with a 'type'")
            cls = choose(where, step.get('type'), TRANSFORMS, source)
            if bands != 3 and cls in RGB_ONLY:
                raise ConfigError(
                    f"{source}: '{where}' ({step['type']}) works on 8-bit RGB images; data.in_channels is {bands}"
                )
            check_kwargs(cls, {k: v for k, v in step.items() if k != 'type'}, where, source, ('ignore_index',))
        try:
            Pipeline(cfg['data'][split]['pipeline'], cfg['data']['ignore_index'], cfg['data']['mean'])
        except (ValueError, TypeError) as error:
            raise ConfigError(f'{source}: data.{split}.pipeline: {error}') from None
    ignore, classes = cfg['data']['ignore_index'], cfg['data']['num_classes']
    if 0 <= ignore < classes:
        raise ConfigError(
            f'{source}: data.ignore_index {ignore} is a class id (data.num_classes {classes}); '
            'labels of that class would be ignored (mmseg uses 255)'
        )


def check_evaluation(eval_cfg: dict, source: str) -> None:
    for name in eval_cfg['metrics']:
        if name not in METRICS:
            raise ConfigError(
                f"{source}: 'eval.metrics' names {name!r}; valid: {', '.join(METRICS)}"
                + did_you_mean(str(name), METRICS)
            )
    if eval_cfg['mode'] == 'slide' and not (eval_cfg['crop_size'] and eval_cfg['stride']):
        raise ConfigError(
            f"{source}: eval.mode 'slide' needs eval.crop_size and eval.stride "
            '(e.g. --set eval.crop_size=[512,512] eval.stride=[341,341])'
        )
