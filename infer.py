"""Predict images with a checkpoint: for each image, its class ids (in colour) and an overlay.

    python infer.py --checkpoint work_dirs/demo/best.pth --input photos/ --output predictions/
    python infer.py --checkpoint best.pth --input 'data/**/*.jpg' --output out/ --mode slide

--input is a file, a folder (searched recursively) or a glob. For `<dir>/<name>.<ext>` it writes
`<output>/<dir>/<name>.png`, the class ids as a palette-mode PNG (viewers show the class colours;
`np.asarray(PIL.Image.open(f))` gives the ids), and `<name>_overlay.jpg` (or .png, --overlay-format:
the colours blended on the image at --opacity, above a legend of the classes in it), keeping relative
folders; `<output>/legend.png` and `<output>/classes.json` (id, name, colour of each class) say which
colour is which class.
Nothing is written if an output file would be one of the inputs, two inputs would share an output
file (`a.jpg` and `a.png`), or an output file is already there and infer.py did not write it
(`<output>/predictions.txt` lists what it wrote); no image to predict, or none readable, is an
error. Non-images are skipped with a warning; unreadable images are reported and skipped. Linked
sub-folders are searched too. Images of equal size share a batch. --channels-last, --compile and --no-fold-bn choose the
fast paths of engine/fast.py (by default conv+BN pairs folded, and channels_last where that times
faster on the device).
"""

import glob
import json
import os
import sys
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import DATASETS
from datasets.base import IMAGE_SUFFIXES, DatasetError, read_input, resolve_class_names, resolve_palette
from datasets.transforms import Pipeline
from engine import dist, fast
from engine.cli import ArgumentParser, amp_dtype_for, number, run_cli
from engine.inference import eval_pipeline, inference_options, predict_scores
from engine.outputs import Manifest, OutputError, write_bytes, write_class_ids, write_image
from engine.visualize import ClassStyle, displayable, legend, overlay
from train import load_trained

LEGEND_WIDTH = 640
MIN_LEGEND_WIDTH = 20  # what legend() needs; a narrower image's legend is cut to its width


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--input', required=True, help='image file, folder or glob pattern')
    parser.add_argument('--output', required=True, help='folder for the predictions')
    parser.add_argument('--config', help="YAML to use instead of the checkpoint's stored config")
    parser.add_argument('--mode', choices=['whole', 'slide'], help='inference mode (default: eval.mode)')
    parser.add_argument(
        '--batch-size', type=number(int, 1), default=4, help='images per forward when sizes match (>= 1)'
    )
    parser.add_argument('--opacity', type=number(float, 0, 1), default=0.5, help='colour weight in the overlay, 0 to 1')
    parser.add_argument('--overlay-format', choices=['jpg', 'png'], default='jpg', help='file type of the overlays')
    parser.add_overrides()
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    fast.add_arguments(parser)
    return parser.parse_args(argv)


def find_inputs(pattern: str) -> tuple:
    """(base folder, [files]) for a file, a folder (recursive) or a glob; relative paths are kept from base."""
    path = Path(pattern)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        return path, files_below(path)
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise DatasetError(f"--input '{pattern}': no such file or folder, and no file matches it as a glob")
    magic = next(i for i, part in enumerate(path.parts) if glob.has_magic(part))
    return Path(*path.parts[:magic]) if magic else Path('.'), matches


def files_below(folder: Path) -> list:
    """Every file under `folder`, sorted, through linked sub-folders too (each real folder once)."""
    found, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        found += [Path(root) / name for name in names if (Path(root) / name).is_file()]
    return sorted(found)


def plan_outputs(base: Path, images: list, output: Path, overlay_format: str) -> dict:
    """{image: (class-id file, overlay file)} under `output`, keeping the folders relative to `base`."""
    plan = {}
    for path in images:
        target = output / path.relative_to(base).with_suffix('')
        plan[path] = (
            target.with_name(f'{target.name}.png'),
            target.with_name(f'{target.name}_overlay.{overlay_format}'),
        )
    return plan


def check_outputs(plan: dict, shared: dict, inputs: list) -> None:
    """Before anything is written: no output file may be an input (the same file, also through a link
    or another spelling of its path), and no two inputs may be written to the same file, nor to one of
    the `shared` files ({file: what it holds})."""
    written_by = dict(shared)
    for source, files in plan.items():
        for file in files:
            if file in written_by:
                raise OutputError(
                    f"{written_by[file]} and '{source}' would both be written to '{file}'; rename "
                    'one, or predict them into separate --output folders'
                )
            written_by[file] = f"'{source}'"
    input_files = {file_identity(path) for path in inputs}
    for file in written_by:
        if file.exists() and file_identity(file) in input_files:
            raise OutputError(
                f"'{file}' is one of the inputs and would be overwritten; choose an --output "
                'folder apart from the inputs'
            )


