"""LR schedules against their closed forms, stepped through a real optimizer, the parameter groups of the
SegFormer recipe (head lr x10, norms without decay, mmcv's longest-key rule), and the normalised moving
average of the weights against its closed form."""

import math
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, read_config, resolve
from engine.optim import build_ema, build_optimizer, build_scheduler, group_rule
from engine.rules import check_config
from train import create_model

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
BASE_LR = 0.01


def lrs_at(iterations, max_iters: int, schedule: dict) -> dict:
    """{iteration: lr} of an SGD optimizer stepped once per iteration, read before each step (the lr
    that iteration trains with), as the training loop does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = build_scheduler(optimizer, max_iters, schedule)
    lrs = {}
    for iteration in range(max(iterations) + 1):
        lrs[iteration] = optimizer.param_groups[0]['lr']
        optimizer.step()
        scheduler.step()
    return {i: lrs[i] for i in iterations}


def schedule(**options) -> dict:
    return {'type': 'poly', 'power': 1.0, 'min_lr': 0.0, 'warmup_iters': 0, 'warmup_ratio': 1e-6, **options}


def test_linear_warmup_then_poly_to_min_lr():
    # 1000 iterations, 100 of linear warm-up from 1e-6, then poly (power 0.9) over the remaining 900 down
    # to 1% of the base lr: mmseg 1.x LinearLR(start_factor=1e-6, end=100) + PolyLR(eta_min, begin=100).
    lrs = lrs_at(
        [0, 1, 50, 99, 100, 101, 550, 999, 1000, 1200],
        1000,
        schedule(power=0.9, min_lr=0.01, warmup_iters=100, warmup_ratio=1e-6),
    )
    warmup = {t: BASE_LR * (1e-6 + (1 - 1e-6) * t / 100) for t in (0, 1, 50, 99)}
    poly = {t: BASE_LR * (0.01 + 0.99 * (1 - (t - 100) / 900) ** 0.9) for t in (100, 101, 550, 999)}
    expected = {**warmup, **poly, 1000: BASE_LR * 0.01, 1200: BASE_LR * 0.01}
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert (
        lrs[0] == pytest.approx(1e-8)
        and lrs[100] == pytest.approx(BASE_LR)
        and lrs[550] == pytest.approx(BASE_LR * (0.01 + 0.99 * 0.5**0.9))
    )


def test_the_segformer_recipe_poly_power_one():
    recipe = read_config(CONFIGS / 'segformer_b0.yaml', ['backbone.pretrained=null'])['train']
    lrs = lrs_at([0, 750, 1500, 80750, 159999], recipe['max_iters'], recipe['schedule'])
    assert lrs == pytest.approx(
        {
            0: BASE_LR * 1e-6,
            750: BASE_LR * (1e-6 + (1 - 1e-6) * 0.5),
            1500: BASE_LR,
            80750: BASE_LR * 0.5,
            159999: BASE_LR / 158500,
        },
        rel=1e-9,
    )


def test_cosine():
    # No warm-up: lr = min + (base - min) (1 + cos(pi t / T)) / 2, T = 400, min = 10% of the base.
    lrs = lrs_at([0, 100, 200, 300, 400], 400, schedule(type='cosine', min_lr=0.1))
    expected = {t: BASE_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 400))) for t in (0, 100, 200, 300, 400)}
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[200] == pytest.approx(BASE_LR * 0.55) and lrs[400] == pytest.approx(BASE_LR * 0.1)


def test_cosine_after_warmup_starts_at_the_end_of_warmup():
    # 10 warm-up iterations, then the cosine over the remaining 40: a quarter of it at 20, half at 30.
    lrs = lrs_at([5, 10, 20, 30, 50], 50, schedule(type='cosine', warmup_iters=10, warmup_ratio=0.1))
    assert lrs == pytest.approx(
        {5: BASE_LR * 0.55, 10: BASE_LR, 20: BASE_LR * (1 + math.sqrt(0.5)) / 2, 30: BASE_LR * 0.5, 50: 0}, abs=1e-12
    )


def test_constant_after_warmup():
    lrs = lrs_at([0, 5, 10, 500], 1000, schedule(type='constant', warmup_iters=10, warmup_ratio=0.2, min_lr=0.5))
    assert lrs == pytest.approx({0: BASE_LR * 0.2, 5: BASE_LR * 0.6, 10: BASE_LR, 500: BASE_LR}, rel=1e-9)


def test_every_group_follows_the_schedule_from_its_own_lr():
    model = torch.nn.ModuleDict({'head': torch.nn.Linear(2, 2), 'backbone': torch.nn.Linear(2, 2)})
    optimizer, _ = build_optimizer(
        model, {'type': 'sgd', 'lr': BASE_LR, 'weight_decay': 0.0, 'momentum': 0.9}, {'head': {'lr_mult': 10.0}}
    )
    scheduler = build_scheduler(optimizer, 100, schedule(power=1.0))
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    assert sorted(g['lr'] for g in optimizer.param_groups) == pytest.approx([BASE_LR * 0.75, BASE_LR * 7.5])


# ---------------------------------------------------------------------------------- parameter groups


@pytest.fixture(scope='module')
def segformer():
    """SegFormer-B0 (MiT-B0 + mmseg's head) and the recipe of configs/segformer_b0.yaml."""
    cfg = read_config(CONFIGS / 'segformer_b0.yaml', ['backbone.pretrained=null', 'data.num_classes=19'])
    return create_model(cfg), cfg['train']


def group_of(optimizer) -> dict:
    """{id(parameter): its group}, checking that every parameter is in exactly one group."""
    groups = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            assert id(param) not in groups
            groups[id(param)] = group
    return groups


def test_segformer_recipe_groups(segformer):
    model, recipe = segformer
    lr, decay = recipe['optimizer']['lr'], recipe['optimizer']['weight_decay']
    assert recipe['param_groups'] == {
        'pos_block': {'decay_mult': 0.0},
        'norm': {'decay_mult': 0.0},
        'head': {'lr_mult': 10.0},
    }
    optimizer, table = build_optimizer(model, recipe['optimizer'], recipe['param_groups'])
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = group_of(optimizer)
    names = dict(model.named_parameters())
    assert groups.keys() == {id(p) for p in names.values()}
    head = [n for n in names if n.startswith('head.')]
    norms = [n for n in names if 'norm' in n and not n.startswith('head.')]
    assert len(head) >= 10 and len(norms) >= 40  # MiT-B0: 2 per LayerNorm, 3 LayerNorms per block and stage
    for name, param in names.items():
        group = groups[id(param)]
        expected = (10 * lr, decay) if name in head else (lr, 0.0) if name in norms else (lr, decay)
        assert (group['lr'], group['weight_decay']) == pytest.approx(expected), name
    assert 'head' in table and 'norm' in table


def test_head_beats_norm_on_a_tie_as_mmcv_does():
    # Equal lengths: mmcv sorts the keys alphabetically, then by length, and takes the first that matches.
    rules = {'pos_block': {'decay_mult': 0.0}, 'norm': {'decay_mult': 0.0}, 'head': {'lr_mult': 10.0}}
    assert group_rule('decode_head.batch_norm.weight', rules) == 'head'
    assert group_rule('backbone.block1.0.norm1.weight', rules) == 'norm'
    assert group_rule('backbone.patch_embed1.proj.weight', rules) is None


def test_longest_key_wins_in_the_model(segformer):
    model, recipe = segformer
    rules = {
        'head': {'lr_mult': 10.0},
        'norm': {'decay_mult': 0.0},
        'layer_norm': {'lr_mult': 2.0},
        'fusion_conv.bn': {'decay_mult': 0.0},
        'bn': {'lr_mult': 5.0},
    }
    optimizer, _ = build_optimizer(model, recipe['optimizer'], rules)
    groups, names = group_of(optimizer), dict(model.named_parameters())
    lr, decay = recipe['optimizer']['lr'], recipe['optimizer']['weight_decay']

    def lr_and_decay(name):
        return groups[id(names[name])]['lr'], groups[id(names[name])]['weight_decay']

    stage_norm = 'backbone.segformer.stages.0.patch_embeddings.layer_norm.weight'
    block_norm = 'backbone.segformer.stages.0.blocks.0.layernorm_before.weight'
    assert lr_and_decay(stage_norm) == pytest.approx((2 * lr, decay))  # 'layer_norm' (10) over 'norm' (4)
    assert lr_and_decay(block_norm) == pytest.approx((lr, 0.0))  # only 'norm' matches
    assert lr_and_decay('head.convs.0.bn.weight') == pytest.approx((10 * lr, decay))  # 'head' over 'bn'
    assert lr_and_decay('head.fusion_conv.bn.weight') == pytest.approx((lr, 0.0))  # 'fusion_conv.bn' over 'head'


@pytest.mark.parametrize(
    'rules, message',
    [
        ({'norm': {'decay_mul': 0.0}}, "unknown key 'train.param_groups.norm.decay_mul'"),
        ({'head': 10}, "'train.param_groups.head' must be a mapping"),
        ({'head': {'lr_mult': 'ten'}}, "'train.param_groups.head.lr_mult' must be a number"),
    ],
)
def test_a_misspelt_rule_is_an_error_not_a_silent_no_op(rules, message):
    with pytest.raises(ConfigError, match=message):
        build_optimizer(
            torch.nn.Linear(2, 2), {'type': 'adamw', 'lr': 1e-3, 'weight_decay': 0.01, 'betas': [0.9, 0.999]}, rules
        )


def test_the_moving_average_is_normalised_and_copies_integer_buffers():
    """After t updates: sum_k (1 - d) d^(t-k) w_k / (1 - d^t), weights summing to one, so the first
    (near-random) weights keep no extra mass; BatchNorm's step count is copied."""
    decay, steps = 0.9, 30
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    ema = build_ema(model, decay)
    seen = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 2, 5, 5))  # moves the BatchNorm statistics and its step count
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update_parameters(model)
    averaged = ema.module.state_dict()
    for key, value in averaged.items():
        if not value.is_floating_point():
            assert torch.equal(value, seen[-1][key]), key
            continue
        weights = [(1 - decay) * decay ** (steps - k) for k in range(1, steps + 1)]
        expected = sum(w * state[key].double() for w, state in zip(weights, seen)) / (1 - decay**steps)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    assert sum(weights) / (1 - decay**steps) == pytest.approx(1.0)


