"""Convert a published checkpoint into this repo's format ({'model', 'config'}, as train.py writes).

    python tools/convert_checkpoint.py segformer_b0_ade.pth work_dirs/b0.pth --config configs/segformer_b0.yaml
    python tools/convert_checkpoint.py hf_segformer_folder/ out.pth --config configs/segformer_b0.yaml
    python tools/convert_checkpoint.py ade_semantic_eomt_large_512_dinov3.bin out.pth --config my_eomt_l.yaml \
        --base pretrained/dinov3_vitl16_pretrain_lvd1689m.pth

SRC is an mmseg / OffSeg checkpoint (SegFormer(+OL), SegNeXt(+OL), OffSeg, Mask2Former(+OL), DeepLab),
an official ImageNet backbone file (MiT `mit_b*.pth`, MSCAN `mscan_*.pth`, EfficientFormerV2
`eformer_*.pth`, Swin `swin_*_patch4_window7_224.pth`) or a Hugging Face SegFormer folder. The
model is built from --config; every part is converted by its own key map. Keys that do not fit are
listed, never dropped silently; the one documented exception is the unused `conv_seg` of the
published Offset Learning heads. tue-mps/eomt's DINOv3 checkpoints hold each weight as its difference to
where training started; --base names the pretrained DINOv3 weights (a .pth file or transformers folder)
they are added to. A file that does not fit the config (another variant, a head-only
file) is refused and nothing is written; with --partial, the parts the file does not hold (the head,
for an ImageNet backbone file) keep their fresh initialisation and are listed.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.cli import ArgumentParser, run_cli  # noqa: E402
from engine.outputs import OutputError  # noqa: E402
from engine.rules import load_config  # noqa: E402
from models.heads.eomt import official_training_start  # noqa: E402
from models.weights import CheckpointError, convert_model_state, load_into, read_state_dict  # noqa: E402
from train import create_model  # noqa: E402


def convert(source: str, target: str, config: str, overrides=(), partial: bool = True, base: str = None) -> list:
    """Write `target`; returns the report lines (keys that did not fit). Without `partial`, a report
    is an error and nothing is written. `base`: the pretrained weights `source`'s differences are to."""
    cfg = load_config(config, [*overrides, 'backbone.pretrained=null'])  # the weights come from `source`
    model = create_model(cfg)
    start = None
    if base:
        started = create_model(load_config(config, [*overrides, f'backbone.pretrained={base}']))
        start = official_training_start(started)
    converted, unclaimed = convert_model_state(model, read_state_dict(source), start)
    report = load_into(model, converted, source).problems()
    if unclaimed:
        report.append(
            f'{len(unclaimed)} keys belong to no part of the model and were not used: '
            + ', '.join(unclaimed[:8])
            + (' ...' if len(unclaimed) > 8 else '')
        )
    if report and not partial:
        raise CheckpointError(
            f'{source} does not fit {config}: ' + '; '.join(report) + '; nothing written (another variant or '
            'config? --partial keeps the parts the file does not hold at their initialisation)'
        )
    if Path(target).exists() and Path(source).exists() and os.path.samefile(source, target):
        raise OutputError(f"'{target}' is the source checkpoint; write the conversion to another file")
    save_checkpoint({'model': model.state_dict(), 'config': cfg, 'converted_from': str(source)}, Path(target))
    return report


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('source', help='published checkpoint file or Hugging Face folder')
    parser.add_argument('target', help='output checkpoint (.pth)')
    parser.add_argument('--config', required=True, help='YAML describing the model the weights belong to')
    parser.add_argument(
        '--partial', action='store_true', help='write the checkpoint even where keys do not fit (they are listed)'
    )
    parser.add_argument(
        '--base', help="the pretrained weights an official DINOv3 EoMT checkpoint's differences are to (.pth or folder)"
    )
    parser.add_overrides()
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = convert(args.source, args.target, args.config, args.set, args.partial, args.base)
    for line in report:
        print(f'note: {line}')
    print(f'wrote {args.target}' + (' (every key matched)' if not report else ''))


if __name__ == '__main__':
    run_cli(main)
