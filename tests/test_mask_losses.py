"""Mask2Former's set-prediction loss against hand computations: point sampling, uncertain points, Dice and
BCE costs, the label-to-mask conversion, the Hungarian matching, the summed terms, and the criterion
of a head that declares it (its weights from train.mask_loss)."""

import math

import pytest
import torch

from conftest import ROOT
from engine.config import ConfigError
from engine.losses import build_criterion
from engine.mask_losses import (
    MaskClassificationLoss,
    dice_loss,
    match,
    pairwise_mask_costs,
    point_sample,
    semantic_to_masks,
    uncertain_points,
)
from engine.rules import load_config

IGNORE = 255


def test_point_sample_by_hand():
    """Pixel (i, j) of an h x w map has its centre at ((j+0.5)/w, (i+0.5)/h); outside is zero."""
    masks = torch.tensor([[[4.0, 1.0], [2.0, 3.0]]])
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 0.0]]])
    torch.testing.assert_close(point_sample(masks, points), torch.tensor([[4.0, 1.0, 2.5, 2.0, 1.0]]))


def test_uncertain_points_prefer_logits_near_zero():
    """On a ramp from -50 (left) to 50 (right), the 3/4 chosen for uncertainty are the quarter of the 3x
    oversampled candidates closest to the middle column (|x - 0.5| < 0.125, up to 0.25 near the top and
    bottom edges, where the zero padding halves the logits); the last quarter is uniform."""
    torch.manual_seed(0)
    ramp = torch.linspace(-50, 50, 200).view(1, 1, 200).expand(1, 4, 200)
    points = uncertain_points(ramp, 400, oversample_ratio=3.0, importance_ratio=0.75)
    assert points.shape == (1, 400, 2) and ((points >= 0) & (points <= 1)).all()
    assert (points[0, :300, 0] - 0.5).abs().max() < 0.25
    assert (points[0, 300:, 0] - 0.5).abs().max() > 0.3


def test_dice_loss_by_hand():
    """p = sigmoid(0) = 0.5: target (1, 0): 1 - (2·0.5 + 1) / (1 + 1 + 1) = 1/3; target (1, 1): 1/4."""
    losses = dice_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(losses, torch.tensor([1 / 3, 1 / 4]))


