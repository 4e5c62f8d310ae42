"""A frozen backbone (`backbone.frozen: true`), as linear probing and heads on fixed foundation
features train: its pretrained tensors stay bit-identical while the feature pyramid it feeds learns,
its norms keep their statistics, the optimizer and the moving average's checkpoint hold none of it,
and a resumed run continues exactly."""

import textwrap

import torch

import train
from conftest import TINY_DATA
from engine.checkpoint import load_checkpoint
from engine.config import resolve

FROZEN = (
    """
    backbone: {{type: dinov3, variant: test, frozen: true}}
    head: {{type: upernet, channels: 16}}"""
    + TINY_DATA
    + """\
    train: {{max_iters: 4, batch_size: 2, val_interval: 2, log_interval: 1, ema_decay: 0.9}}
"""
)


def run(folder, root, *extra):
    folder.mkdir(exist_ok=True)
    config = folder / 'frozen.yaml'
    config.write_text(textwrap.dedent(FROZEN.format(root=root)))
    train.main(['--config', str(config), '--work-dir', str(folder / 'work'), '--device', 'cpu', *extra])
    return folder / 'work'


def test_a_frozen_backbone_stays_as_it_was_and_is_stored_once(tmp_path, demo_root):
    work = run(tmp_path, demo_root)
    cfg = train.load_config(str(tmp_path / 'frozen.yaml'))
    torch.manual_seed(cfg['train']['seed'])
    initial = train.create_model(cfg).state_dict()  # what the run started from (same seed)
    last = load_checkpoint(work / 'last.pth')
    vit = [key for key in initial if key.startswith('backbone.vit.')]
    assert vit and all(torch.equal(last['model'][key], initial[key]) for key in vit)
    for part in ('head.', 'backbone.pyramid.'):
        assert any(not torch.equal(last['model'][key], initial[key]) for key in initial if key.startswith(part))
    assert not any(key.startswith('module.backbone.vit.') for key in last['ema'])  # the model holds it
    assert any(key.startswith('module.backbone.pyramid.') for key in last['ema'])
    trained = sum(
        1 for key, value in initial.items() if not key.startswith('backbone.vit.') and value.is_floating_point()
    )
    assert len(last['optimizer']['state']) <= trained
    # resumed from iteration 2, the run ends where the uninterrupted one did, moving average included
    resumed = run(tmp_path / 'resumed', demo_root, '--resume', str(work / 'iter_000002.pth'))
    again = load_checkpoint(resumed / 'last.pth')
    for part in ('model', 'ema'):
        assert again[part].keys() == last[part].keys()
        assert all(torch.equal(again[part][key], value) for key, value in last[part].items())


def test_a_frozen_backbone_keeps_its_norms_in_eval_mode_and_takes_no_gradient():
    model = train.create_model(
        resolve(
            {
                'backbone': {'type': 'dinov3', 'variant': 'test', 'frozen': True},
                'head': {'type': 'upernet', 'channels': 16},
                'data': {'type': 'demo', 'root': 'unused', 'num_classes': 5},
                'train': {'max_iters': 1, 'batch_size': 2},
            }
        )
    ).train()
    assert model.head.training and model.backbone.pyramid.training and not model.backbone.vit.training
    logits = model(torch.randn(2, 3, 64, 64))
    logits.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.vit.parameters())
    assert all(p.grad is not None for p in [*model.head.parameters(), *model.backbone.pyramid.parameters()])
