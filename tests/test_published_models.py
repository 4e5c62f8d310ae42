"""Every config and every published model: the configs validate and match their papers' parameter
counts, the reference vectors are reproduced through tools/convert_checkpoint.py and create_model,
every backbone x head pair trains, and a converted checkpoint works in evaluate.py and infer.py."""

import inspect
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import infer
from conftest import ROOT, assert_close_to_reference, input_sizes, load_vector
from engine.checkpoint import load_checkpoint
from engine.cli import config_for_checkpoint
from engine.config import read_config, resolve
from engine.inference import TTA_SCALES
from engine.losses import uses_set_prediction_loss
from engine.rules import check_config, load_config
from models import BACKBONES, OffsetLearning
from models.heads import HEADS
from models.weights import load_model_weights
from tools.convert_checkpoint import convert
from train import create_model

CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
NO_WEIGHTS = ['backbone.pretrained=null']  # the configs name ImageNet files users download themselves


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_and_matches_its_papers_parameter_count(path):
    """Papers round to 0.1M (to 1M where the count is a whole number: the UPerNets' 60M); their Offset
    Learning counts include mmseg's unused conv_seg (C·K + K), which we do not build, so it is added
    back for the comparison."""
    cfg = load_config(path, NO_WEIGHTS)
    with torch.device('meta'):
        model = create_model(cfg)
    paper = cfg['paper'] or {}
    if 'params_m' not in paper:
        return
    params = count(model)
    if isinstance(getattr(model.head, 'classifier', None), OffsetLearning):
        _, classes, channels = model.head.classifier.cls_repr.shape
        params += channels * classes + classes
    rounding = 0.5 if isinstance(paper['params_m'], int) else 0.05
    assert abs(params / 1e6 - paper['params_m']) <= rounding, f"{params / 1e6:.3f}M vs the paper's {paper['params_m']}M"


def published_settings_table() -> dict:
    """configs/README.md's table of the published configs' test settings: {config name: row}."""
    text = (ROOT / 'configs' / 'README.md').read_text()
    lines = text[text.index('### The test settings of the published configs') :].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('| config |'))
    columns = [c.strip() for c in lines[header].strip('|').split('|')]
    rows = {}
    for line in lines[header + 2 :]:
        if not line.startswith('|'):
            break
        row = dict(zip(columns, (c.strip() for c in line.strip('|').split('|'))))
        rows[row['config'].strip('`')] = row
    return rows


def test_every_published_config_tests_as_its_table_row_says():
    """The table next to the configs (written from the official configs) and the configs cannot drift
    apart: one row per config with a `paper` section, and its test resize, padding, whole/slide
    windows, TTA and paper mIoU are the config's."""
    table = published_settings_table()
    published = {path.stem: read_config(path) for path in CONFIGS if read_config(path)['paper']}
    assert sorted(table) == sorted(published)
    tta = f'{TTA_SCALES[0]}–{TTA_SCALES[-1]} + flip'
    for name, cfg in published.items():
        row, eval_cfg = table[name], cfg['eval']
        (resize,) = [step['scale'] for step in cfg['data']['val']['pipeline'] if step['type'] == 'resize']
        mode = 'whole' if eval_cfg['mode'] == 'whole' else f'slide {eval_cfg["crop_size"][0]}/{eval_cfg["stride"][0]}'
        if eval_cfg['mode'] == 'slide':  # the table writes square windows and strides by their side
            assert (
                eval_cfg['crop_size'][0] == eval_cfg['crop_size'][1] and eval_cfg['stride'][0] == eval_cfg['stride'][1]
            )
        padding = str(eval_cfg['size_divisor']) if eval_cfg['size_divisor'] > 1 else 'none'
        paper = cfg['paper']
        assert row['test resize'] == f'({resize[0]}, {resize[1]})', name
        assert (row['padding'], row['inference'], row['TTA']) == (padding, mode, tta), name
        assert row['paper mIoU'] == str(paper.get('miou', '–')), name
        assert row['paper mIoU (TTA)'] == str(paper.get('miou_ms', '–')), name
        assert eval_cfg['scales'] == [1.0] and not eval_cfg['flip'], f'{name}: the published numbers are single scale'


