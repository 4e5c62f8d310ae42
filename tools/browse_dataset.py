"""Look at what the model trains on: the first samples of the training stream as pictures, each the
image and its label blended in, after the config's training pipeline (rescale, crop, flip, colour
distortion; before normalisation), with a legend of the classes present. mmseg's browse_dataset.py.

    python tools/browse_dataset.py --config configs/camvid.yaml --out work_dirs/browse [-n 8]
    python tools/browse_dataset.py --config configs/camvid.yaml --out work_dirs/browse_val --split val

The samples are those the first iterations of a run with this config draw, in that order and with
the same augmentation (seeded by train.seed); `--split val` shows the validation images as
evaluation reads them. Pictures are named by stream position and image name; a file in --out that
this tool did not write (browse.txt there lists what it did) is refused, never replaced.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.sampler import TrainSampler  # noqa: E402
from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.data import build_dataset  # noqa: E402
from engine.outputs import Manifest, write_image  # noqa: E402
from engine.rules import load_config  # noqa: E402
from engine.visualize import ClassStyle, panels  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--config', required=True, help='YAML file describing the data')
    parser.add_argument('--out', type=Path, required=True, help='folder for the pictures')
    parser.add_argument('-n', type=number(int, 1), default=8, help='how many samples (default: 8)')
    parser.add_argument('--split', choices=['train', 'val'], default='train', help='(default: %(default)s)')
    parser.add_overrides()
    return parser.parse_args(argv)


def stream(dataset, split: str, seed: int, count: int) -> list:
    """The first `count` items the training sampler draws (index, draw), or the first validation images."""
    if split == 'val':
        return list(range(min(count, len(dataset))))
    items = iter(TrainSampler(len(dataset), seed))
    return [next(items) for _ in range(count)]


def main(argv=None) -> list:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    dataset = build_dataset(cfg, args.split)
    style, manifest = ClassStyle.of(dataset), Manifest(args.out, 'browse.txt')
    written = []
    for position, item in enumerate(stream(dataset, args.split, cfg['train']['seed'], args.n)):
        index = item[0] if isinstance(item, tuple) else item
        path = args.out / f'{position:05d}_{Path(dataset.samples[index][0]).stem}.png'
        manifest.claim(path)
        image, label = dataset[item]
        write_image(path, panels(image, {f'label ({image.shape[2]}x{image.shape[1]})': label}, style))
        written.append(path)
    print(f'{len(written)} pictures of the {args.split} pipeline in {args.out}')
    return written


if __name__ == '__main__':
    run_cli(main)
