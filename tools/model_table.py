"""The tables of ARCHITECTURES.md, from the code: parameters are counted, never typed
(tools/make_docs.py writes them into the page).

Every model is built on the meta device (no memory, no weights) from its config in configs/; its
output stride comes from a meta forward at SIDE x SIDE. Paper numbers come from each config's `paper`
section. Papers count the unused `conv_seg` classifier that mmseg builds beside Offset Learning;
our heads do not build it, so both counts are shown.
"""

import json
import sys
from pathlib import Path

import torch

from engine.config import read_config
from engine.rules import accepted_keys
from models import BACKBONES, OffsetLearning
from models.heads.mask_classification import MaskClassification
from train import create_model

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
SIDE = 448
"""An input every model takes: a multiple of 32 and of DINOv2's 28."""


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def variants(cls) -> list:
    """The family's variants, less its test-sized ones (for the test suite, not for users)."""
    return [name for name in sys.modules[cls.__module__].VARIANTS if not name.startswith('test')]


PUBLISHED_SIZES = {  # millions of parameters as the official READMEs state them (facebookresearch/dinov2, /dinov3)
    'dinov2': {'vits14': '21', 'vitb14': '86', 'vitl14': '300', 'vitg14': '1,100'},
    'dinov3': {'vits16': '21', 'vits16plus': '29', 'vitb16': '86', 'vitl16': '300'},
    'dinov3_convnext': {'tiny': '29', 'small': '50', 'base': '89', 'large': '198'},
}


def backbone_table() -> str:
    rows = [
        '| `backbone.type` | variant | out channels (strides 4/8/16/32) | params (M) | published (M) |',
        '|---|---|---|---|---|',
    ]
    for name, cls in BACKBONES.items():
        for variant in variants(cls):
            with torch.device('meta'):
                backbone = cls(variant)
            published = PUBLISHED_SIZES.get(name, {}).get(variant.removesuffix('_reg4'), '-')
            pyramid = count(backbone.pyramid) if getattr(backbone, 'pyramid', None) else 0
            params = f'{(count(backbone) - pyramid) / 1e6:.3f}' + (f' + {pyramid / 1e6:.3f} pyramid' if pyramid else '')
            rows.append(
                f'| `{name}` | `{variant}` | {", ".join(map(str, backbone.out_channels))} | {params} | {published} |'
            )
    return '\n'.join(rows)


def output_stride(model: torch.nn.Module):
    """The stride of the model's logits: its head run on the meta device on maps of the backbone's widths
    and strides for a SIDE x SIDE input (the backbone itself need not run; for a head that runs the
    backbone's last blocks, EoMT, the whole model runs on the meta device)."""
    backbone = model.backbone
    sides = [int(SIDE / stride) for stride in backbone.strides]
    features = [torch.empty(1, c, side, side, device='meta') for c, side in zip(backbone.out_channels, sides)]
    with torch.no_grad():
        if getattr(backbone, 'handed_over', 0):  # the head runs the ViT's last blocks (EoMT): the whole model
            output = model(torch.empty(1, 3, SIDE, SIDE, device='meta'))
        else:
            output = model.head(features)
    maps = output.mask_logits if isinstance(output, MaskClassification) else output
    stride = SIDE / maps.shape[-1]
    return int(stride) if stride.is_integer() else stride


def describe(path: Path, strides: dict) -> dict:
    """One config's model: counted parameters (and with mmseg's unused conv_seg), stride, paper numbers.
    `strides` keeps the stride of each backbone and head setting met (configs that differ only in their
    data share it)."""
    cfg = read_config(path, ['backbone.pretrained=null'], accepted_keys)  # the model's own checks run in the tests
    with torch.device('meta'):
        model = create_model(cfg).eval()
    architecture = json.dumps([cfg['backbone'], cfg['head']], sort_keys=True)
    if architecture not in strides:
        strides[architecture] = output_stride(model)
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
        'stride': strides[architecture],
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
    heads, strides = {}, {}
    for path in sorted(CONFIGS.glob('*.yaml')):
        m = describe(path, strides)
        heads.setdefault(m['head'].removesuffix(' + OL'), m['summary'])
        dash = lambda value, fmt='{}': '-' if value is None else fmt.format(value)  # noqa: E731
        rows.append(
            f'| `{m["name"]}` | {m["backbone"]} | {m["head"]} | {m["classes"]} | {m["stride"]} | '
            f'{m["params"] / 1e6:.3f} | {dash(m["with_conv_seg"] and m["with_conv_seg"] / 1e6, "{:.3f}")} | '
            f'{dash(m["paper_params"])} | {dash(m["paper_miou"])} |'
        )
    legend = '\n'.join(f'- `{head}`: {summary}' for head, summary in heads.items())
    return '\n'.join(rows) + '\n\nWhat each head does:\n\n' + legend


def tables(page=None) -> str:
    return (
        f"### Backbones\n\n{backbone_table()}\n\n### Every config\n\nParameters at the config's "
        f'class count; stride of the logits at a {SIDE}x{SIDE} input.\n\n{model_table()}'
    )
