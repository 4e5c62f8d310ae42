"""EoMT: transformers' EomtDinov3ForUniversalSegmentation's class and mask logits at every block on the
same weights (through the checkpoint converter), with masked attention on and off; the annealing
schedule against the official formula; the pairing rules; training and evaluation of a test-sized
model, with and without Offset Learning."""

import json
import re

import pytest
import torch
from test_end_to_end import assert_resume_continues_exactly, train_tiny

import evaluate
from conftest import TINY_DATA
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError
from engine.optim import anneal_attention_masks, annealing_windows, mask_probability
from models.heads.mask_classification import MaskClassification
from models.weights import CheckpointError, convert_model_state
from train import create_model, load_config

TOLERANCE = 1e-5
QUERIES, BLOCKS, CLASSES, SIDE = 5, 2, 3, 64


def eomt_config(tmp_path, backbone='{type: dinov3, variant: test}', head='', train='', side=SIDE) -> dict:
    path = tmp_path / 'eomt.yaml'
    path.write_text(
        f'backbone: {backbone}\n'
        f'head: {{type: eomt, num_queries: {QUERIES}, num_blocks: {BLOCKS}{head}}}\n'
        f'data: {{type: demo, root: data/demo, num_classes: {CLASSES},\n'
        f'       train: {{pipeline: [{{type: random_crop, size: [{side}, {side}]}}]}}}}\n'
        f'train: {{max_iters: 60, batch_size: 2{train}}}\n'
    )
    return load_config(path)


DINOV2_PATCH_16 = f'{{type: dinov2, variant: test_reg4, patch_size: 16, image_size: {SIDE}}}'
"""DINOv2 as EoMT runs it: patch 16, the position table at the crop's grid."""


def transformers_eomt(family: str = 'dinov3'):
    """transformers' DINOv3 or DINOv2 EoMT of the test size, random weights away from their initialisation."""
    import transformers

    sizes = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=SIDE)
    task = dict(num_queries=QUERIES, num_blocks=BLOCKS, num_labels=CLASSES)
    if family == 'dinov3':
        config = transformers.EomtDinov3Config(
            **sizes,
            **task,
            intermediate_size=128,
            layer_norm_eps=1e-5,  # DINOv3's; transformers gives it to the upscaler too, the official code 1e-6
            pos_embed_rescale=None,  # the RoPE augmentation of pre-training, off as in the dinov3 backbone
        )
        cls = transformers.EomtDinov3ForUniversalSegmentation
    else:
        config, cls = transformers.EomtConfig(**sizes, **task), transformers.EomtForUniversalSegmentation
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        for block in model.upscale_block.block:
            block.layernorm2d.eps = 1e-6
    return model


def per_block_predictions(model, images):
    """Every (mask logits, class logits) transformers' model predicts, in order."""
    predictions, predict = [], model.predict

    def recorded(tokens):
        predictions.append(predict(tokens))
        return predictions[-1]

    model.predict = recorded
    model(images)
    return predictions


def close(ours, reference) -> bool:
    return bool((ours - reference).abs().max() <= TOLERANCE * reference.abs().max())


@pytest.mark.parametrize('family', ['dinov3', 'dinov2'])
@pytest.mark.parametrize('probabilities', [[1.0, 1.0], [0.7, 0.4], None], ids=['masked', 'annealing', 'eval'])
def test_every_blocks_logits_are_transformers_eomt(tmp_path, probabilities, family):
    reference = transformers_eomt(family)
    ours = create_model(eomt_config(tmp_path, **({'backbone': DINOV2_PATCH_16} if family == 'dinov2' else {})))
    state, unclaimed = convert_model_state(ours, reference.state_dict())
    assert not unclaimed
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    images = torch.randn(2, 3, SIDE, SIDE)
    training = probabilities is not None
    for model in (reference, ours):
        model.train(training)
        probs = model.attn_mask_probs if model is reference else model.head.attn_mask_probs
        probs.copy_(torch.tensor(probabilities or [0.0, 0.0]))
    torch.manual_seed(1)  # the same draws of which queries keep their masks
    expected = per_block_predictions(reference, images)
    torch.manual_seed(1)
    with torch.set_grad_enabled(training):
        output = ours(images)
    if training:
        got = list(zip(output['mask_preds'], output['cls_scores']))
    else:
        assert isinstance(output, MaskClassification)
        got, expected = [(output.mask_logits, output.class_logits)], expected[-1:]
    assert len(got) == len(expected) == (BLOCKS + 1 if training else 1)
    for (mask, cls), (mask_ref, cls_ref) in zip(got, expected):
        assert close(mask, mask_ref) and close(cls, cls_ref)


