"""Score a checkpoint: the scores of `eval.metrics` (mIoU, mAcc, aAcc unless the config lists others:
--set eval.metrics=[mIoU,mDice,mFscore]) and a per-class table on the console and as JSON, with a
per-class IoU bar chart and a confusion-matrix heat map (PNG) beside the JSON.

    python evaluate.py --checkpoint work_dirs/demo/best.pth [--split val] [--mode whole|slide]
                       [--tta | --scales 0.75 1.0 1.25 [--flip]] [--config CFG] [--set KEY=VALUE ...]
                       [--show-dir DIR [--show-limit N]] [--channels-last [auto|on|off]] [--compile] [--no-fold-bn]
    python evaluate.py --onnx model_int8.onnx [...]      # an exported graph, run by ONNX Runtime (CPU)

The model and data come from the config stored in the checkpoint or the ONNX file (or --config).
Predictions are resized to each label's original size before scoring, as mmseg 1.x does
(engine/inference.py); --tta is mmseg's test-time augmentation (scales 0.5 to 1.75 of the loaded
image, and flips). --show-dir writes, for each evaluated image (or the first N), image | ground
truth | prediction side by side with a legend of the classes in view; ignored pixels are hatched.
Runs under torchrun as well. The model runs with its conv+BN pairs folded, and channels_last where
that times faster on the device (engine/fast.py): the same results up to float rounding.
"""

import json
import math
import time
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from datasets.base import split_name
from datasets.sampler import shard
from engine import dist, fast
from engine.cli import ArgumentParser, amp_dtype_for, config_for_checkpoint, number, run_cli
from engine.config import ConfigError
from engine.data import build_dataset
from engine.evaluation import evaluate
from engine.inference import TTA_SCALES
from engine.metrics import null_for_nan, per_class_keys, reported
from engine.onnx_runtime import OnnxSegmentor
from engine.outputs import Manifest, write_bytes, write_image
from engine.visualize import ClassStyle, confusion_heatmap, iou_chart, side_by_side
from train import load_trained


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument('--checkpoint')
    model.add_argument('--onnx', metavar='FILE', help='a graph of tools/export_onnx.py instead (run on the CPU)')
    parser.add_argument('--config', help="YAML to use instead of the checkpoint's stored config")
    parser.add_argument(
        '--split',
        help="dataset split to score, or a list file of names (default: the config's data.val.split, the split "
        'the run validated on)',
    )
    parser.add_argument('--mode', choices=['whole', 'slide'], help='inference mode (default: eval.mode)')
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument('--tta', action='store_true', help=f"mmseg's test-time augmentation: scales {TTA_SCALES} and flip")
    tta.add_argument(
        '--scales', nargs='+', type=number(float, 0.01), help='factors of the loaded image to average over'
    )
    parser.add_argument('--flip', action='store_true', help='also average horizontally flipped predictions')
    parser.add_overrides()
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--work-dir', help='where the JSON and charts go (default: the folder of the scored file)')
    parser.add_argument('--show-dir', help='folder for image | ground truth | prediction pictures')
    parser.add_argument('--show-limit', type=number(int, 1), help='pictures of the first N images only (default: all)')
    fast.add_arguments(parser)
    return parser.parse_args(argv)


def cli_overrides(args) -> list:
    """The command-line options as config overrides, so the config rules check them like any other value."""
    overrides = [f'data.val.split={args.split}'] if args.split else []
    overrides += [f'eval.mode={args.mode}'] if args.mode else []
    scales = list(TTA_SCALES) if args.tta else args.scales
    overrides += [f'eval.scales={scales}'] if scales else []
    return overrides + (['eval.flip=true'] if args.flip or args.tta else [])


def format_table(results: dict, metric_names: list, class_names: list) -> str:
    """A row per class with its value of each class-mean metric ('-' where undefined), then the scores."""
    names = reported(metric_names)
    keys = per_class_keys(metric_names)
    lines = [f'{"class":<20}' + ''.join(f'{key:>10}' for key in keys)]
    for row, name in enumerate(class_names):
        values = [results[key][row] for key in keys]
        lines.append(f'{name:<20}' + ''.join(f'{"-":>10}' if math.isnan(v) else f'{v:>10.2f}' for v in values))
    lines.append('   '.join(f'{name} {results[name]:.2f}' for name in names))
    return '\n'.join(lines)


