"""The option tables of configs/README.md that the code declares: the loss terms and their options
(engine/loss_terms.py), the set-prediction loss (engine/mask_losses.py) and the metrics
(engine/metrics.py). Defaults, choices and descriptions come from the classes, so they cannot drift;
tools/make_docs.py writes them into the page.
"""

import inspect

from engine.config import keyword_parameters, option_doc
from engine.loss_terms import LOSS_TERMS
from engine.mask_losses import MaskClassificationLoss
from engine.metrics import DEFAULT_METRICS, METRICS

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


def losses(page=None) -> str:
    rows = [*HEADER]
    for name, term in LOSS_TERMS.items():
        rows.append(f'| `loss.{name}` | {term.weight} | weight of the term (0: off). {summary(term)} |')
        rows += option_rows('loss', term)
    masks = [*HEADER, *option_rows('mask_loss', MaskClassificationLoss, provided=('ignore_index',))]
    return (
        '### `train.loss`: the per-pixel terms\n\nEvery term whose weight is above 0 is added; an auxiliary '
        "head (`aux_head.loss_weight`, 0.4) gets the same sum. A term's options are refused while its weight "
        'is 0.\n\n' + '\n'.join(rows) + '\n\n### `train.mask_loss`: the set-prediction loss\n\nFor heads '
        'trained by matching queries to masks (Mask2Former), which do not read `train.loss`; the defaults are '
        'the published ones.\n\n' + '\n'.join(masks)
    )


def metrics(page=None) -> str:
    names = ', '.join(f'`{name}`' for name in METRICS)
    return (
        f'`eval.metrics` (default `[{", ".join(DEFAULT_METRICS)}]`) may list {names}; mIoU is always computed '
        '(it chooses `best.pth`). They are logged at each validation, to TensorBoard and `metrics.jsonl`, and '
        'printed and saved by `evaluate.py`, each class mean with its per-class values.'
    )