def converted_model(name: str, folder):
    """The reference vector's state_dict saved as an mmseg checkpoint, converted by the tool with the
    model's config, and loaded strictly into create_model(config)."""
    d = load_vector(name)
    source, target = folder / f'{name}_mmseg.pth', folder / f'{name}.pth'
    torch.save({'state_dict': d['state_dict'], 'meta': {}}, source)
    report = convert(str(source), str(target), str(ROOT / 'configs' / f'{name}.yaml'), NO_WEIGHTS)
    assert report == [], report
    checkpoint = load_checkpoint(target)
    model = create_model(config_for_checkpoint(checkpoint, target)).eval()
    load_model_weights(model, checkpoint, str(target))
    return d, model, target


@pytest.mark.parametrize('name', ['offseg_t', 'segformer_b0', 'segformer_b0_ol', 'segnext_t', 'segnext_t_ol'])
def test_published_models_reproduce_their_reference_through_the_converter(name, tmp_path):
    d, model, _ = converted_model(name, tmp_path)
    with torch.no_grad():
        features = model.backbone(d['input'])
        if 'nmf_seed' in d:  # LightHam draws its NMF bases from the global RNG, as published
            torch.manual_seed(d['nmf_seed'])
        logits = model(d['input'])
    for level, (ours, ref) in enumerate(zip(features, d['features'])):
        assert_close_to_reference(ours, ref, f'{name} feature {level}')
    assert_close_to_reference(logits, d['logits'], f'{name} logits')


TINY_BACKBONES = {family: 'test' for family in BACKBONES}
"""Each family's test-sized variant (a few channels and blocks, built in a few milliseconds)."""
PIXEL_HEADS = [head for head in HEADS if head not in ('mask2former', 'eomt')]
"""Heads with per-pixel logits; mask classification is paired in test_mask2former.py and test_eomt.py."""
NARROW = {'channels': 32, 'pyramid_channels': 32, 'ham_channels': 32, 'md_r': 4}
"""Head widths an eighth to a sixteenth of the published ones: the pairing (channels, strides, gradients) is what is
tested, and at full width a pair's head costs 10-50x its tiny backbone."""


def pair_model(backbone: str, head: dict, checked: bool = True) -> torch.nn.Module:
    """create_model, in training mode, of the family's tiny `backbone` variant with `head`, 5 classes, seed 0;
    `checked`: the config first passes the checks train.py runs (the meta-device forward among them)."""
    cfg = resolve(
        {
            'backbone': {'type': backbone, 'variant': TINY_BACKBONES[backbone]},
            'head': head,
            'data': {
                'type': 'demo',
                'root': 'unused',
                'num_classes': 5,
                'train': {'pipeline': [{'type': 'random_crop', 'size': list(input_sizes(backbone)[1])}]},
            },
            'train': {'max_iters': 1, 'batch_size': 2},
        }
    )
    if checked:
        check_config(cfg, 'test')
    torch.manual_seed(0)
    return create_model(cfg).train()


@pytest.mark.parametrize('head', PIXEL_HEADS)
@pytest.mark.parametrize('backbone', list(TINY_BACKBONES))
def test_every_backbone_head_pair_runs_and_backpropagates(backbone, head):
    """Each pair at a square size with the plain classifier and at a wider one with Offset Learning
    (64x64 and 96x128; DINOv2: 56x56 and 84x112): logits of one stride on both axes, finite gradients
    reaching the first backbone layer and the classifier. The config checks pass the wider setting."""
    widths = {key: value for key, value in NARROW.items() if key in inspect.signature(HEADS[head]).parameters}
    for (height, width), offset_learning in zip(input_sizes(backbone), (False, True)):
        model = pair_model(backbone, {'type': head, 'offset_learning': offset_learning, **widths}, offset_learning)
        logits = model(torch.randn(2, 3, height, width))
        assert logits.shape[:2] == (2, 5) and height / logits.shape[2] == width / logits.shape[3]
        torch.nn.functional.cross_entropy(logits, torch.randint(0, 5, (2, *logits.shape[2:]))).backward()
        parameters = list(model.parameters())
        assert parameters[0].grad is not None and torch.isfinite(parameters[0].grad).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.classifier.parameters())


