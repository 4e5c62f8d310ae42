"""Score a checkpoint: mIoU, mAcc, aAcc and a per-class table on the console and as JSON.

    python evaluate.py --checkpoint work_dirs/demo/best.pth [--split val] [--mode whole|slide]
                       [--scales 0.75 1.0 1.25] [--flip] [--config CFG] [--set KEY=VALUE ...]
                       [--channels-last] [--compile] [--no-fold-bn]

The model and data come from the config stored in the checkpoint (or --config). Predictions are
resized to each label's original size before scoring. Runs under torchrun as well. The model runs
with its conv+BN pairs folded (engine/fast.py): the same results up to float rounding.
"""
import argparse
import json
import math
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from datasets.sampler import shard
from engine import dist, fast
from engine.checkpoint import load_checkpoint
from engine.cli import amp_dtype_for, config_for_checkpoint, number, run_cli
from engine.data import build_dataset
from engine.evaluation import evaluate
from models.weights import load_model_weights
from train import create_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--config', help="YAML to use instead of the checkpoint's stored config")
    parser.add_argument('--split', default='val', help='dataset split to score (default: val)')
    parser.add_argument('--mode', choices=['whole', 'slide'], help='inference mode (default: eval.mode)')
    parser.add_argument('--scales', nargs='+', type=number(float, 0.01), help='test scales for multi-scale inference')
    parser.add_argument('--flip', action='store_true', help='also average horizontally flipped predictions')
    parser.add_argument('--set', nargs='+', default=[], action='extend', metavar='KEY=VALUE')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--work-dir', help='where the JSON goes (default: the checkpoint folder)')
    fast.add_arguments(parser)
    return parser.parse_args(argv)


def cli_overrides(args) -> list:
    """The command-line options as config overrides, so the config rules check them like any other value."""
    overrides = [f'data.val.split={args.split}']
    overrides += [f'eval.mode={args.mode}'] if args.mode else []
    overrides += [f'eval.scales={args.scales}'] if args.scales else []
    return overrides + (['eval.flip=true'] if args.flip else [])


def format_table(results: dict, class_names: list) -> str:
    lines = [f"{'class':<20}{'IoU':>8}{'Acc':>8}"]
    for name, iou, acc in zip(class_names, results['IoU'], results['Acc']):
        lines.append(f"{name:<20}{iou:>8.2f}{acc:>8.2f}" if not math.isnan(iou) else f"{name:<20}{'-':>8}{'-':>8}")
    lines.append(f"mIoU {results['mIoU']:.2f}   mAcc {results['mAcc']:.2f}   aAcc {results['aAcc']:.2f}")
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(checkpoint, args.checkpoint, args.config, [*args.set, *cli_overrides(args)])

    device, rank, world_size = dist.setup(args.device)
    dataset = build_dataset(cfg, 'val')
    loader = DataLoader(Subset(dataset, shard(len(dataset), rank, world_size)), batch_size=1,
                        num_workers=cfg['data']['workers'], pin_memory=device.type == 'cuda')
    model = create_model(cfg)
    load_model_weights(model, checkpoint, args.checkpoint)
    model = fast.prepare_for_inference(model.to(device), args.channels_last, args.fold_bn, args.compile)
    data = cfg['data']
    amp_dtype = amp_dtype_for(cfg, device)
    results = evaluate(model, loader, data['num_classes'], data['ignore_index'], data['mean'], data['std'],
                       cfg['eval'], device, amp_dtype, progress=dist.is_main())
    if dist.is_main():
        print(format_table(results, dataset.class_names))
        work_dir = Path(args.work_dir or Path(args.checkpoint).parent)
        work_dir.mkdir(parents=True, exist_ok=True)
        output = work_dir / f"eval_{args.split}_{cfg['eval']['mode']}.json"
        per_class = {k: [None if math.isnan(x) else x for x in results[k]] for k in ('IoU', 'Acc')}
        record = {'checkpoint': str(args.checkpoint), 'split': args.split, 'eval': cfg['eval'],
                  'classes': dataset.class_names, **results, **per_class}
        output.write_text(json.dumps(record, indent=2, allow_nan=False))
        print(f'results written to {output}')
    dist.cleanup()


if __name__ == '__main__':
    run_cli(main)