def test_the_annealing_is_the_official_formula_at_every_iteration(tmp_path):
    """Block k's probability: 1 before its start, (1 - (t - start) / (end - start))^0.9, 0 from its end
    (tue-mps/eomt `mask_annealing`); the default windows are the DINOv2 configs' T/6 steps."""
    cfg = eomt_config(tmp_path)
    model = create_model(cfg)
    starts, ends = annealing_windows(cfg['train']['mask_annealing'], BLOCKS, 60)
    assert (starts, ends) == ([15, 30], [30, 45])
    for t in range(60):
        anneal_attention_masks(model, t, cfg['train'])
        for k in range(BLOCKS):
            s, e = starts[k], ends[k]
            official = 1.0 if t < s else 0.0 if t >= e else (1 - (t - s) / (e - s)) ** 0.9
            assert model.head.attn_mask_probs[k].item() == pytest.approx(official, abs=1e-7)
    assert mask_probability(20, 15, 30, 0.9) == pytest.approx((2 / 3) ** 0.9)


def test_annealing_windows_are_checked_when_the_config_is_read(tmp_path):
    cfg = eomt_config(tmp_path, train=', mask_annealing: {start: [0, 10], end: [5, 20]}')
    assert annealing_windows(cfg['train']['mask_annealing'], BLOCKS, 60) == ([0, 10], [5, 20])
    with pytest.raises(ConfigError, match='one iteration per masked block'):
        eomt_config(tmp_path, train=', mask_annealing: {start: [0], end: [5]}')
    other = tmp_path / 'segformer.yaml'
    other.write_text(
        'backbone: {type: dinov3, variant: test}\nhead: {type: segformer, channels: 16}\n'
        'data: {type: demo, root: data/demo, num_classes: 3,\n'
        '       train: {pipeline: [{type: random_crop, size: [64, 64]}]}}\n'
        'train: {max_iters: 60, batch_size: 2, mask_annealing: {start: [0, 1], end: [5, 6]}}\n'
    )
    with pytest.raises(ConfigError, match='no masked attention to anneal'):
        load_config(other)


@pytest.mark.parametrize(
    'backbone, message',
    [
        ('{type: resnet, variant: test}', 'runs the last blocks of a ViT backbone'),
        ('{type: dinov3, variant: test, frozen: true}', 'cannot be frozen'),
    ],
)
def test_eomt_pairs_only_with_a_vit_it_may_train(tmp_path, backbone, message):
    with pytest.raises(ConfigError, match=message):
        eomt_config(tmp_path, backbone=backbone)


