"""Regenerate the tables of ARCHITECTURES.md from the code: parameters are counted, never typed.

    python tools/model_table.py            # print the tables
    python tools/model_table.py --write    # rewrite them in ARCHITECTURES.md

Every model is built on the meta device (no memory, no weights) from its config in configs/; its
output stride comes from a meta forward at 512x512. Paper numbers come from each config's `paper`
section. Papers count the unused `conv_seg` classifier that mmseg builds beside Offset Learning;
our heads do not build it, so both counts are shown.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser  # noqa: E402
from engine.outputs import write_text  # noqa: E402
from engine.rules import load_config  # noqa: E402
from models import BACKBONES, OffsetLearning  # noqa: E402
from models.heads.mask_classification import MaskClassification  # noqa: E402
from train import create_model  # noqa: E402

BEGIN, END = '<!-- model_table: begin -->', '<!-- model_table: end -->'
CONFIGS = ROOT / 'configs'


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def variants(cls) -> list:
    """The family's variants, less its test-sized one (for the test suite, not for users)."""
    return [name for name in sys.modules[cls.__module__].VARIANTS if name != 'test']


def backbone_table() -> str:
    rows = ['| `backbone.type` | variant | out channels (strides 4/8/16/32) | params (M) |', '|---|---|---|---|']
    for name, cls in BACKBONES.items():
        for variant in variants(cls):
            with torch.device('meta'):
                backbone = cls(variant)
            rows.append(
                f'| `{name}` | `{variant}` | {", ".join(map(str, backbone.out_channels))} '
                f'| {count(backbone) / 1e6:.3f} |'
            )
    return '\n'.join(rows)


def describe(path: Path) -> dict:
    """One config's model: counted parameters (and with mmseg's unused conv_seg), stride, paper numbers."""
    cfg = load_config(path, ['backbone.pretrained=null'])
    with torch.device('meta'):
        model = create_model(cfg).eval()
        output = model(torch.empty(1, 3, 512, 512))
    maps = output.mask_logits if isinstance(output, MaskClassification) else output
    params = count(model)
    classifier = getattr(model.head, 'classifier', None)  # mask classification (Mask2Former) has none
    if isinstance(classifier, OffsetLearning):
        channels, classes = classifier.cls_repr.shape[2], classifier.cls_repr.shape[1]
        with_conv_seg = params + channels * classes + classes
    else:
        with_conv_seg = None
    paper = cfg['paper'] or {}
    return {
        'name': path.stem,
        'backbone': f'{cfg["backbone"]["type"]} {cfg["backbone"].get("variant", "")}',
        'head': cfg['head']['type'] + (' + OL' if cfg['head'].get('offset_learning') else ''),
        'classes': cfg['data']['num_classes'],
        'stride': 512 // maps.shape[-1],
        'params': params,
        'with_conv_seg': with_conv_seg,
        'paper_params': paper.get('params_m'),
        'paper_miou': paper.get('miou'),
        'summary': (type(model.head).__doc__ or '').strip().splitlines()[0],
    }


def model_table() -> str:
    rows = [
        '| config | backbone | head | classes | stride | params (M) | + unused conv_seg | paper params | paper mIoU |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    heads = {}
    for path in sorted(CONFIGS.glob('*.yaml')):
        m = describe(path)
        heads.setdefault(m['head'].removesuffix(' + OL'), m['summary'])
        dash = lambda value, fmt='{}': '-' if value is None else fmt.format(value)  # noqa: E731
        rows.append(
            f'| `{m["name"]}` | {m["backbone"]} | {m["head"]} | {m["classes"]} | {m["stride"]} | '
            f'{m["params"] / 1e6:.3f} | {dash(m["with_conv_seg"] and m["with_conv_seg"] / 1e6, "{:.3f}")} | '
            f'{dash(m["paper_params"])} | {dash(m["paper_miou"])} |'
        )
    legend = '\n'.join(f'- `{head}`: {summary}' for head, summary in heads.items())
    return '\n'.join(rows) + '\n\nWhat each head does:\n\n' + legend


def tables() -> str:
    return (
        f"{BEGIN}\n### Backbones\n\n{backbone_table()}\n\n### Every config\n\nParameters at the config's "
        f'class count; stride of the logits at a 512x512 input.\n\n{model_table()}\n{END}'
    )


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument('--write', action='store_true', help='rewrite the tables in ARCHITECTURES.md')
    args = parser.parse_args()
    text = tables()
    if not args.write:
        print(text)
        return
    path = ROOT / 'ARCHITECTURES.md'
    document = path.read_text()
    start, end = document.index(BEGIN), document.index(END) + len(END)
    write_text(path, document[:start] + text + document[end:])


if __name__ == '__main__':
    main()