# --- layer-wise learning-rate decay ---------------------------------------------------------------


def decayed_lrs(backbone: dict, layer_decay: dict) -> dict:
    """{parameter name: its group's lr} of a model with this backbone and an FCN head, lr 1."""
    cfg = resolve(
        {
            'backbone': backbone,
            'head': {'type': 'fcn', 'channels': 8},
            'data': {'type': 'demo', 'root': 'unused', 'num_classes': 5},
            'train': {'max_iters': 1, 'batch_size': 2, 'layer_decay': layer_decay},
        }
    )
    with torch.device('meta'):
        model = create_model(cfg)
    optimizer, table = build_optimizer(model, {**cfg['train']['optimizer'], 'lr': 1.0}, {}, cfg['train']['layer_decay'])
    assert 'layer' in table.splitlines()[0]
    group_of = {id(p): group['lr'] for group in optimizer.param_groups for p in group['params']}
    return {name: group_of[id(p)] for name, p in model.named_parameters()}


def test_vit_layer_decay_gives_block_i_rate_to_the_depth_plus_one_minus_i():
    """BEiT / DINOv2 fine-tuning: embeddings rate^(depth+1), block i rate^(depth-i), the head 1."""
    lrs = decayed_lrs({'type': 'dinov3', 'variant': 'test'}, {'rate': 0.5})  # depth 4
    assert lrs['backbone.vit.embeddings.cls_token'] == 0.5**5
    assert lrs['backbone.vit.model.layer.0.norm1.weight'] == 0.5**4
    assert lrs['backbone.vit.model.layer.3.mlp.up_proj.weight'] == 0.5**1
    assert lrs['backbone.vit.norm.weight'] == lrs['backbone.pyramid.upsample_2x.weight'] == 1.0
    assert all(lr == 1.0 for name, lr in lrs.items() if name.startswith('head.'))


