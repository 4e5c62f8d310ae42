"""Datasets from the `data` section of a config."""

from pathlib import Path

from datasets import DATASETS

from . import dist
from .config import DEFAULTS
from .inference import eval_pipeline

# Dataset arguments that build_dataset fills from the generic `data` keys; the other keys of `data`
# that are not in DEFAULTS are the dataset's own options (label_map, on_invalid, ...).
DATASET_ARGUMENTS = (
    'root',
    'split',
    'num_classes',
    'pipeline',
    'ignore_index',
    'reduce_zero_label',
    'class_names',
    'palette',
    'seed',
    'mean',
    'in_channels',
)


def dataset_options(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in DEFAULTS['data']}


def build_dataset(cfg: dict, split: str, work_dir=None):
    """The dataset of `split` ('train' or 'val'). Its scan is cached in <work_dir>/scan_cache (default:
    output.work_dir) unless data.cache_dir says otherwise; under torchrun rank 0 builds first, so the
    others read its cache. The val set's images are what inference takes (`eval_pipeline`)."""
    data, work_dir = cfg['data'], work_dir or cfg['output']['work_dir']
    options = dataset_options(data)
    if work_dir:
        options.setdefault('cache_dir', str(Path(work_dir) / 'scan_cache'))
    if not dist.is_main():
        dist.barrier()
    dataset = DATASETS[data['type']](
        data['root'],
        data[split]['split'],
        data['num_classes'],
        pipeline=eval_pipeline(cfg) if split == 'val' else data[split]['pipeline'],
        ignore_index=data['ignore_index'],
        reduce_zero_label=data['reduce_zero_label'],
        class_names=data['class_names'],
        palette=data['palette'],
        seed=cfg['train']['seed'],
        mean=data['mean'],
        in_channels=data['in_channels'],
        **options,
    )
    if dist.is_main():
        dist.barrier()
    return dataset