class ShowPredictions:
    """An `on_sample` hook for `evaluate`: the picture of each of the first `limit` images of the dataset
    into `folder`, named by dataset position and image name. Every name is claimed before anything is
    scored: a file of that name that an earlier evaluate.py did not write (pictures.txt lists what it
    did) is refused, never replaced."""

    def __init__(self, folder: Path, subset: Subset, limit, style: ClassStyle):
        self.style, self.files = style, {}
        manifest = Manifest(folder, 'pictures.txt')
        for position, index in enumerate(subset.indices):
            if limit is None or index < limit:
                self.files[position] = folder / f'{index:05d}_{Path(subset.dataset.samples[index][0]).stem}.png'
                manifest.claim(self.files[position])

    def __call__(self, position: int, image, label, prediction) -> None:
        if position in self.files:
            write_image(self.files[position], side_by_side(image, label, prediction, self.style))


def model_and_config(args) -> tuple:
    """The model to score and its config: a checkpoint's PyTorch model, or an ONNX graph behind the same interface."""
    overrides = [*args.set, *cli_overrides(args)]
    if args.onnx:
        model = OnnxSegmentor(args.onnx)
        cfg = config_for_checkpoint({'config': model.metadata.get('config')}, args.onnx, args.config, overrides)
        if model.metadata.get('num_classes') != cfg['data']['num_classes']:
            raise ConfigError(
                f'{args.onnx} scores {model.metadata.get("num_classes")} classes, the config '
                f'{cfg["data"]["num_classes"]} (data.num_classes): a graph of another model or dataset'
            )
        return model, cfg
    return load_trained(args.checkpoint, args.config, overrides)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, cfg = model_and_config(args)
    device, rank, world_size = dist.setup('cpu' if args.onnx else args.device)
    dataset = build_dataset(cfg, 'val')
    subset = Subset(dataset, shard(len(dataset), rank, world_size))
    loader = DataLoader(subset, batch_size=1, num_workers=cfg['data']['workers'], pin_memory=device.type == 'cuda')
    style = ClassStyle.of(dataset)
    show = ShowPredictions(Path(args.show_dir), subset, args.show_limit, style) if args.show_dir else None
    amp_dtype = amp_dtype_for(cfg, device)
    if not args.onnx:
        model = fast.prepare_for_inference(
            model.to(device), args.channels_last, args.fold_bn, args.compile, amp_dtype=amp_dtype
        )
        if dist.is_main():
            print(f'memory order: {fast.memory_order(model)}')
    start = time.perf_counter()
    results = evaluate(model, loader, cfg, device, amp_dtype, progress=dist.is_main(), on_sample=show)
    seconds = time.perf_counter() - start
    confusion = results.pop('confusion')
    if dist.is_main():
        print(format_table(results, cfg['eval']['metrics'], dataset.class_names))
        print(
            f'{len(subset)} images in {seconds:.1f} s ({1000 * seconds / len(subset):.0f} ms each, with data loading)'
        )
        scored = Path(args.onnx or args.checkpoint)
        split = cfg['data']['val']['split']
        name = f'eval_{split_name(split)}_{cfg["eval"]["mode"]}_{scored.stem}'  # each scored file its own results
        output = Path(args.work_dir or scored.parent) / f'{name}.json'
        record = {
            'onnx' if args.onnx else 'checkpoint': str(scored),
            'split': split,
            'eval': cfg['eval'],
            'classes': dataset.class_names,
            **null_for_nan(results),
            'seconds': seconds,
        }
        write_bytes(output, json.dumps(record, indent=2, allow_nan=False).encode())
        write_image(output.with_name(output.stem + '_iou.png'), iou_chart(results['IoU'], style))
        write_image(output.with_name(output.stem + '_confusion.png'), confusion_heatmap(confusion, style))
        print(
            f'results written to {output} (charts: {output.stem}_iou.png, {output.stem}_confusion.png)'
            + (f'; pictures in {args.show_dir}' if args.show_dir else '')
        )
    dist.cleanup()


if __name__ == '__main__':
    run_cli(main)
