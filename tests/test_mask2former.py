"""Mask2Former(+OL): the reference vectors, the published parameter counts, deformable attention against
a naive loop, Offset Learning for masks against the published order of operations, semantic inference
(its place in the path to image size: tests/test_official_inference.py)."""

import itertools
import math

import pytest
import torch
from test_published_models import pair_model

from conftest import ROOT, assert_close_to_reference, input_sizes, load_vector
from engine.inference import single_view
from engine.mask_losses import MaskClassificationLoss
from engine.optim import group_rule
from engine.rules import load_config
from models import OffsetLearningMask
from models.backbones import BACKBONES
from models.backbones.swin import Swin
from models.heads.deformable_attention import multi_scale_deformable_attention
from models.heads.mask2former import Mask2FormerHead, sine_position_encoding
from models.heads.mask_classification import MaskClassification, semantic_scores
from tools.convert_checkpoint import convert
from train import create_model, load_trained

SWIN_T_CHANNELS = [96, 192, 384, 768]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('offset_learning, total', [(False, 47_439_633), (True, 47_570_705)])
def test_parameter_counts_are_the_papers(offset_learning, total):
    """Paper Table 5: 47.4M and 47.6M; the OL part is exactly 2·256²."""
    with torch.device('meta'):
        head = Mask2FormerHead(SWIN_T_CHANNELS, 150, offset_learning=offset_learning)
        backbone = Swin('tiny')
    assert count(head.pixel_decoder) == 5_421_504
    assert count(backbone) + count(head) == total
    if offset_learning:
        assert count(head.offset_learning) == 131_072


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The OL vector's two state_dict halves saved as one mmseg checkpoint, converted by
    tools/convert_checkpoint.py with configs/mask2former_swin_t_ol.yaml (every key must fit), and
    loaded strictly into create_model(its config)."""
    backbone_file, data = load_vector('mask2former_swin_t_backbone'), load_vector('mask2former_swin_t_ol')
    folder = tmp_path_factory.mktemp('mask2former')
    source, target = folder / 'mmseg.pth', folder / 'ours.pth'
    torch.save({'state_dict': {**backbone_file['state_dict'], **data['state_dict']}, 'meta': {}}, source)
    report = convert(
        str(source), str(target), str(ROOT / 'configs' / 'mask2former_swin_t_ol.yaml'), ['backbone.pretrained=null']
    )
    assert report == [], report
    model, _ = load_trained(target)
    return model, data


def test_ol_vector_logits_and_predictions(reference):
    model, data = reference
    used_masks, queries = [], []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: used_masks.append(args[4]))
        for layer in model.head.decoder_layers
    ]
    hooks.append(model.head.post_norm.register_forward_pre_hook(lambda module, args: queries.append(args[0])))
    with torch.no_grad():
        features = model.backbone(data['input'])
        predictions = model.head.predictions(features)
        logits = semantic_scores(model(data['input']))
    for hook in hooks:
        hook.remove()
    assert_close_to_reference(logits, data['logits'], 'logits')
    assert_close_to_reference(predictions['cls_scores'][-1], data['cls_scores'], 'cls_scores')
    assert_close_to_reference(predictions['mask_preds'][-1], data['mask_preds'], 'mask_preds')
    assert_close_to_reference(torch.stack(predictions['cls_scores']), data['all_cls_scores'], 'all_cls_scores')
    assert_close_to_reference(torch.stack(queries[:10]), data['decoder_queries'], 'decoder_queries')
    assert len(used_masks) == 2 * 9
    for layer, (ours, ref) in enumerate(zip(used_masks, data['attn_masks'])):
        heads = ours.view(2, 8, 100, -1)
        assert (heads == heads[:, :1]).all(), f'layer {layer}: the mask differs between heads'
        assert torch.equal(heads[:, 0], ref), f'layer {layer}: {(heads[:, 0] != ref).sum()} entries differ'


def test_ol_vector_pixel_decoder(reference):
    model, data = reference
    with torch.no_grad():
        mask_features, memories = model.head.pixel_decoder(data['features'])
    assert_close_to_reference(mask_features, data['mask_features'], 'mask_features')
    for level, (ours, ref) in enumerate(zip(memories, data['pixel_decoder_outs'])):
        assert_close_to_reference(ours, ref, f'pixel_decoder_outs[{level}]')


SMALL_HEAD = {
    'type': 'mask2former',
    'channels': 64,
    'num_queries': 7,
    'num_decoder_layers': 3,
    'num_encoder_layers': 1,
    'encoder_ffn_channels': 64,
    'decoder_ffn_channels': 64,
}


@pytest.mark.parametrize('offset_learning', [False, True])
@pytest.mark.parametrize('backbone', sorted(BACKBONES))
def test_every_backbone_pairs_with_mask2former(backbone, offset_learning):
    """A small head on each family's tiny variant: the set-prediction loss reaches the first backbone
    layer, the class and mask embeddings and OL; eval gives class and mask logits, masks at stride 4."""
    model = pair_model(backbone, {**SMALL_HEAD, 'offset_learning': offset_learning})
    height, width = input_sizes(backbone)[1]
    outputs = model(torch.randn(2, 3, height, width))
    MaskClassificationLoss(255).terms(outputs, torch.randint(0, 5, (2, height, width)))['loss'].backward()
    head = model.head
    checked = [
        next(model.parameters()),
        *head.cls_embed.parameters(),
        *head.mask_embed.parameters(),
        *(head.offset_learning.parameters() if offset_learning else ()),
    ]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in checked)
    with torch.no_grad():
        output = model.eval()(torch.randn(1, 3, height, width))
    stride = model.backbone.strides[0]  # masks at the finest map's stride
    assert output.class_logits.shape == (1, 7, 6) and output.mask_logits.shape == (
        1,
        7,
        height / stride,
        width / stride,
    )


def test_training_mode_returns_every_prediction_point():
    torch.manual_seed(0)
    head = Mask2FormerHead(
        [16, 32, 64, 128],
        5,
        channels=64,
        num_queries=7,
        num_decoder_layers=3,
        num_encoder_layers=1,
        encoder_ffn_channels=64,
        decoder_ffn_channels=64,
    )
    features = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    outputs = head.train()(features)
    assert len(outputs['cls_scores']) == len(outputs['mask_preds']) == 4
    assert outputs['cls_scores'][0].shape == (2, 7, 6) and outputs['mask_preds'][0].shape == (2, 7, 16, 16)
    output = head.eval()(features)
    assert isinstance(output, MaskClassification) and output.mask_logits.shape == (2, 7, 16, 16)


def naive_deformable_attention(value, shapes, locations, weights):
    """Bilinear sampling written out per point: pixel (i, j) has its centre at ((j+0.5)/w, (i+0.5)/h),
    neighbours outside the map count as zero."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0] + list(itertools.accumulate(h * w for h, w in shapes))
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b, q, m, lvl, p in itertools.product(range(batch), range(queries), range(heads), range(levels), range(points)):
        h, w = shapes[lvl]
        x, y = locations[b, q, m, lvl, p].tolist()
        x, y = x * w - 0.5, y * h - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
            if 0 <= yy < h and 0 <= xx < w:
                bilinear = (1 - abs(x - xx)) * (1 - abs(y - yy))
                out[b, q, m] += weights[b, q, m, lvl, p] * bilinear * value[b, starts[lvl] + yy * w + xx, m]
    return out.flatten(2)