@pytest.mark.parametrize('backbone', ['{type: dinov2, variant: test}', '{type: dinov3, variant: test}'])
@pytest.mark.parametrize('offset_learning', [False, True])
def test_eomt_trains_and_predicts(tmp_path, backbone, offset_learning):
    from engine.losses import build_criterion
    from engine.optim import build_optimizer

    side = 56 if 'dinov2' in backbone else SIDE
    cfg = eomt_config(tmp_path, backbone, f', offset_learning: {str(offset_learning).lower()}', side=side)
    model = create_model(cfg).train()
    criterion = build_criterion(cfg)
    optimizer, _ = build_optimizer(model, cfg['train']['optimizer'], {}, None)
    labels = torch.randint(0, CLASSES, (2, side, side))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(2):
        anneal_attention_masks(model, t, cfg['train'])
        loss = criterion(model(torch.randn(2, 3, side, side)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith('backbone.') and '.layer.3.' in k for k in changed)  # a handed-over block learnt
    assert any(k.startswith('head.q') for k in changed)
    with torch.no_grad():
        output = model.eval()(torch.randn(1, 3, side, side))
    patch = model.backbone.patch_size
    assert output.mask_logits.shape == (1, QUERIES, 4 * side // patch, 4 * side // patch)
    assert output.class_logits.shape == (1, QUERIES, CLASSES + 1)


TINY = (
    """
    backbone: {{type: dinov3, variant: test}}
    head: {{type: eomt, num_queries: 5, num_blocks: 2, offset_learning: true}}"""
    + TINY_DATA
    + """\
    train: {{max_iters: 6, batch_size: 2, val_interval: 3, log_interval: 1, grad_clip: 0.01,
             mask_annealing: {{start: [1, 2], end: [6, 8]}},
             schedule: {{type: poly, power: 0.9, warmup_iters: 1, backbone_warmup: [1, 2]}},
             optimizer: {{type: adamw, lr: 1.0e-3, weight_decay: 0.05}}}}
"""
)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp('eomt_run'), TINY)


def test_training_anneals_the_masks_and_resumes_exactly(run):
    """The mask probabilities are the schedule's at the last step (iteration 5), and a run resumed at
    iteration 3 ends with the uninterrupted run's weights (the backbone's own warm-up included)."""
    probabilities = load_checkpoint(run / 'work' / 'last.pth')['model']['head.attn_mask_probs']
    assert probabilities.tolist() == pytest.approx([(1 - 4 / 5) ** 0.9, (1 - 3 / 6) ** 0.9])
    assert_resume_continues_exactly(run)


def test_evaluate_scores_the_mask_free_model(run):
    evaluate.main(['--checkpoint', str(run / 'work' / 'best.pth'), '--work-dir', str(run / 'eval'), '--device', 'cpu'])
    results = json.loads(next((run / 'eval').glob('eval_*.json')).read_text())
    assert len(results['IoU']) == 5 and 0 <= results['mIoU'] <= 100


def test_the_onnx_graph_is_the_eager_mask_free_model(tmp_path):
    pytest.importorskip('onnxruntime')
    from tools import export_onnx

    torch.manual_seed(0)
    model = create_model(eomt_config(tmp_path, head=', offset_learning: true')).eval()
    path = export_onnx.export(model, tmp_path / 'eomt.onnx', size=(SIDE, SIDE))
    differences = export_onnx.check(path, model, [(SIDE, SIDE), (96, 128)], batch=2)
    assert max(differences) < 1e-4, differences


@pytest.mark.parametrize('family', ['dinov3', 'dinov2'])
@pytest.mark.parametrize('size, width, heads', [('s', 384, 6), ('b', 768, 12)])
def test_parameter_counts_are_transformers_eomts(family, size, width, heads):
    """The ADE20K configs against transformers' EoMT of the same ViT, 100 queries, 3 blocks, 150 classes
    (the DINOv2 one at patch 16 on a 32x32 grid, as EoMT runs it)."""
    import transformers

    from conftest import ROOT

    name = f'eomt_dinov3_vit{size}16' if family == 'dinov3' else f'eomt_dinov2_vit{size}14'
    cfg = load_config(ROOT / 'configs' / f'{name}.yaml', ['backbone.pretrained=null'])
    sizes = dict(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads)
    task = dict(num_queries=100, num_blocks=3, num_labels=150)
    if family == 'dinov3':
        config = transformers.EomtDinov3Config(**sizes, **task, intermediate_size=4 * width)
        cls = transformers.EomtDinov3ForUniversalSegmentation
    else:
        config, cls = (
            transformers.EomtConfig(**sizes, **task, image_size=512),
            transformers.EomtForUniversalSegmentation,
        )
    with torch.device('meta'):
        ours, reference = create_model(cfg), cls(config)
    class_position = width if family == 'dinov2' else 0  # the class token's (zero) row in the position table
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) + class_position