def test_a_converted_published_checkpoint_works_in_evaluate_and_infer(tmp_path, capsys):
    """SegFormer-B0 + OL converted from its published format, scored and run on an ADE20K-layout folder."""
    _, _, checkpoint = converted_model('segformer_b0_ol', tmp_path)
    root = tmp_path / 'ade'
    rng = np.random.default_rng(0)
    for sub in ('images/validation', 'annotations/validation'):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(
            str(root / 'images/validation' / f'ADE_val_{i:08d}.jpg'), rng.integers(0, 255, (64, 96, 3), np.uint8)
        )
        cv2.imwrite(
            str(root / 'annotations/validation' / f'ADE_val_{i:08d}.png'), rng.integers(0, 151, (64, 96), np.uint8)
        )
    overrides = [
        '--set',
        f'data.root={root}',
        'data.workers=2',
        'eval.crop_size=[64,64]',
        'eval.stride=[32,32]',
        '--device',
        'cpu',
    ]
    evaluate.main(['--checkpoint', str(checkpoint), '--work-dir', str(tmp_path / 'eval'), *overrides])
    results = json.loads((tmp_path / 'eval' / 'eval_val_slide_segformer_b0_ol.json').read_text())
    assert len(results['IoU']) == 150 and 0 <= results['aAcc'] <= 100
    infer.main(
        [
            '--checkpoint',
            str(checkpoint),
            '--input',
            str(root / 'images'),
            '--output',
            str(tmp_path / 'out'),
            *overrides,
        ]
    )
    ids = np.asarray(Image.open(tmp_path / 'out' / 'validation' / 'ADE_val_00000001.png'))  # palette PNG: indices
    assert ids.shape == (64, 96) and ids.max() < 150
    assert '2 images predicted' in capsys.readouterr().out


def test_an_imagenet_backbone_file_converts_with_the_head_listed_as_missing(tmp_path):
    """Official MSCAN ImageNet naming (nested MLP conv, a `head` classifier, no part prefixes)."""
    cfg = load_config(ROOT / 'configs' / 'segnext_t.yaml', NO_WEIGHTS)
    torch.manual_seed(0)
    model = create_model(cfg)
    backbone = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.backbone.state_dict().items()}
    official = {k.replace('.mlp.dwconv.', '.mlp.dwconv.dwconv.'): v for k, v in backbone.items()}
    official.update({'head.weight': torch.zeros(1000, 256), 'head.bias': torch.zeros(1000)})
    torch.save(official, tmp_path / 'mscan_t.pth')
    report = convert(
        str(tmp_path / 'mscan_t.pth'), str(tmp_path / 'out.pth'), str(ROOT / 'configs' / 'segnext_t.yaml'), NO_WEIGHTS
    )
    head_keys = len(model.head.state_dict())
    assert len(report) == 1 and report[0].startswith(f'{head_keys} keys missing from the checkpoint: head.')
    converted = load_checkpoint(tmp_path / 'out.pth')['model']
    assert all(torch.equal(converted[f'backbone.{k}'], v) for k, v in backbone.items())


def test_a_hugging_face_segformer_folder_converts_to_the_same_logits(tmp_path):
    """A folder saved by transformers' SegformerForSemanticSegmentation (random B0, built locally)
    becomes MiT + the official All-MLP head here, with the same logits."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    hf = SegformerForSemanticSegmentation(SegformerConfig(num_labels=150)).eval()
    hf.save_pretrained(tmp_path / 'hf')
    report = convert(
        str(tmp_path / 'hf'),
        str(tmp_path / 'ours.pth'),
        str(ROOT / 'configs' / 'segformer_b0.yaml'),
        [*NO_WEIGHTS, 'head.type=segformer_mlp'],
    )
    assert report == [], report
    checkpoint = load_checkpoint(tmp_path / 'ours.pth')
    model = create_model(config_for_checkpoint(checkpoint, 'ours.pth')).eval()
    load_model_weights(model, checkpoint, 'ours.pth')
    for module in hf.modules():  # HF ignores layer_norm_eps; ours follow mmseg's 1e-6
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(model(images), hf(pixel_values=images).logits, atol=1e-5)


def per_pixel_benchmark_recipe(path) -> bool:
    """A config trained per pixel on a published benchmark: not the demo, not CamVid (whose recipes are
    this repo's own), not a mask-classification head (Mask2Former, EoMT: their own set-prediction loss)."""
    cfg = read_config(path)
    return path.stem != 'demo' and cfg['data']['type'] != 'camvid' and not uses_set_prediction_loss(cfg['head'])


@pytest.mark.parametrize('path', [p for p in CONFIGS if per_pixel_benchmark_recipe(p)], ids=lambda p: p.stem)
def test_published_recipes_average_the_cross_entropy_over_all_pixels_as_mmseg(path):
    assert read_config(path)['train']['loss']['avg_non_ignore'] is False  # the model itself: the test above
