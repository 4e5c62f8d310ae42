"""Print the config a run would use: a YAML file with its `_base_` chain and `--set` overrides, checked,
every default filled in (the backbone's and heads' constructor arguments too, as train.py stores them
in the run's config.yaml), and each value that is not its default marked with the default.

    python tools/print_config.py configs/offseg_b.yaml
    python tools/print_config.py configs/camvid.yaml --set head.type=aspp train.optimizer.lr=0.01

A value without a default (a model's type, the data root) is marked `# required`.
"""

import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, run_cli  # noqa: E402
from engine.config import DEFAULTS, REQUIRED  # noqa: E402
from engine.rules import MODEL_SECTIONS, load_config, model_defaults, with_model_defaults  # noqa: E402

NO_DEFAULT = object()


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('config', help='YAML file')
    parser.add_overrides()
    return parser.parse_args(argv)


def defaults_of(cfg: dict) -> dict:
    """The default of each key of `cfg`: the config's defaults, and for the backbone and heads their
    constructor's."""
    defaults = copy.deepcopy(DEFAULTS)
    for section in MODEL_SECTIONS:
        if cfg.get(section):
            defaults[section] = {**(DEFAULTS[section] or {}), **model_defaults(section, cfg[section]['type'])}
    return defaults


def flow(value) -> str:
    """`value` as one line of YAML."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9, sort_keys=False).strip()[1:-1]


def marked_lines(cfg: dict, defaults, indent: int = 0) -> list:
    """YAML lines of `cfg`: a mapping whose defaults are a mapping as a block, anything else on one line,
    marked where it differs from its default."""
    lines = []
    for key, value in cfg.items():
        default = defaults.get(key, NO_DEFAULT) if isinstance(defaults, dict) else NO_DEFAULT
        if isinstance(value, dict) and value and isinstance(default, dict):
            lines.append(f'{"  " * indent}{key}:')
            lines += marked_lines(value, default, indent + 1)
            continue
        line = f'{"  " * indent}{key}: {flow(value)}'
        if default == REQUIRED:
            line += '  # required'
        elif default is not NO_DEFAULT and default != value:
            line += f'  # default: {flow(default)}'
        lines.append(line)
    return lines


def main(argv=None) -> str:
    args = parse_args(argv)
    cfg = with_model_defaults(load_config(args.config, args.set))
    text = '\n'.join(marked_lines(cfg, defaults_of(cfg)))
    print(text)
    return text


if __name__ == '__main__':
    run_cli(main)
