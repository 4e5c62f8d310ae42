"""The class histogram of a dataset split: pixels and images per class, the ignored share, and the
median-frequency weight `train.loss.class_weight: auto` would give each class. The first thing to
look at when the loss goes down but the mIoU stays flat: a class with a few thousand pixels, or one
missing from a split, caps the mean.

    python tools/label_stats.py --config configs/camvid.yaml [--split train] [--set ...]

Read from the dataset's scan (cached in the run's work dir, as training reads it); nothing is trained.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, run_cli  # noqa: E402
from engine.data import build_dataset  # noqa: E402
from engine.losses import median_frequency_weights  # noqa: E402
from engine.rules import load_config  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--config', required=True, help='YAML file describing the data')
    parser.add_argument('--split', choices=['train', 'val'], default='train', help='(default: %(default)s)')
    parser.add_overrides()
    return parser.parse_args(argv)


def histogram(dataset) -> list:
    """One row per class: name, pixels, % of the labelled pixels, images, % of the images, median-frequency weight."""
    labelled, images = max(int(dataset.class_pixels.sum()), 1), max(len(dataset), 1)
    weights = median_frequency_weights(dataset.class_pixels, dataset.class_image_pixels)
    return [
        (name, int(pixels), 100 * pixels / labelled, int(count), 100 * count / images, weight)
        for name, pixels, count, weight in zip(dataset.class_names, dataset.class_pixels, dataset.class_images, weights)
    ]


def format_histogram(rows: list, dataset) -> str:
    ignored, total = dataset.ignored_pixels, int(dataset.class_pixels.sum()) + dataset.ignored_pixels
    width = max(len('class'), *(len(row[0]) for row in rows))
    lines = [f'{"class":<{width}}  {"pixels":>12} {"% labelled":>10} {"images":>7} {"% images":>8} {"weight":>7}']
    for name, pixels, share, count, image_share, weight in rows:
        lines.append(f'{name:<{width}}  {pixels:>12,} {share:>10.2f} {count:>7} {image_share:>8.1f} {weight:>7.3f}')
    absent = [row[0] for row in rows if row[1] == 0]
    lines.append(
        f'{len(dataset)} images, {total:,} pixels; ignored (data.ignore_index {dataset.ignore_index}): '
        f'{ignored:,} ({100 * ignored / max(total, 1):.2f}%)'
    )
    if absent:
        lines.append(f'absent from this split: {", ".join(absent)}')
    lines.append('weight: median frequency balancing, what train.loss.class_weight: auto gives (engine/losses.py)')
    return '\n'.join(lines)


def main(argv=None) -> list:
    args = parse_args(argv)
    dataset = build_dataset(load_config(args.config, args.set), args.split)
    rows = histogram(dataset)
    print(format_histogram(rows, dataset))
    return rows


if __name__ == '__main__':
    run_cli(main)
