"""train.py's factories: channels from the backbone itself, heads, the Offset Learning switch, the model."""

import pytest
import torch

from engine.config import resolve
from engine.rules import check_config
from models import OffsetLearning
from models.heads.classifier import PixelClassifier
from train import create_backbone, create_head, create_model, get_backbone_channels


def config(backbone: dict, head: dict, aux_head=None, num_classes: int = 7) -> dict:
    cfg = resolve(
        {
            'backbone': backbone,
            'head': head,
            'aux_head': aux_head,
            'data': {'type': 'demo', 'root': 'unused', 'num_classes': num_classes},
            'train': {'max_iters': 1, 'batch_size': 1},
        }
    )
    check_config(cfg, 'test')
    return cfg


@pytest.mark.parametrize(
    'backbone',
    [
        {'type': 'resnet', 'variant': 18},
        {'type': 'resnet', 'variant': '50d', 'output_stride': 8},
        {'type': 'mscan', 'variant': 't'},
        {'type': 'efficientformerv2', 'variant': 's1'},
    ],
)
def test_channels_come_from_the_backbone_itself(backbone):
    cfg = config(backbone, {'type': 'aspp'})
    built = create_backbone(cfg)
    assert get_backbone_channels(cfg) == built.out_channels
    features = built.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == built.out_channels


@pytest.mark.parametrize(
    'head, stride',
    [
        ({'type': 'aspp', 'channels': 32, 'dilations': [1, 2, 3]}, 4),
        ({'type': 'deeplabv3', 'channels': 32, 'dilations': [1, 2, 3]}, 32),
        ({'type': 'ham', 'ham_channels': 64, 'channels': 64}, 8),
        ({'type': 'offseg', 'new_channels': [32, 32, 32, 32], 'channels': 64}, 4),
    ],
)
@pytest.mark.parametrize('offset_learning', [False, True])
def test_heads_and_the_offset_learning_switch(head, stride, offset_learning):
    cfg = config({'type': 'resnet', 'variant': 18}, {**head, 'offset_learning': offset_learning})
    model = create_model(cfg).eval()
    assert isinstance(model.head.classifier, OffsetLearning if offset_learning else PixelClassifier)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 7, 64 // stride, 96 // stride)


def test_create_head_takes_channels_and_classes():
    cfg = config({'type': 'resnet', 'variant': 18}, {'type': 'aspp', 'channels': 16, 'dilations': [1, 2]})
    head = create_head(cfg, [8, 16, 32, 64], 3).eval()
    features = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])]
    assert head(features).shape == (1, 3, 16, 16)


def test_aux_head_output_only_in_training():
    cfg = config(
        {'type': 'resnet', 'variant': 18},
        {'type': 'aspp', 'channels': 16, 'dilations': [1, 2]},
        aux_head={'type': 'fcn', 'channels': 16, 'loss_weight': 0.4},
    )
    model = create_model(cfg)
    logits, aux = model.train()(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7, 16, 16) and aux.shape == (2, 7, 4, 4)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7, 16, 16)