def test_deformable_attention_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3), (4, 5), (3, 1)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 3, generator=gen, dtype=torch.float64)
    locations = torch.rand(2, 4, 2, 3, 2, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(2, 4, 2, 3, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        multi_scale_deformable_attention(value, shapes, locations, weights),
        naive_deformable_attention(value, shapes, locations, weights),
    )


def test_offset_learning_mask_matches_published_order():
    """The reassociated module against §2.3 as published: E' = E + P_c(softmax_HW(A)·F),
    F' = F + P_f(softmax_Q(A)ᵀ·E), masks E'·F'ᵀ."""
    torch.manual_seed(0)
    module = OffsetLearningMask(16)
    for weight in (module.cls_offset_proj.weight, module.feat_offset_proj.weight):
        torch.nn.init.normal_(weight, std=0.3)
    embed, features = torch.randn(2, 5, 16), torch.randn(2, 16, 3, 4)
    pixels = features.flatten(2).transpose(1, 2)  # F: (B, HW, C)
    attn = (pixels @ embed.transpose(1, 2)).transpose(1, 2)  # A: (B, Q, HW)
    aligned = embed + module.cls_offset_proj(attn.softmax(-1) @ pixels)
    moved = pixels + module.feat_offset_proj(attn.softmax(1).transpose(1, 2) @ embed)
    expected = torch.einsum('bqc,bchw->bqhw', aligned, moved.transpose(1, 2).reshape(2, 16, 3, 4))
    with torch.no_grad():
        torch.testing.assert_close(module(embed, features), expected)
    assert count(module) == 2 * 16 * 16


def test_semantic_logits_by_hand():
    """Two queries, two classes + no object: class k at a pixel = Σ_q p_q(k) · sigmoid(mask_q)."""
    cls_scores = torch.tensor([[[math.log(3), 0.0, 0.0], [0.0, 0.0, math.log(2)]]])  # p = (.6 .2 .2), (.25 .25 .5)
    mask_preds = torch.tensor([[[[0.0]], [[math.log(3)]]]])  # sigmoid 0.5, 0.75
    expected = torch.tensor([[[[0.6 * 0.5 + 0.25 * 0.75]], [[0.2 * 0.5 + 0.25 * 0.75]]]])
    torch.testing.assert_close(semantic_scores(MaskClassification(cls_scores, mask_preds)), expected)


def test_semantic_scores_resize_the_masks_in_chunks_of_queries(monkeypatch):
    """Masks resized then combined; chunks of queries (bounded memory) give the same sum."""
    generator = torch.Generator().manual_seed(0)
    output = MaskClassification(
        torch.randn(2, 9, 4, generator=generator), 8 * torch.randn(2, 9, 6, 10, generator=generator)
    )
    masks = torch.nn.functional.interpolate(output.mask_logits, size=(23, 41), mode='bilinear', align_corners=False)
    expected = torch.einsum('bqk,bqhw->bkhw', output.class_logits.softmax(-1)[..., :-1], masks.sigmoid())
    torch.testing.assert_close(semantic_scores(output, (23, 41)), expected)
    monkeypatch.setattr('models.heads.mask_classification.CHUNK_ELEMENTS', 2 * 2 * 23 * 41)  # 2 queries a chunk
    torch.testing.assert_close(semantic_scores(output, (23, 41)), expected)


def test_sine_position_encoding_by_hand():
    """Rows first, then columns; channel 2m = sin, 2m+1 = cos, both at frequency 10000^(2m/half)."""
    encoding = sine_position_encoding(2, 3, 8).view(2, 3, 8)
    row_angle = 2 / (2 + 1e-6) * 2 * math.pi  # row 2 of 2
    col_angle = 1 / (3 + 1e-6) * 2 * math.pi  # column 1 of 3
    torch.testing.assert_close(
        encoding[1, 0, :4],
        torch.tensor([math.sin(row_angle), math.cos(row_angle), math.sin(row_angle / 100), math.cos(row_angle / 100)]),
    )
    torch.testing.assert_close(
        encoding[1, 0, 4:],
        torch.tensor([math.sin(col_angle), math.cos(col_angle), math.sin(col_angle / 100), math.cos(col_angle / 100)]),
    )


def test_a_query_whose_mask_blocks_everything_attends_everywhere():
    """mmdet's fix: an all-True attention-mask row is cleared before the layer uses it."""
    torch.manual_seed(0)
    head = Mask2FormerHead(
        [16, 32, 64, 128],
        3,
        channels=32,
        num_queries=2,
        num_decoder_layers=1,
        num_encoder_layers=1,
        encoder_ffn_channels=32,
        decoder_ffn_channels=32,
    ).eval()
    with torch.no_grad():
        for layer, value in ((head.mask_embed[4], -1.0), (head.pixel_decoder.mask_feature, 1.0)):
            layer.weight.zero_()
            layer.bias.fill_(value)  # every mask logit -C: every key blocked
    seen = []
    head.decoder_layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[4]))
    features = [torch.rand(1, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    with torch.no_grad():
        output = head(features)
    assert not seen[0].any() and all(torch.isfinite(t).all() for t in output)


def test_published_recipe_parameter_groups():
    """Backbone lr x0.1; no decay on any LayerNorm/GroupNorm, the relative-position tables and the query and
    level embeddings; decay on everything else (mmseg's Mask2Former optimizer with norm_decay_mult 0)."""
    cfg = load_config(ROOT / 'configs' / 'mask2former_swin_t_ol.yaml', ['backbone.pretrained=null'])
    rules = cfg['train']['param_groups']
    with torch.device('meta'):
        model = create_model(cfg)
    no_decay = {
        f'{name}.{p}'
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm))
        for p in ('weight', 'bias')
    }
    no_decay |= {
        name
        for name, _ in model.named_parameters()
        if name.endswith(
            ('relative_position_bias_table', 'query_embed.weight', 'query_feat.weight', 'level_embed.weight')
        )
    }
    for name, _ in model.named_parameters():
        options = rules.get(group_rule(name, rules), {})
        assert options.get('lr_mult', 1.0) == (0.1 if name.startswith('backbone.') else 1.0), name
        assert options.get('decay_mult', 1.0) == (0.0 if name in no_decay else 1.0), name


