"""Why a recipe learns CamVid well: controlled runs, each one change away from a base config.

    OMP_NUM_THREADS=1 nice python benchmarks/camvid_recipes.py                       # every row, 600 iterations
    OMP_NUM_THREADS=1 nice python benchmarks/camvid_recipes.py --rows base ce_dice --jobs 2
    python benchmarks/camvid_recipes.py --report-only                                # the table so far

Every row is a train.py run of --config (default configs/camvid_deeplabv3plus.yaml, the recipe the
study started from) with the row's overrides and nothing else changed: same data, crops, batch and
seed, --iters iterations of which the first eighteenth warm up (100 of 1800), validated on the whole val set
at a third, two thirds and the end. The rows cover the loss, the augmentation, the optimizer and its
learning rate, the schedule, the output stride, the decoder and the initialisation; ROWS names them with
the change (a loss row sets the whole loss, so it means the same on every base). Rows compose with '+':
`--rows base aug_mmseg+peer_optim` runs one row with both changes. benchmarks/camvid_heldout.py --rows
runs them on the held-out-sequence folds.

The full-budget study behind configs/camvid.yaml (its winning row, `dice_smp+aug_mmseg+cosine`) starts
from the previous recipe and validates the moving average of the weights beside the raw ones; a seed
is one more --set (and its own --out):

    python benchmarks/camvid_recipes.py --config configs/camvid_fpn_smp_aug.yaml --iters 1800 \
        --set train.ema_decay=0.995 train.seed=0 --out work_dirs/camvid_study/seed0 \
        --rows base aug_mmseg dice_smp+aug_mmseg dice_smp+aug_mmseg+cosine

Runs live in <out>/<row> (`--resume auto`: a rerun skips finished rows and continues stopped ones);
with --results, a row that result file holds finished under the same base, overrides and budget counts
as finished too, so a long study goes on from a fresh checkout whose run folders are gone.
The table (printed and written to <out>/recipes.md and recipes.json) gives, per row, the change, the
val mIoU at each validation point, the final difference to the base row, and the run's wall time.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from ablation import is_finished, resumable_run, run_processes, say  # noqa: E402

from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError, read_yaml  # noqa: E402
from engine.logger import run_seconds, validation_curve  # noqa: E402
from engine.outputs import write_results  # noqa: E402
from engine.rules import load_config  # noqa: E402
from tools.measure import recorded_rows, write_result_table  # noqa: E402

DEFAULT_CONFIG = 'configs/camvid_deeplabv3plus.yaml'
DEFAULT_ITERS = 600
WARMUP_FRACTION = 18
VALIDATIONS = 3
STRONG_PIPELINE = [  # twice the scale range and stronger colour jitter than the mmseg pipeline of the base
    {'type': 'random_resize', 'scale': [480, 360], 'ratio_range': [0.5, 2.0]},
    {'type': 'random_crop', 'size': [256, 256], 'cat_max_ratio': 0.75},
    {'type': 'random_flip', 'prob': 0.5},
    {'type': 'photometric', 'brightness_delta': 48, 'contrast_range': [0.4, 1.6], 'saturation_range': [0.4, 1.6]},
    {'type': 'pad', 'size': [256, 256]},
]
SMP_PIPELINE = read_yaml(ROOT / 'configs' / 'camvid_fpn_smp_aug.yaml')['data']['train']['pipeline']
MMSEG_PIPELINE = read_yaml(ROOT / 'configs' / '_base_' / 'datasets' / 'camvid.yaml')['data']['train']['pipeline']
CLASS_WEIGHTS = read_yaml(ROOT / 'configs' / 'camvid_deeplabv3plus.yaml')['train']['loss']['class_weight']
"""Square root of median-frequency balancing: the weights of every 'weighted CE' row."""


def loss(**terms) -> list:
    """The override that makes the loss exactly `terms` (the rest at their defaults) whatever the base's
    loss is: a loss row means the same on every base."""
    return ['train.loss=' + json.dumps({'_delete_': True, **terms})]


ROWS = {  # name -> (the change, its overrides of --config)
    'base': ('none: the base config', []),
    'ce': ('loss: weighted CE only', loss(class_weight=CLASS_WEIGHTS)),
    'ce_dice': ('loss: weighted CE + Dice', loss(class_weight=CLASS_WEIGHTS, dice=1.0)),
    'ce_dice_smp': (
        "loss: weighted CE + SMP's Dice (pooled over the batch)",
        loss(class_weight=CLASS_WEIGHTS, dice=1.0, dice_style='smp'),
    ),
    'dice': ('loss: Dice only', loss(ce=0, dice=1.0)),
    'dice_smp': ("loss: SMP's Dice only (the peer's)", loss(ce=0, dice=1.0, dice_style='smp')),
    'lovasz': ('loss: Lovász-Softmax only', loss(ce=0, lovasz=1.0)),
    'ohem': (
        'loss: weighted CE with OHEM (p < 0.7, ≥ 12500 pixels per crop)',
        loss(class_weight=CLASS_WEIGHTS, ohem={'thresh': 0.7, 'min_kept': 12500}),
    ),
    'ce_unweighted': ('loss: CE without class weights', loss()),
    'no_ema': ('no moving average of the weights: the raw model is delivered', ['train.ema_decay=null']),
    'aspp': (
        "decoder: DeepLabV3+'s (ASPP, 128 channels), output stride 16",
        ['head={_delete_: true, type: aspp, channels: 128, dilations: [1, 6, 12, 18]}', 'backbone.output_stride=16'],
    ),
    'fpn': ('decoder: FPN head, output stride 32', ['head={_delete_: true, type: fpn}', 'backbone.output_stride=32']),
    'init_one': (
        "init: every residual block's last BatchNorm starts at one (torchvision's, SMP's), not zero (timm's)",
        ['backbone.zero_init_last=false'],
    ),
    'os8': (
        'output stride 8 (ASPP dilations 1, 12, 24, 36)',
        ['backbone.output_stride=8', 'head.dilations=[1, 12, 24, 36]'],
    ),
    'adam_2e-4': (
        "optimizer: Adam lr 2e-4, no weight decay (the peer's)",
        ['train.optimizer={type: adamw, lr: 0.0002, weight_decay: 0}'],
    ),
    'peer_optim': (
        "optimizer: Adam lr 2e-4, no weight decay, cosine to 1e-5 without warm-up (the peer's)",
        [
            'train.optimizer={type: adamw, lr: 0.0002, weight_decay: 0}',
            'train.schedule={type: cosine, min_lr: 0.05, warmup_iters: 0}',
        ],
    ),
    'sgd': (
        'optimizer: SGD lr 0.01, momentum 0.9, weight decay 5e-4 (mmseg)',
        ['train.optimizer={type: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}'],
    ),
    'lr_5e-4': ('optimizer: AdamW lr 5e-4', ['train.optimizer.lr=0.0005']),
    'lr_2e-3': ('optimizer: AdamW lr 2e-3', ['train.optimizer.lr=0.002']),
    'lr_3e-3': ('optimizer: AdamW lr 3e-3', ['train.optimizer.lr=0.003']),
    'cosine': ('schedule: cosine instead of poly 0.9', ['train.schedule.type=cosine']),
    'poly': ('schedule: poly 0.9 instead of cosine', ['train.schedule.type=poly', 'train.schedule.power=0.9']),
    'aug_strong': (
        'augmentation: scale x U[0.5, 2], stronger colour jitter',
        ['data.train.pipeline=' + json.dumps(STRONG_PIPELINE)],
    ),
    'aug_mmseg': (
        "augmentation: mmseg's (rescale x U[0.5, 1.5], crop, flip, photometric distortion)",
        ['data.train.pipeline=' + json.dumps(MMSEG_PIPELINE)],
    ),
    'head_bn': ('decoder: BatchNorm in the head', ['head.norm=bn']),
    'aux': (
        'decoder: an auxiliary FCN head on the stride-16 features (loss weight 0.4)',
        ['aux_head={type: fcn, in_index: 2, channels: 256, loss_weight: 0.4}'],
    ),
    'os16': ('output stride 16 (the last stage dilated)', ['backbone.output_stride=16']),
    'r34': ('backbone: ResNet-34', ['backbone.variant=34']),
    'aug_smp': (
        "augmentation: SMP's CamVid example (albumentations: shift-scale, perspective, noise, blur, colour)",
        ['data.train.pipeline=' + json.dumps(SMP_PIPELINE)],
    ),
}


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--config', default=DEFAULT_CONFIG, help=f'the base row (default: {DEFAULT_CONFIG})')
    parser.add_argument(
        '--rows', nargs='+', type=row_name, default=list(ROWS), help="rows, or rows joined by '+' (default: all)"
    )
    parser.add_argument(
        '--iters', type=number(int, 1), default=DEFAULT_ITERS, help=f'iterations per run (default: {DEFAULT_ITERS})'
    )
    parser.add_overrides('extra overrides for every row (e.g. train.seed=1)')
    parser.add_argument('--out', type=Path, default=Path('work_dirs/camvid_recipes'), help='(default: %(default)s)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--jobs', type=number(int, 1), default=1, help='train.py processes at a time (default: 1)')
    parser.add_argument('--report-only', action='store_true', help='train nothing: the table of the runs so far')
    parser.add_argument(
        '--results', type=Path, metavar='DIR', help='also write the table as a result file there (what the docs render)'
    )
    parser.add_argument('--study', default='camvid_recipes', help="the result file's name (default: %(default)s)")
    return parser.parse_args(argv)


def row_name(text: str) -> str:
    """An argparse `type`: a row of ROWS, or rows joined by '+' (their changes applied in that order)."""
    unknown = [part for part in text.split('+') if part not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown row {unknown[0]!r} (rows: {", ".join(ROWS)})')
    return text


def row_change(row: str) -> tuple:
    """(the change in words, its overrides) of a row or of rows joined by '+'."""
    parts = [ROWS[part] for part in row.split('+')]
    return '; '.join(change for change, _ in parts), [override for _, overrides in parts for override in overrides]


def row_overrides(row: str, args) -> list:
    """The budget (iterations, warm-up, validation points), the row's change, then the user's overrides."""
    budget = [
        f'train.max_iters={args.iters}',
        f'train.val_interval={max(1, args.iters // VALIDATIONS)}',
        f'train.schedule.warmup_iters={args.iters // WARMUP_FRACTION}',
    ]
    return [*budget, *row_change(row)[1], *args.set]


def train_arguments(row: str, args) -> list:
    work_dir = args.out / row
    overrides = row_overrides(row, args)
    load_config(args.config, overrides)  # a row that cannot run stops here, before any training
    return resumable_run(args.config, work_dir, args.device, overrides)


def train_rows(args, recorded: dict) -> None:
    """Train the rows not finished yet (in --out, or `recorded`), --jobs at a time, the table and result
    file written again as each one finishes."""
    todo = []
    for row in args.rows:
        arguments = train_arguments(row, args)
        if is_finished(args.out / row, args.iters):
            say(f'{args.out / row}: finished, skipped')
        elif args.iters in recorded.get(row, {}).get('miou', {}):
            say(f'{args.out / row}: finished, read back from {args.results}')
        else:
            todo.append((args.out / row, arguments))
    run_processes(todo, args.jobs, after_each=lambda: report(args, recorded))


def minutes(work_dir: Path):
    """Minutes from the run's start to its last record (None before two): a stopped and resumed run
    counts its pause too."""
    seconds = run_seconds(work_dir)
    return None if seconds is None else seconds / 60


def result_notes(args) -> list:
    return [f'val mIoU (%) after {args.iters} iterations; base config {args.config}, overrides {args.set}']


def recorded_curves(args) -> dict:
    """{row: {'miou': {point: val mIoU}, 'miou_ema': {...}}} of the rows the --results file holds under
    the same base, overrides and budget."""
    curves = {}
    for cells in recorded_rows(args.results, args.study, args.device, result_notes(args)):
        curve = curves.setdefault(cells['row'], {'miou': {}, 'miou_ema': {}})
        for column, value in cells.items():
            if column.startswith('iter ') and value is not None:
                _, point, *weights = column.split()  # 'iter 600', or 'iter 600 raw' / 'iter 600 average'
                curve['miou_ema' if weights == ['average'] else 'miou'][int(point)] = value
    return curves


def row_curves(row: str, args, recorded: dict) -> tuple:
    """(raw, averaged) {iteration: val mIoU} of a row: of its run in --out, else as recorded."""
    kept = recorded.get(row, {'miou': {}, 'miou_ema': {}})
    work_dir = args.out / row
    return validation_curve(work_dir) or kept['miou'], validation_curve(work_dir, 'val_ema') or kept['miou_ema']


def report(args, recorded: dict) -> list:
    points = [max(1, args.iters // VALIDATIONS) * k for k in range(1, VALIDATIONS)] + [args.iters]
    base_final = row_curves('base', args, recorded)[0].get(args.iters)
    rows = []
    for row in args.rows:
        scores, averaged = row_curves(row, args, recorded)
        final = scores.get(args.iters)
        difference = None if final is None or base_final is None else final - base_final
        rows.append(
            {
                'row': row,
                'change': row_change(row)[0],
                'overrides': row_change(row)[1],
                'miou': {p: scores.get(p) for p in points},
                'miou_ema': {p: averaged.get(p) for p in points},
                'difference': difference,
                'minutes': minutes(args.out / row),
            }
        )
    cell = lambda value, form: '' if value is None else format(value, form)  # noqa: E731
    with_ema = any(value is not None for r in rows for value in r['miou_ema'].values())

    def at(r: dict, p: int) -> str:
        raw = cell(r['miou'][p], '.2f')
        return f'{raw} / {cell(r["miou_ema"][p], ".2f")}' if with_ema else raw

    heading = ' | '.join(f'iter {p}' + (' (raw / EMA)' if with_ema else '') for p in points)
    lines = [
        f'| row | change from {args.config} | {heading} | final − base | min |',
        '|---|---|' + '---|' * (len(points) + 2),
    ]
    for r in rows:
        scores = ' | '.join(at(r, p) for p in points)
        lines.append(
            f'| `{r["row"]}` | {r["change"]} | {scores} | {cell(r["difference"], "+.2f")} | '
            f'{cell(r["minutes"], ".0f")} |'
        )
    table = '\n'.join(lines)
    print(table)
    record = {'config': args.config, 'iters': args.iters, 'set': args.set, 'rows': rows}
    write_results(args.out, {'recipes.md': table + '\n', 'recipes.json': json.dumps(record, indent=2) + '\n'})
    if args.results:
        weights = [('raw', 'miou'), ('average', 'miou_ema')] if with_ema else [('', 'miou')]
        columns = ['row', 'change'] + [f'iter {p} {name}'.strip() for p in points for name, _ in weights]
        table_rows = [[r['row'], r['change']] + [r[key][p] for p in points for _, key in weights] for r in rows]
        path = write_result_table(args.results, args.study, columns, table_rows, args.device, result_notes(args))
        print('results:', path)
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    if 'base' not in args.rows:
        raise ConfigError("--rows: 'base' is needed, every row is compared with it")
    recorded = recorded_curves(args)
    if not args.report_only:
        train_rows(args, recorded)
    return report(args, recorded)


if __name__ == '__main__':
    run_cli(main)