def test_eomts_official_decay_gives_the_embeddings_the_first_blocks_rate_and_the_last_block_the_full_rate():
    """tue-mps/eomt's DINOv2 recipe (llrd 0.8): block i of n at 0.8^(n-1-i), the embeddings as block 0,
    the final norm and the head at 1: `num_layers: n - 1` with `embeddings_as_first_block`."""
    lrs = decayed_lrs(
        {'type': 'dinov3', 'variant': 'test'}, {'rate': 0.8, 'num_layers': 3, 'embeddings_as_first_block': True}
    )
    assert lrs['backbone.vit.embeddings.patch_embeddings.weight'] == lrs['backbone.vit.model.layer.0.norm1.weight']
    assert [lrs[f'backbone.vit.model.layer.{i}.norm1.weight'] for i in range(4)] == pytest.approx(
        [0.8**3, 0.8**2, 0.8, 1]
    )
    assert lrs['backbone.vit.norm.weight'] == 1.0


def test_convnext_stage_wise_decay_is_mmsegs_for_convnext_t():
    """mmseg's ConvNeXt-T UPerNet recipe (decay 0.9, stage_wise, num_layers 6): the stem and the
    downsampling layers at 0.9^7, stage s at 0.9^(6-s), everything after the stages at 1."""
    for backbone, stem, stage, norm in (
        (
            'convnext',
            'backbone.body.stem_0.weight',
            'backbone.body.stages_{}.blocks.0.conv_dw.weight',
            'backbone.norms.0.weight',
        ),
        (
            'dinov3_convnext',
            'backbone.convnext.model.stages.0.downsample_layers.0.weight',
            'backbone.convnext.model.stages.{}.layers.0.depthwise_conv.weight',
            None,
        ),
    ):
        lrs = decayed_lrs({'type': backbone, 'variant': 'test'}, {'rate': 0.9, 'num_layers': 6})
        assert lrs[stem] == pytest.approx(0.9**7)
        assert [lrs[stage.format(s)] for s in range(4)] == pytest.approx([0.9**6, 0.9**5, 0.9**4, 0.9**3])
        assert norm is None or lrs[norm] == 1.0