def file_identity(path: Path) -> tuple:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def overlay_with_legend(image: np.ndarray, prediction: np.ndarray, style: ClassStyle, opacity: float) -> np.ndarray:
    """The prediction's colours blended on the image, above a legend of the classes it shows."""
    strip = legend(np.unique(prediction), style, max(image.shape[1], MIN_LEGEND_WIDTH))[:, : image.shape[1]]
    return np.vstack([overlay(displayable(image), prediction, style, opacity), strip])


def write_class_key(output: Path, style: ClassStyle) -> None:
    """legend.png and classes.json: which colour is which class, for every class."""
    classes = [{'id': i, 'name': name, 'color': style.palette[i].tolist()} for i, name in enumerate(style.names)]
    write_image(output / 'legend.png', legend(range(len(style.names)), style, LEGEND_WIDTH))
    write_bytes(output / 'classes.json', ('[\n' + ',\n'.join(json.dumps(c) for c in classes) + '\n]\n').encode())


def main(argv=None) -> None:
    args = parse_args(argv)
    mode = [f'eval.mode={args.mode}'] if args.mode else []
    model, cfg = load_trained(args.checkpoint, args.config, [*args.set, *mode])
    data = cfg['data']
    base, files = find_inputs(args.input)
    skipped = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    for path in skipped:
        print(f'warning: skipping {path} (not an image file)', file=sys.stderr)
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    output = Path(args.output)
    plan = plan_outputs(base, images, output, args.overlay_format)
    if not images:
        raise DatasetError(f"--input '{args.input}': no image files ({', '.join(IMAGE_SUFFIXES)}) to predict")
    shared = {output / 'legend.png': 'the legend', output / 'classes.json': 'the class list'}
    check_outputs(plan, shared, files)
    manifest = Manifest(output, 'predictions.txt')  # what infer.py wrote there: it may write those again
    for file in [*shared, *(file for files in plan.values() for file in files)]:
        manifest.claim(file)

    device, _, _ = dist.setup(args.device)
    amp_dtype = amp_dtype_for(cfg, device)
    model = fast.prepare_for_inference(
        model.to(device), args.channels_last, args.fold_bn, args.compile, amp_dtype=amp_dtype
    )
    print(f'memory order: {fast.memory_order(model)}')
    dataset_class = DATASETS[data['type']]
    style = ClassStyle(
        resolve_class_names(dataset_class, data['num_classes'], data['class_names']),
        resolve_palette(dataset_class, data['num_classes'], data['palette']),
        data['ignore_index'],
    )
    write_class_key(output, style)
    pipeline = Pipeline(eval_pipeline(cfg), data['ignore_index'], data['mean'])
    options = inference_options(cfg['eval'])
    failed = []
    with tqdm(total=len(images), desc='infer', dynamic_ncols=True, disable=None) as bar:
        for start in range(0, len(images), args.batch_size):
            loaded = []
            for path in images[start : start + args.batch_size]:
                try:
                    original = read_input(path, data['in_channels'])
                except DatasetError as error:
                    failed.append(path)
                    tqdm.write(f'warning: {error}; skipped', file=sys.stderr)
                    bar.update()
                    continue
                resized, _ = pipeline(original, None, np.random.default_rng(0))
                loaded.append((path, original, resized))
            for _, group in groupby(
                sorted(loaded, key=lambda x: (x[1].shape, x[2].shape)), key=lambda x: (x[1].shape, x[2].shape)
            ):
                group = list(group)
                batch = torch.from_numpy(np.stack([r.transpose(2, 0, 1) for _, _, r in group])).to(device)
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
                ):
                    scores = predict_scores(model, batch, data['mean'], data['std'], group[0][1].shape[:2], **options)
                for (path, original, _), prediction in zip(group, scores.argmax(1).cpu().numpy()):
                    ids_file, overlay_file = plan[path]
                    write_class_ids(ids_file, prediction, style.palette)
                    write_image(overlay_file, overlay_with_legend(original, prediction, style, args.opacity))
                    bar.update()
    done = len(images) - len(failed)
    print(f'{done} images predicted into {args.output}; {len(skipped)} non-images skipped, {len(failed)} unreadable')
    dist.cleanup()
    if not done:
        raise DatasetError(f"--input '{args.input}': none of its {len(images)} image files could be read")


if __name__ == '__main__':
    run_cli(main)