def test_the_loss_is_transformers_eomt_loss_on_the_same_points(tmp_path, monkeypatch):
    """Every block's prediction matched and scored as transformers does (class CE x2 with "no object" at
    0.1, BCE x5 and Dice x5 on sampled points), summed over the blocks: both implementations draw their
    points through torch.rand, which returns the same numbers for the same shape here."""
    from engine.losses import build_criterion
    from engine.mask_losses import semantic_to_masks

    reference = transformers_eomt()
    cfg = eomt_config(tmp_path)
    ours = create_model(cfg)
    ours.load_state_dict(convert_model_state(ours, reference.state_dict())[0])
    reference.attn_mask_probs.fill_(1.0)  # masked attention draws nothing at probability 1
    rand = torch.rand

    def same_points(*shape, device=None, **options):
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        generator = torch.Generator().manual_seed(sum(shape) * 1000 + len(shape))
        return rand(shape, generator=generator, **options).to(device)

    monkeypatch.setattr(torch, 'rand', same_points)
    images, labels = torch.randn(2, 3, SIDE, SIDE), torch.randint(0, CLASSES, (2, SIDE, SIDE))
    labels[0, :8] = 255  # ignored pixels belong to no mask
    targets = [semantic_to_masks(image_labels, 255) for image_labels in labels]
    expected = reference.train()(
        images, mask_labels=[masks for _, masks in targets], class_labels=[classes for classes, _ in targets]
    ).loss
    loss = build_criterion(cfg)(ours.train()(images), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_official_dinov2_eomt_checkpoints_convert_with_every_tensor_matched(tmp_path):
    """tue-mps/eomt's names: timm's DINOv2 under `network.encoder.backbone.` (`reg_token`, a position
    table without the class token's row), the head under `network.`, the input normalisation beside."""
    from test_dino import official_dinov2

    ours = create_model(eomt_config(tmp_path, backbone=DINOV2_PATCH_16))
    with torch.no_grad():
        ours.backbone.vit.embeddings.position_embeddings[:, 0] = 0  # the class token takes no position
    state = ours.state_dict()
    backbone = official_dinov2({k.removeprefix('backbone.'): v for k, v in state.items() if k.startswith('backbone.')})
    backbone['reg_token'] = backbone.pop('register_tokens')
    backbone['pos_embed'] = backbone['pos_embed'][:, 1:]
    official = {f'network.encoder.backbone.{k}': v for k, v in backbone.items()}
    official.update({f'network.{k.removeprefix("head.")}': v for k, v in state.items() if k.startswith('head.')})
    official.update({'network.encoder.pixel_mean': torch.zeros(1, 3, 1, 1), 'criterion.empty_weight': torch.ones(4)})
    converted, unclaimed = convert_model_state(ours, official)
    assert not unclaimed and converted.keys() == state.keys()  # the loss's weights and the normalisation: dropped
    assert all(torch.equal(converted[key], value) for key, value in state.items())


def test_official_dinov3_eomt_checkpoints_of_differences_convert_onto_their_base(tmp_path):
    """tue-mps/eomt's DINOv3 files: transformers' DINOv3ViTModel (4.56) renamed to timm's attributes under
    `network.encoder.backbone.`, every tensor stored as its difference to where training started (the
    pretrained ViT, zero elsewhere, the buffers as built); --base names the pretrained file."""
    from test_dino import official_dinov3

    from tools.convert_checkpoint import convert

    config = tmp_path / 'eomt.yaml'
    eomt_config(tmp_path)  # writes it
    trained = create_model(load_config(config)).state_dict()
    torch.manual_seed(1)
    pretrained = {k: v for k, v in create_model(load_config(config)).state_dict().items() if k.startswith('backbone.')}
    base = tmp_path / 'dinov3_pretrained.pth'
    torch.save(official_dinov3({k.removeprefix('backbone.'): v for k, v in pretrained.items()}), base)
    start = {'head.attn_mask_probs': torch.ones(BLOCKS), **pretrained}
    official = {'network.encoder.pixel_mean': torch.zeros(1, 3, 1, 1), 'criterion.empty_weight': torch.ones(4)}
    for key, value in trained.items():
        difference = value - start.get(key, 0)
        if key.startswith('backbone.vit.'):
            key = re.sub(r'^embeddings\.', 'patch_embed.', key.removeprefix('backbone.vit.'))
            key = re.sub(r'^model\.layer\.', 'blocks.', key)
            official[f'network.encoder.backbone.{key}'] = difference
        else:
            official[f'network.{key.removeprefix("head.")}'] = difference
    source = tmp_path / 'pytorch_model.bin'
    torch.save(official, source)

    with pytest.raises(CheckpointError, match='difference to the pretrained DINOv3 weights .* --base'):
        convert(source, tmp_path / 'out.pth', config)
    assert convert(source, tmp_path / 'out.pth', config, partial=False, base=str(base)) == []
    converted = load_checkpoint(tmp_path / 'out.pth')['model']
    assert converted.keys() == trained.keys()
    assert all(torch.allclose(converted[key], value, atol=1e-6) for key, value in trained.items())
    with pytest.raises(CheckpointError, match='only an official DINOv3 EoMT checkpoint holds differences'):
        convert(tmp_path / 'out.pth', tmp_path / 'again.pth', config, base=str(base))