def test_deformable_attention_samples_half_precision_values_in_float32():
    """Under autocast the values come in half precision and the locations in float32: no dtype clash,
    and the result is the float32 computation on the rounded values."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 2, 3, generator=gen).bfloat16()
    locations = torch.rand(1, 5, 2, 2, 3, 2, generator=gen)
    weights = torch.rand(1, 5, 2, 2, 3, generator=gen)
    torch.testing.assert_close(
        multi_scale_deformable_attention(value, shapes, locations, weights),
        multi_scale_deformable_attention(value.float(), shapes, locations, weights),
    )


def test_training_step_under_bfloat16_autocast():
    """The CUDA AMP path's dtype mixing, exercised with CPU autocast: forward in bf16, the loss in float32."""
    torch.manual_seed(0)
    head = Mask2FormerHead(
        [16, 32, 64, 128], 5, **{k: v for k, v in SMALL_HEAD.items() if k != 'type'}, offset_learning=True
    ).train()
    features = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = head(features)
    assert outputs['mask_preds'][-1].dtype == torch.bfloat16
    terms = MaskClassificationLoss(255).terms(outputs, torch.randint(0, 5, (2, 64, 64)))
    assert terms['loss'].dtype == torch.float32 and torch.isfinite(terms['loss'])
    terms['loss'].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_plain_mmseg_checkpoint_converts_and_extra_keys_are_listed(tmp_path):
    """The plain head's keys (the OL file without the two OL matrices) fit configs/mask2former_swin_t.yaml
    exactly; the OL matrices offered to the plain model are reported, not dropped silently."""
    backbone_file, data = load_vector('mask2former_swin_t_backbone'), load_vector('mask2former_swin_t_ol')
    state = {**backbone_file['state_dict'], **data['state_dict']}
    plain = {k: v for k, v in state.items() if '.offset_learning.' not in k}
    config = str(ROOT / 'configs' / 'mask2former_swin_t.yaml')
    reports = {}
    for name, checkpoint in (('plain', plain), ('ol', state)):
        torch.save({'state_dict': checkpoint}, tmp_path / f'{name}.pth')
        reports[name] = convert(
            str(tmp_path / f'{name}.pth'), str(tmp_path / f'{name}_ours.pth'), config, ['backbone.pretrained=null']
        )
    assert reports['plain'] == []
    assert len(reports['ol']) == 1
    assert reports['ol'][0].startswith('2 keys unexpected in the checkpoint: head.offset_learning.')


def test_whole_and_slide_inference_combine_masks_at_the_window_size():
    """Whole, one full-size window and overlapping windows."""
    model = pair_model('resnet', {**SMALL_HEAD, 'offset_learning': True}).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = semantic_scores(model(images), (64, 96))
        torch.testing.assert_close(single_view(model, images), expected)
        one_window = single_view(model, images, 'slide', crop_size=(64, 96), stride=(64, 96))
        torch.testing.assert_close(one_window, expected)
        windows = single_view(model, images, 'slide', crop_size=(64, 64), stride=(32, 32))
    assert windows.shape == (1, 5, 64, 96) and torch.isfinite(windows).all()
