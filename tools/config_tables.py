"""Regenerate the option tables of configs/README.md that the code declares: the loss terms and their
options (engine/loss_terms.py), the set-prediction loss (engine/mask_losses.py) and the metrics
(engine/metrics.py). Defaults, choices and descriptions come from the classes, so they cannot drift.

    python tools/config_tables.py            # print the tables
    python tools/config_tables.py --write    # rewrite them in configs/README.md
"""

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser  # noqa: E402
from engine.config import keyword_parameters, option_doc  # noqa: E402
from engine.loss_terms import LOSS_TERMS  # noqa: E402
from engine.mask_losses import MaskClassificationLoss  # noqa: E402
from engine.metrics import DEFAULT_METRICS, METRICS  # noqa: E402
from engine.outputs import write_text  # noqa: E402

README = ROOT / 'configs' / 'README.md'
HEADER = ['| key | default | meaning |', '|---|---|---|']


def yaml_value(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: '`null`', True: 'true', False: 'false'}[value]
    return f'`{value}`' if isinstance(value, str) else str(value)


def option_rows(prefix: str, cls, provided=()) -> list:
    params, hints = keyword_parameters(cls)
    return [
        f'| `{prefix}.{name}` | {yaml_value(param.default)} | {option_doc(hints.get(name))} |'
        for name, param in params.items()
        if name not in provided
    ]


def summary(cls) -> str:
    """The first paragraph of the class's docstring, on one line."""
    return ' '.join(inspect.getdoc(cls).split('\n\n')[0].split()).rstrip('.')


def markers(name: str) -> tuple:
    return f'<!-- config_tables {name}: begin -->', f'<!-- config_tables {name}: end -->'


def tables() -> dict:
    """{block name: its Markdown, between its markers}."""
    rows = [*HEADER]
    for name, term in LOSS_TERMS.items():
        rows.append(f'| `loss.{name}` | {term.weight} | weight of the term (0: off). {summary(term)} |')
        rows += option_rows('loss', term)
    masks = [*HEADER, *option_rows('mask_loss', MaskClassificationLoss, provided=('ignore_index',))]
    metrics = ', '.join(f'`{name}`' for name in METRICS)
    losses = (
        '### `train.loss`: the per-pixel terms\n\nEvery term whose weight is above 0 is added; an auxiliary '
        "head (`aux_head.loss_weight`, 0.4) gets the same sum. A term's options are refused while its weight "
        'is 0.\n\n' + '\n'.join(rows) + '\n\n### `train.mask_loss`: the set-prediction loss\n\nFor heads '
        'trained by matching queries to masks (Mask2Former), which do not read `train.loss`; the defaults are '
        'the published ones.\n\n' + '\n'.join(masks)
    )
    metrics = (
        f'`eval.metrics` (default `[{", ".join(DEFAULT_METRICS)}]`) may list {metrics}; mIoU is always computed '
        '(it chooses `best.pth`). They are logged at each validation, to TensorBoard and `metrics.jsonl`, and '
        'printed and saved by `evaluate.py`, each class mean with its per-class values.'
    )
    blocks = {}
    for name, text in {'losses': losses, 'metrics': metrics}.items():
        begin, end = markers(name)
        blocks[name] = f'{begin}\n{text}\n{end}'
    return blocks


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument('--write', action='store_true', help='rewrite the tables in configs/README.md')
    args = parser.parse_args()
    blocks = tables()
    if not args.write:
        print('\n\n'.join(blocks.values()))
        return
    document = README.read_text()
    for name, text in blocks.items():
        begin, end = markers(name)
        start, stop = document.index(begin), document.index(end) + len(end)
        document = document[:start] + text + document[stop:]
    write_text(README, document)


if __name__ == '__main__':
    main()
