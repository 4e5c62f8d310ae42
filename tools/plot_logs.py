"""Training curves of one or several runs in one PNG, from each run's metrics.jsonl (never by parsing
train.log): the loss, the learning rate and the validation mIoU by default, a panel per key.

    python tools/plot_logs.py work_dirs/camvid
    python tools/plot_logs.py work_dirs/a work_dirs/b --keys loss dice mIoU mAcc --out curves.png

A key is looked up in the training records (loss terms, lr, images_per_s) and in the validation
records (`eval.metrics`: mIoU, mAcc, aAcc; the moving average of the weights, where a run keeps one,
dashed beside the model). The default output is curves.png in the first run's folder; a file this
tool did not write (plots.txt beside it lists what it did) is refused, never replaced.
"""

import sys
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.logger import METRICS_FILE, read_metrics  # noqa: E402
from engine.outputs import Manifest, write_image  # noqa: E402
from engine.visualize import figure_pixels  # noqa: E402

DEFAULT_KEYS = ('loss', 'lr', 'mIoU')
SERIES = {'train': ('', '-'), 'val': ('', '-'), 'val_ema': (' (moving average)', '--')}  # tag: (label, line style)


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('runs', nargs='+', type=Path, help='run folders (train.py work dirs)')
    parser.add_argument('--keys', nargs='+', default=list(DEFAULT_KEYS), help='one panel each (default: %(default)s)')
    parser.add_argument('--out', type=Path, help='the PNG (default: curves.png in the first run folder)')
    return parser.parse_args(argv)


def curves(records: list, key: str) -> dict:
    """{tag: ([iterations], [values])} of `key` in a run's records (`read_metrics`), per tag that has it."""
    found = {}
    for record in records:
        if record['tag'] in SERIES and record.get(key) is not None:
            iterations, values = found.setdefault(record['tag'], ([], []))
            iterations.append(record['iteration'])
            values.append(record[key])
    return found


def plot(runs: list, keys: list) -> Figure:
    """`runs`: [(run folder, its records)]."""
    figure = Figure(figsize=(6.5, 2.4 * len(keys)), dpi=100, layout='constrained')
    colours = [f'C{i}' for i in range(len(runs))]
    for row, key in enumerate(keys):
        axes = figure.add_subplot(len(keys), 1, row + 1)
        for (run, records), colour in zip(runs, colours):
            for tag, (iterations, values) in curves(records, key).items():
                suffix, style = SERIES[tag]
                marker = 'o' if tag != 'train' else None
                axes.plot(iterations, values, style, color=colour, marker=marker, ms=3, label=f'{run.name}{suffix}')
        axes.set(ylabel=key, xlabel='iteration' if row == len(keys) - 1 else None)
        if key == 'lr':
            axes.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc='best')
    return figure


def main(argv=None) -> Path:
    args = parse_args(argv)
    for run in args.runs:
        if not (run / METRICS_FILE).is_file():
            raise ConfigError(f'{run}: no {METRICS_FILE} there (a train.py run folder is expected)')
    runs = [(run, read_metrics(run)) for run in args.runs]  # each metrics.jsonl read once
    missing = [key for key in args.keys if not any(curves(records, key) for _, records in runs)]
    if missing:
        raise ConfigError(f'--keys: no run recorded {", ".join(missing)} (loss terms, lr, images_per_s, eval.metrics)')
    out = args.out or args.runs[0] / 'curves.png'
    Manifest(out.parent, 'plots.txt').claim(out)
    write_image(out, figure_pixels(plot(runs, args.keys)))
    print(f'wrote {out}')
    return out


if __name__ == '__main__':
    run_cli(main)