def test_layer_decay_needs_a_backbone_that_numbers_its_layers():
    with pytest.raises(ConfigError, match='train.layer_decay needs a backbone'):
        check_config(
            resolve(
                {
                    'backbone': {'type': 'mscan', 'variant': 'test'},
                    'head': {'type': 'fcn'},
                    'data': {'type': 'demo', 'root': 'unused', 'num_classes': 5},
                    'train': {'max_iters': 1, 'batch_size': 2, 'layer_decay': {'rate': 0.9}},
                }
            ),
            'test',
        )


def test_the_backbone_warm_up_of_eomt_waits_then_ramps_from_zero():
    """tue-mps/eomt's two-stage warm-up (TwoStageWarmupPolySchedule), T = 100, warm-ups [5, 10], poly 0.9:
    the head warms up over 5 iterations, then decays as (1 - (t - 5) / 95)^0.9; the backbone stays at 0
    for 5, warms up over the next 10, then decays as (1 - (t - 15) / 85)^0.9."""
    model = torch.nn.ModuleDict({'backbone': torch.nn.Linear(2, 2), 'head': torch.nn.Linear(2, 2)})
    optimizer, _ = build_optimizer(
        model,
        {'type': 'adamw', 'lr': BASE_LR, 'weight_decay': 0.0, 'betas': [0.9, 0.999]},
        {'weight': {}},
        split_backbone=True,
    )
    assert sorted(g['backbone'] for g in optimizer.param_groups) == [False, False, True, True]
    scheduler = build_scheduler(
        optimizer, 100, schedule(power=0.9, warmup_iters=5, warmup_ratio=0.0, backbone_warmup=[5, 10])
    )
    for t in range(100):
        head = t / 5 if t < 5 else (1 - (t - 5) / 95) ** 0.9
        backbone = 0.0 if t < 5 else (t - 5) / 10 if t < 15 else (1 - (t - 15) / 85) ** 0.9
        for group in optimizer.param_groups:
            assert group['lr'] == pytest.approx(BASE_LR * (backbone if group['backbone'] else head), abs=1e-12), t
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize('kind', ['adamw', 'sgd'])
def test_the_optimizer_updates_each_tensor_in_one_fused_kernel(kind):
    model = torch.nn.Linear(3, 2)
    cfg = {'type': kind, 'lr': 0.1, 'weight_decay': 0.01, 'betas': [0.9, 0.999], 'momentum': 0.9}
    optimizer, _ = build_optimizer(model, cfg, {})
    assert optimizer.defaults['fused'] is True
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # the fused kernels run on this device