def test_pairwise_mask_costs_by_hand():
    """Logit 0 has BCE log 2 against any target; costs 5·BCE + 5·Dice per (prediction, target) pair."""
    logits = torch.tensor([[0.0, 0.0], [20.0, -20.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    costs = pairwise_mask_costs(logits, targets, mask_weight=5.0, dice_weight=5.0)
    torch.testing.assert_close(costs[0], torch.tensor([5 * math.log(2) + 5 / 3, 5 * math.log(2) + 5 / 4]))
    # A confident (1, 0) prediction: no BCE and Dice 1 - 3/3 = 0 against (1, 0); BCE 10, Dice 1 - 3/4 against (1, 1).
    torch.testing.assert_close(costs[1], torch.tensor([0.0, 5 * 10 + 5 / 4]), atol=1e-6, rtol=0)


def test_semantic_labels_become_one_mask_per_present_class_without_ignore():
    labels = torch.tensor([[3, 3, IGNORE], [0, 3, 0]])
    classes, masks = semantic_to_masks(labels, IGNORE)
    assert classes.tolist() == [0, 3]
    assert masks.tolist() == [[[0, 0, 0], [1, 0, 1]], [[1, 1, 0], [0, 1, 0]]]


def test_matching_pairs_each_query_with_the_mask_it_predicts():
    """Labels [3 3 | 5 5]: query 0 predicts the right half as class 5, query 1 the left half as class 3."""
    labels = torch.tensor([[[3, 3, 5, 5]] * 2])
    cls_scores = torch.full((1, 2, 7), -10.0)
    cls_scores[0, 0, 5] = cls_scores[0, 1, 3] = 10.0
    mask_preds = torch.tensor([[[[-10.0, -10.0, 10.0, 10.0]] * 2, [[10.0, 10.0, -10.0, -10.0]] * 2]])
    targets = [semantic_to_masks(labels[0], IGNORE)]
    [[(queries, indices)]] = match([cls_scores], [mask_preds], targets, num_points=64, weights=(2.0, 5.0, 5.0))
    assert dict(zip(queries.tolist(), targets[0][0][indices].tolist())) == {0: 5, 1: 3}


def test_loss_terms_by_hand():
    """All logits 0: every query's class NLL is log(K+1), whatever its label, so the weighted mean is
    log 3 too; a mask logit 0 has BCE log 2 at every point. Two prediction points double each term.
    An image of ignored pixels only adds no mask and only "no object" labels."""
    torch.manual_seed(0)
    labels = torch.tensor([[[1] * 8] * 8, [[IGNORE] * 8] * 8])
    outputs = {
        'cls_scores': [torch.zeros(2, 3, 3, requires_grad=True) for _ in range(2)],
        'mask_preds': [torch.zeros(2, 3, 2, 2, requires_grad=True) for _ in range(2)],
    }
    terms = MaskClassificationLoss(IGNORE, num_points=50).terms(outputs, labels)
    torch.testing.assert_close(terms['mask_cls'], torch.tensor(2 * 2 * math.log(3)))
    torch.testing.assert_close(terms['mask_bce'], torch.tensor(2 * 5 * math.log(2)))
    assert 0 < terms['mask_dice'] < 2 * 5
    torch.testing.assert_close(terms['loss'], terms['mask_cls'] + terms['mask_bce'] + terms['mask_dice'])
    terms['loss'].backward()
    assert all(p.grad is not None for p in outputs['mask_preds'] + outputs['cls_scores'])
    assert outputs['mask_preds'][0].grad[1].abs().sum() == 0  # no mask to learn in the ignored image


def test_a_batch_without_masks_still_has_a_graph():
    labels = torch.full((1, 4, 4), IGNORE)
    outputs = {
        'cls_scores': [torch.zeros(1, 2, 3, requires_grad=True)],
        'mask_preds': [torch.zeros(1, 2, 1, 1, requires_grad=True)],
    }
    terms = MaskClassificationLoss(IGNORE).terms(outputs, labels)
    assert terms['mask_bce'] == 0 and terms['mask_dice'] == 0
    terms['loss'].backward()
    assert outputs['mask_preds'][0].grad is not None


def test_mask2former_trains_with_the_set_loss_of_train_mask_loss_and_refuses_per_pixel_settings():
    cfg = load_config(ROOT / 'configs' / 'mask2former_camvid.yaml', ['train.mask_loss.cls_weight=1.5'])
    criterion = build_criterion(cfg)
    assert isinstance(criterion, MaskClassificationLoss) and criterion.weights == (1.5, 5.0, 5.0)
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8))
    outputs = {'cls_scores': [torch.randn(2, 4, 4)], 'mask_preds': [torch.randn(2, 4, 2, 2)]}
    terms = criterion.terms(outputs, labels)
    assert set(terms) == {'loss', 'mask_cls', 'mask_bce', 'mask_dice'}
    torch.testing.assert_close(terms['loss'], terms['mask_cls'] + terms['mask_bce'] + terms['mask_dice'])
    with pytest.raises(ConfigError, match='train.loss.dice set, but the mask2former head trains with train.mask_loss'):
        load_config(ROOT / 'configs' / 'mask2former_camvid.yaml', ['train.loss.dice=1'])
    with pytest.raises(ConfigError, match='train.mask_loss.num_points set, but the fpn head trains with train.loss'):
        load_config(ROOT / 'configs' / 'camvid.yaml', ['train.mask_loss.num_points=100'])


def test_non_finite_predictions_give_a_non_finite_loss_not_a_matching_error():
    """scipy refuses NaN costs; the loss must still come out (NaN), for train.py's non-finite check."""
    labels = torch.tensor([[[0, 1], [1, 1]]])
    outputs = {'cls_scores': [torch.full((1, 2, 3), float('nan'))], 'mask_preds': [torch.zeros(1, 2, 2, 2)]}
    terms = MaskClassificationLoss(IGNORE, num_points=16).terms(outputs, labels)
    assert not torch.isfinite(terms['mask_cls'])
