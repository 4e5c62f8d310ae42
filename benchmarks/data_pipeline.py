"""Data-pipeline throughput of one loader worker: images/s through `dataset[(index, draw)]`, i.e.
decoding (OpenCV), the label lookup table, the augmentation steps and the conversion to tensors.

One process, one OpenCV and one torch thread: what each DataLoader worker does, so N workers give
about N times this on N free cores. Inputs are CamVid-sized (480x360) and ADE20K-sized (683x512)
JPEG/PNG pairs generated into a temporary folder (or CamVid itself with --camvid), run through
mmseg's ADE20K train pipeline (RandomResize (2048, 512) x [0.5, 2], RandomCrop 512 with
cat_max_ratio 0.75, flip, PhotoMetricDistortion, Pad 512) and its test pipeline (keep-ratio resize
to (2048, 512)). The per-step table shows where the time goes.

    python benchmarks/data_pipeline.py [--samples 200] [--camvid ../shared/data/camvid]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import SegmentationDataset  # noqa: E402

TRAIN = [
    {'type': 'random_resize', 'scale': [2048, 512], 'ratio_range': [0.5, 2.0]},
    {'type': 'random_crop', 'size': [512, 512], 'cat_max_ratio': 0.75},
    {'type': 'random_flip', 'prob': 0.5},
    {'type': 'photometric'},
    {'type': 'pad', 'size': [512, 512]},
]
TEST = [{'type': 'resize', 'scale': [2048, 512]}]
SIZES = {'CamVid 480x360': (360, 480), 'ADE20K 683x512': (512, 683)}


def write_pairs(root: Path, size: tuple, count: int = 16) -> Path:
    """Smooth-textured images (JPEG, quality 95) and 12-class labels of random polygons (PNG)."""
    rng = np.random.default_rng(0)
    for sub in ('images/train', 'annotations/train'):
        (root / sub).mkdir(parents=True)
    height, width = size
    for i in range(count):
        noise = rng.random((height // 8, width // 8, 3)).astype(np.float32)
        image = (cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)
        label = np.zeros(size, np.uint8)
        for kind in rng.integers(0, 12, size=20):
            points = rng.integers(0, [width, height], size=(5, 2)).astype(np.int32)
            cv2.fillPoly(label, [points], int(kind))
        cv2.imwrite(str(root / f'images/train/{i:03d}.jpg'), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(root / f'annotations/train/{i:03d}.png'), label)
    return root


def throughput(dataset, samples: int) -> float:
    for draw in range(5):
        dataset[(draw % len(dataset), draw)]
    start = time.perf_counter()
    for draw in range(samples):
        dataset[(draw % len(dataset), draw)]
    return samples / (time.perf_counter() - start)


def step_times(dataset, samples: int) -> dict:
    """Mean milliseconds of decoding + label mapping, of each pipeline step, and of the tensor conversion."""
    names = ['decode + label table'] + [type(step).__name__ for step in dataset.pipeline.steps] + ['to tensors']
    totals = dict.fromkeys(names, 0.0)
    for draw in range(samples):
        rng = np.random.default_rng([dataset.seed, draw])
        start = time.perf_counter()
        image, label = dataset.load(draw % len(dataset))
        totals[names[0]] += time.perf_counter() - start
        for name, step in zip(names[1:], dataset.pipeline.steps):
            start = time.perf_counter()
            image, label = step(image, label, rng)
            totals[name] += time.perf_counter() - start
        start = time.perf_counter()
        torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(label.astype(np.int64))
        totals[names[-1]] += time.perf_counter() - start
    return {name: 1000 * total / samples for name, total in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=200, help='samples timed per row')
    parser.add_argument('--camvid', help='use this CamVid folder (train split) for the 480x360 rows')
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    rows, breakdowns = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in SIZES.items():
            root = Path(args.camvid) if args.camvid and size == (360, 480) else write_pairs(Path(tmp) / name, size)
            for stage, steps in (('train', TRAIN), ('test', TEST)):
                dataset = SegmentationDataset(root, 'train', 12, pipeline=steps)
                rows.append((name, stage, throughput(dataset, args.samples)))
                if stage == 'train':
                    breakdowns[name] = step_times(dataset, args.samples)

    print(
        f'one worker: 1 OpenCV thread, 1 torch thread; {args.samples} samples per row '
        f'(OpenCV {cv2.__version__}, numpy {np.__version__})'
    )
    print(f'{"input":<18}{"pipeline":<10}{"images/s":>10}{"ms/image":>10}')
    for name, stage, speed in rows:
        print(f'{name:<18}{stage:<10}{speed:>10.1f}{1000 / speed:>10.2f}')
    print(f'\ntrain pipeline, ms per step{"":<6}' + ''.join(f'{name:>18}' for name in breakdowns))
    for step in next(iter(breakdowns.values())):
        print(f'{step:<33}' + ''.join(f'{times[step]:>18.2f}' for times in breakdowns.values()))


if __name__ == '__main__':
    main()
