"""Predict images with a checkpoint: for each image, class ids, a colour map and an overlay.

    python infer.py --checkpoint work_dirs/demo/best.pth --input photos/ --output predictions/
    python infer.py --checkpoint best.pth --input 'data/**/*.jpg' --output out/ --mode slide

--input is a file, a folder (searched recursively) or a glob. For `<dir>/<name>.<ext>` it writes
`<output>/<dir>/<name>.png` (class ids), `<name>_color.png` (dataset palette) and
`<name>_overlay.jpg` (colours blended on the image), keeping relative folders. Non-images are
skipped with a warning; unreadable images are reported and skipped. Images of equal size share a batch.
--channels-last, --compile and --no-fold-bn choose the fast paths of engine/fast.py (conv+BN
folding is on by default).
"""
import argparse
import glob
import sys
from itertools import groupby
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from datasets import DATASETS
from datasets.base import IMAGE_SUFFIXES, DatasetError, read_image, resolve_palette
from datasets.transforms import Pipeline
from engine import dist, fast
from engine.checkpoint import load_checkpoint
from engine.inference import infer_logits, inference_options, normalize
from engine.cli import amp_dtype_for, config_for_checkpoint, run_cli
from models.weights import load_model_weights
from train import create_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--input', required=True, help='image file, folder or glob pattern')
    parser.add_argument('--output', required=True, help='folder for the predictions')
    parser.add_argument('--config', help="YAML to use instead of the checkpoint's stored config")
    parser.add_argument('--mode', choices=['whole', 'slide'], help='inference mode (default: eval.mode)')
    parser.add_argument('--batch-size', type=int, default=4, help='images per forward when sizes match')
    parser.add_argument('--opacity', type=float, default=0.5, help='colour weight in the overlay')
    parser.add_argument('--set', nargs='+', default=[], action='extend', metavar='KEY=VALUE')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    fast.add_arguments(parser)
    return parser.parse_args(argv)


def find_inputs(pattern: str) -> tuple:
    """(base folder, [files]) for a file, a folder (recursive) or a glob; relative paths are kept from base."""
    path = Path(pattern)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        return path, sorted(p for p in path.rglob('*') if p.is_file())
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise DatasetError(f"--input '{pattern}': no such file or folder, and no file matches it as a glob")
    magic = next(i for i, part in enumerate(path.parts) if glob.has_magic(part))
    return Path(*path.parts[:magic]) if magic else Path('.'), matches


def save_prediction(prediction: np.ndarray, image: np.ndarray, palette: np.ndarray, target: Path,
                    opacity: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    ids = prediction.astype(np.uint8 if prediction.max() < 256 else np.uint16)
    colour = palette[prediction]
    overlay = (image * (1 - opacity) + colour * opacity).astype(np.uint8)
    cv2.imwrite(str(target.with_name(target.name + '.png')), ids)
    cv2.imwrite(str(target.with_name(target.name + '_color.png')), cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(target.with_name(target.name + '_overlay.jpg')), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))


def main(argv=None) -> None:
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    mode = [f'eval.mode={args.mode}'] if args.mode else []
    cfg = config_for_checkpoint(checkpoint, args.checkpoint, args.config, [*args.set, *mode])
    data = cfg['data']
    base, files = find_inputs(args.input)
    skipped = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    for path in skipped:
        print(f'warning: skipping {path} (not an image file)', file=sys.stderr)
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]

    device, _, _ = dist.setup(args.device)
    model = create_model(cfg)
    load_model_weights(model, checkpoint, args.checkpoint)
    model = fast.prepare_for_inference(model.to(device), args.channels_last, args.fold_bn, args.compile)
    amp_dtype = amp_dtype_for(cfg, device)
    palette = resolve_palette(DATASETS[data['type']], data['num_classes'], data['palette'])
    pipeline = Pipeline(data['val']['pipeline'], data['ignore_index'], data['mean'])
    options = inference_options(cfg['eval'])
    failed = []
    with tqdm(total=len(images), desc='infer', dynamic_ncols=True) as bar:
        for start in range(0, len(images), args.batch_size):
            loaded = []
            for path in images[start:start + args.batch_size]:
                try:
                    original = read_image(path)
                except DatasetError as error:
                    failed.append(path)
                    tqdm.write(f'error: {error}; skipped', file=sys.stderr)
                    bar.update()
                    continue
                resized, _ = pipeline(original, None, np.random.default_rng(0))
                loaded.append((path, original, resized))
            for _, group in groupby(sorted(loaded, key=lambda x: (x[1].shape, x[2].shape)),
                                    key=lambda x: (x[1].shape, x[2].shape)):
                group = list(group)
                batch = torch.from_numpy(np.stack([r.transpose(2, 0, 1) for _, _, r in group])).to(device)
                with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = infer_logits(model, normalize(batch, data['mean'], data['std']), data['num_classes'],
                                          group[0][1].shape[:2], **options)
                for (path, original, _), prediction in zip(group, logits.argmax(1).cpu().numpy()):
                    target = Path(args.output) / path.relative_to(base).with_suffix('')
                    save_prediction(prediction, original, palette, target, args.opacity)
                    bar.update()
    done = len(images) - len(failed)
    print(f'{done} images predicted into {args.output}; {len(skipped)} non-images skipped, '
          f'{len(failed)} unreadable')
    dist.cleanup()


if __name__ == '__main__':
    run_cli(main)
