"""Regenerate the tables of ARCHITECTURES.md from the code: parameters are counted, never typed.

    python tools/model_table.py            # print the tables
    python tools/model_table.py --write    # rewrite them in ARCHITECTURES.md

Models are built on the meta device, so even the largest variants cost no memory or weights.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import BACKBONES  # noqa: E402
from models.heads import HEADS  # noqa: E402

BEGIN, END = '<!-- model_table: begin -->', '<!-- model_table: end -->'

# Published models: (name, backbone type, variant, head type, head kwargs, paper params in M).
# The paper's numbers for Offset Learning heads include mmseg's unused `conv_seg` (C·K + K), which
# these models do not build; the table shows both.
PUBLISHED = [
    ('SegFormer-B0', 'mit', 'b0', 'segformer', {}, 3.8),
    ('SegFormer-B0 + OL', 'mit', 'b0', 'segformer', {'offset_learning': True}, 3.9),
    ('SegFormer-B1 + OL', 'mit', 'b1', 'segformer', {'offset_learning': True}, 13.9),
    ('SegFormer-B2 + OL', 'mit', 'b2', 'segformer', {'offset_learning': True}, 24.9),
    ('SegNeXt-T', 'mscan', 't', 'ham', {}, 4.3),
    ('SegNeXt-T + OL', 'mscan', 't', 'ham', {'offset_learning': True}, 4.4),
    ('SegNeXt-S', 'mscan', 's', 'ham', {}, 13.9),
    ('SegNeXt-B', 'mscan', 'b', 'ham', {'ham_channels': 512, 'channels': 512}, 27.6),
    ('OffSeg-T', 'efficientformerv2', 's1', 'offseg', {}, 6.2),
    ('OffSeg-B', 'efficientformerv2', 's2', 'offseg', {'new_channels': [32, 64, 128, 256]}, 13.0),
    ('OffSeg-L', 'efficientformerv2', 'l', 'offseg', {'new_channels': [32, 64, 128, 256]}, 26.4),
]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def variants(cls) -> list:
    return list(sys.modules[cls.__module__].VARIANTS)


def backbone_table() -> str:
    rows = ['| `backbone.type` | variant | out channels (strides 4/8/16/32) | params (M) |', '|---|---|---|---|']
    for name, cls in BACKBONES.items():
        for variant in variants(cls):
            with torch.device('meta'):
                backbone = cls(variant)
            rows.append(f'| `{name}` | `{variant}` | {", ".join(map(str, backbone.out_channels))} '
                        f'| {count(backbone) / 1e6:.3f} |')
    return '\n'.join(rows)


def published_table(num_classes: int = 150) -> str:
    rows = ['| model | backbone | head | params (M), ours | + unused conv_seg | paper (M) |', '|---|---|---|---|---|---|']
    for name, backbone_type, variant, head_type, kwargs, paper in PUBLISHED:
        with torch.device('meta'):
            backbone = BACKBONES[backbone_type](variant)
            head = HEADS[head_type](backbone.out_channels, num_classes, **kwargs)
        total = count(backbone) + count(head)
        uses_ol = kwargs.get('offset_learning', head_type == 'offseg')   # OffSeg's head has OL by default
        channels = kwargs.get('channels', 256)
        with_conv_seg = f'{(total + channels * num_classes + num_classes) / 1e6:.3f}' if uses_ol else '-'
        rows.append(f'| {name} | `{backbone_type}` `{variant}` | `{head_type}` | {total / 1e6:.3f} | '
                    f'{with_conv_seg} | {paper} |')
    return '\n'.join(rows)


def tables() -> str:
    return (f'{BEGIN}\n### Backbones\n\n{backbone_table()}\n\n### Published models (ADE20K, 150 classes)\n\n'
            f'{published_table()}\n{END}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--write', action='store_true', help='rewrite the tables in ARCHITECTURES.md')
    args = parser.parse_args()
    text = tables()
    if not args.write:
        print(text)
        return
    path = ROOT / 'ARCHITECTURES.md'
    document = path.read_text()
    start, end = document.index(BEGIN), document.index(END) + len(END)
    path.write_text(document[:start] + text + document[end:])


if __name__ == '__main__':
    main()
