"""The loss terms against hand computations: CE (class weights, OHEM), Dice, Lovász-Softmax, their sum,
the auxiliary weight, ignored pixels, gradients, AMP and the validation of `train.loss`."""

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import train
from engine.config import ConfigError
from engine.loss_terms import ohem_keep
from engine.losses import SegmentationLoss

IGNORE = 255


def two_class_logits(true_prob, labels) -> torch.Tensor:
    """(1, 2, 1, N) logits whose softmax gives each pixel's true class (labels, 0 or 1) `true_prob`."""
    p = torch.tensor(true_prob, dtype=torch.float64)
    labels = torch.tensor(labels)
    p1 = torch.where(labels == 1, p, 1 - p)
    return torch.stack([(1 - p1).log(), p1.log()]).float().view(1, 2, 1, -1)


def loss_of(logits, labels, **cfg) -> float:
    return SegmentationLoss(IGNORE, cfg)(logits, labels).item()


def random_batch(seed=0, classes=4, size=(6, 7)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, *size, generator=generator)
    labels = torch.randint(0, classes, (2, *size), generator=generator)
    labels[0, 0, :3] = IGNORE
    labels[1, 2:4, 5] = IGNORE
    return logits, labels


# ------------------------------------------------------------------------------------ cross-entropy


def test_ce_with_class_weights_and_ignore_equals_torch():
    logits, labels = random_batch()
    weights = [1.0, 2.0, 0.5, 3.0]
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights), ignore_index=IGNORE)
    assert loss_of(logits, labels, class_weight=weights) == pytest.approx(expected.item(), rel=1e-6)
    assert loss_of(logits, labels) == pytest.approx(F.cross_entropy(logits, labels, ignore_index=IGNORE).item())


def test_logits_are_upsampled_bilinearly_to_the_label_size():
    logits, labels = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 8, 10))
    upsampled = F.interpolate(logits, size=(8, 10), mode='bilinear', align_corners=False)
    assert loss_of(logits, labels) == pytest.approx(F.cross_entropy(upsampled, labels).item(), rel=1e-6)


@pytest.mark.parametrize('dice_style', ['mmseg', 'smp'])
def test_a_batch_of_ignored_pixels_gives_zero_not_nan(dice_style):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    cfg = {'dice': 1.0, 'dice_style': dice_style, 'lovasz': 1.0}
    loss = SegmentationLoss(IGNORE, cfg)(logits, torch.full((1, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


# --------------------------------------------------------------------------------------------- OHEM

# True-class probabilities of 5 valid pixels and one ignored pixel (whose probability must not matter).
PROBS, LABELS = [0.9, 0.2, 0.6, 0.8, 0.5, 0.01], [1, 0, 1, 0, 1, IGNORE]


def ohem_case(thresh, min_kept):
    labels = torch.tensor([LABELS])
    logits = two_class_logits(PROBS, [min(v, 1) for v in LABELS])
    nll = F.cross_entropy(logits, torch.where(labels == IGNORE, 0, labels).view(1, 1, -1), reduction='none')
    keep = ohem_keep(nll, (labels != IGNORE).view(1, 1, -1), thresh, min_kept).flatten().tolist()
    return logits, labels.view(1, 1, -1), keep


def test_ohem_keeps_every_pixel_below_the_threshold():
    # k = 1: the second smallest valid p is 0.5 < 0.7, so the threshold is 0.7: keep p in {0.2, 0.6, 0.5}.
    logits, labels, keep = ohem_case(thresh=0.7, min_kept=1)
    assert keep == [False, True, True, False, True, False]
    expected = -(math.log(0.2) + math.log(0.6) + math.log(0.5)) / 3
    assert loss_of(logits, labels, ohem={'thresh': 0.7, 'min_kept': 1}) == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_at_least_min_kept_pixels():
    # k = 4: sorted valid p = [0.2, 0.5, 0.6, 0.8, 0.9], p_k = 0.9 > 0.3: keep p < 0.9, the 4 hardest.
    logits, labels, keep = ohem_case(thresh=0.3, min_kept=4)
    assert keep == [False, True, True, True, True, False]
    expected = -(math.log(0.2) + math.log(0.6) + math.log(0.8) + math.log(0.5)) / 4
    assert loss_of(logits, labels, ohem={'thresh': 0.3, 'min_kept': 4}) == pytest.approx(expected, rel=1e-5)


def test_ohem_drops_the_most_confident_pixel_when_min_kept_covers_all():
    # mmseg indexes the sorted probabilities at min(k, n - 1): with k >= n the threshold is the largest p.
    assert ohem_case(thresh=0.3, min_kept=10)[2] == [False, True, True, True, True, False]


def test_ohem_min_kept_counts_per_image_but_selects_over_the_batch():
    # k = min_kept * B = 4 over the batch: 3 pixels of the hard image and 1 of the easy one are kept,
    # where a per-image selection would keep 2 of each.
    probs = [[0.1, 0.2, 0.3], [0.7, 0.8, 0.9]]
    nll = -torch.tensor(probs).log().view(2, 1, 3)
    keep = ohem_keep(nll, torch.ones(2, 1, 3, dtype=torch.bool), thresh=0.05, min_kept=2)
    assert keep.view(2, 3).tolist() == [[True, True, True], [True, False, False]]


def test_ohem_without_threshold_keeps_the_highest_losses():
    nll = -torch.tensor(PROBS).log().view(1, 1, -1)
    valid = torch.tensor(LABELS).view(1, 1, -1) != IGNORE
    assert ohem_keep(nll, valid, thresh=None, min_kept=2).flatten().tolist() == [False, True, False, False, True, False]


# --------------------------------------------------------------------------------------------- Dice


def test_dice_by_hand():
    # Pixels with labels [1, 0, 1] and p(class 1) = [0.75, 0.5, 0.25] (+ an ignored pixel).
    # Class 1: sum(p t) = 1, sum(p^2) = 0.875, sum(t^2) = 2: 1 - 3 / 3.875 = 7/31.
    # Class 0: sum(p t) = 0.5, sum(p^2) = 0.875, sum(t^2) = 1: 1 - 2 / 2.875 = 7/23.
    logits = two_class_logits([0.75, 0.5, 0.25, 0.99], [1, 0, 1, 1])
    labels = torch.tensor([1, 0, 1, IGNORE]).view(1, 1, -1)
    assert loss_of(logits, labels, ce=0, dice=1) == pytest.approx((7 / 31 + 7 / 23) / 2, rel=1e-5)


def test_dice_of_a_perfect_prediction_is_zero():
    labels = torch.randint(0, 4, (2, 5, 6))
    logits = 100 * F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert loss_of(logits, labels, ce=0, dice=1) == pytest.approx(0, abs=1e-6)


def test_smp_dice_by_hand_pools_the_batch_and_skips_absent_classes():
    # Two images of two pixels, 3 classes; class 2 appears in no label, so it adds 0 to the mean.
    # Class 0 (labels of pixels 1, 3): sum(p t) = 0.5 + 0.25, sum(p) = 0.5 + 0.5 + 0.25 + 0.25, sum(t) = 2.
    # Class 1 (pixels 2, 4): sum(p t) = 0.25 + 0.5, sum(p) = 1.25, sum(t) = 2: 1 - 1.5 / 3.25.
    probs = torch.tensor([[[0.5, 0.5], [0.25, 0.25], [0.25, 0.25]], [[0.25, 0.25], [0.25, 0.5], [0.5, 0.25]]])
    logits = probs.log().view(2, 3, 1, 2)
    labels = torch.tensor([[0, 1], [0, 1]]).view(2, 1, 2)
    expected = ((1 - 1.5 / 3.5) + (1 - 1.5 / 3.25)) / 3
    assert loss_of(logits, labels, ce=0, dice=1, dice_style='smp') == pytest.approx(expected, rel=1e-5)


def test_smp_dice_equals_segmentation_models_pytorch():
    smp = pytest.importorskip('segmentation_models_pytorch')
    logits, labels = random_batch(classes=5)
    labels[labels == 3] = 4  # one class absent from the batch
    reference = smp.losses.DiceLoss('multiclass', from_logits=True, ignore_index=IGNORE)(logits, labels)
    assert loss_of(logits, labels, ce=0, dice=1, dice_style='smp') == pytest.approx(reference.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- Lovász


def test_lovasz_by_hand():
    # Same pixels as the Dice case. Class 1: errors |t - p| = [0.25, 0.5, 0.75] sorted -> [0.75, 0.5,
    # 0.25] with t = [1, 0, 1]; J_i = 1 - (2 - cumsum t) / (2 + cumsum(1 - t)) = [1/2, 2/3, 1], steps
    # [1/2, 1/6, 1/3]: 0.375 + 1/12 + 1/12 = 13/24. Class 0: errors [0.25, 0.5, 0.75] -> t sorted
    # [0, 1, 0], J = [1/2, 1, 1], steps [1/2, 1/2, 0]: 0.375 + 0.25 = 15/24. Mean: 7/12.
    logits = two_class_logits([0.75, 0.5, 0.25, 0.99], [1, 0, 1, 1])
    labels = torch.tensor([1, 0, 1, IGNORE]).view(1, 1, -1)
    assert loss_of(logits, labels, ce=0, lovasz=1) == pytest.approx(7 / 12, rel=1e-5)
    # A third class absent from the labels does not count (classes='present'); 'all' would give 7/18.
    absent = torch.cat([logits, torch.full_like(logits[:, :1], -1e4)], dim=1)
    assert loss_of(absent, labels, ce=0, lovasz=1) == pytest.approx(7 / 12, rel=1e-5)


def test_lovasz_of_a_perfect_prediction_is_zero():
    labels = torch.randint(0, 4, (2, 5, 6))
    logits = 100 * F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert loss_of(logits, labels, ce=0, lovasz=1) == pytest.approx(0, abs=1e-12)


# ----------------------------------------------------------------------------------- the combination


def test_weighted_terms_add_up():
    logits, labels = random_batch()
    ce, dice, lovasz = (
        loss_of(logits, labels, ce=float(n == 'ce'), dice=float(n == 'dice'), lovasz=float(n == 'lovasz'))
        for n in ('ce', 'dice', 'lovasz')
    )
    criterion = SegmentationLoss(IGNORE, {'ce': 0.5, 'dice': 2.0, 'lovasz': 3.0})
    terms = criterion.terms(logits, labels)
    assert terms['loss'].item() == pytest.approx(0.5 * ce + 2 * dice + 3 * lovasz, rel=1e-6)
    assert {k: v.item() for k, v in terms.items() if k != 'loss'} == pytest.approx(
        {'ce': 0.5 * ce, 'dice': 2 * dice, 'lovasz': 3 * lovasz}, rel=1e-6
    )


def test_aux_head_gets_the_same_sum_times_its_weight():
    (logits, labels), (aux, _) = random_batch(0), random_batch(1)
    cfg = {'ce': 1.0, 'dice': 0.5, 'ohem': {'thresh': 0.7, 'min_kept': 10}}
    main_only, aux_only = SegmentationLoss(IGNORE, cfg)(logits, labels), SegmentationLoss(IGNORE, cfg)(aux, labels)
    terms = SegmentationLoss(IGNORE, cfg, aux_weight=0.25).terms([logits, aux], labels)
    assert terms['loss'].item() == pytest.approx((main_only + 0.25 * aux_only).item(), rel=1e-6)
    assert sum(v for k, v in terms.items() if k.startswith('aux_')).item() == pytest.approx(0.25 * aux_only.item())
    assert terms.keys() == {'loss', 'ce', 'dice', 'aux_ce', 'aux_dice'}


@pytest.mark.parametrize(
    'cfg',
    [
        {'ce': 1.0},
        {'ce': 1.0, 'ohem': {'thresh': 0.7, 'min_kept': 5}},
        {'ce': 0.0, 'dice': 1.0},
        {'ce': 0.0, 'dice': 1.0, 'dice_style': 'smp'},
        {'ce': 0.0, 'lovasz': 1.0},
    ],
    ids=['ce', 'ohem', 'dice', 'smp_dice', 'lovasz'],
)
def test_ignored_pixels_do_not_affect_any_term(cfg):
    logits, labels = random_batch()
    changed = logits.clone()
    changed[(labels == IGNORE).unsqueeze(1).expand_as(logits)] = 50 * torch.randn(int((labels == IGNORE).sum()) * 4)
    assert loss_of(changed, labels, **cfg) == pytest.approx(loss_of(logits, labels, **cfg), rel=1e-6)


def test_gradients_are_finite_and_zero_on_ignored_pixels():
    logits, labels = random_batch()
    logits.requires_grad_(True)
    aux = torch.randn(2, 4, 3, 4, requires_grad=True)
    cfg = {'class_weight': [1, 2, 1, 1], 'ohem': {'thresh': 0.7, 'min_kept': 5}, 'dice': 1.0, 'lovasz': 1.0}
    SegmentationLoss(IGNORE, cfg)([logits, aux], labels).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(aux.grad).all()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[labels == IGNORE] == 0)
    assert logits.grad.abs().sum() > 0 and aux.grad.abs().sum() > 0


def test_channels_last_logits_give_the_loss_and_gradients_of_planar_ones():
    logits, labels = random_batch()
    cfg = {'dice': 1.0, 'lovasz': 1.0, 'class_weight': [1, 2, 1, 1]}
    losses, grads = [], []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = logits.clone(memory_format=memory_format).requires_grad_(True)
        loss = SegmentationLoss(IGNORE, cfg)(x, labels)
        loss.backward()
        losses.append(loss.item())
        grads.append(x.grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1])


def test_low_precision_logits_and_autocast_compute_in_float32():
    logits, labels = random_batch()
    cfg = {'dice': 1.0, 'lovasz': 1.0}
    expected = SegmentationLoss(IGNORE, cfg)(logits.bfloat16().float(), labels)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = SegmentationLoss(IGNORE, cfg)(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    'cfg, message',
    [
        ({'ohem': {'thresh': 0.7, 'min_keep': 10}}, 'train.loss.ohem.min_keep'),
        ({'ohem': {'thresh': 'high'}}, 'train.loss.ohem.thresh'),
        ({'ohem': {'min_kept': 0.5}}, 'train.loss.ohem.min_kept'),
        ({'ohem': 0.7}, 'train.loss.ohem'),
        ({'ohem': {}, 'ce': 0, 'dice': 1}, 'train.loss.ce'),
        ({'focal': 1.0}, 'train.loss.focal'),
        ({'dice': -1}, 'train.loss.dice'),
        ({'dice': 1, 'dice_style': 'vnet'}, 'train.loss.dice_style'),
        ({'ce': 0}, 'at least one of'),
        ({'class_weight': 'balanced'}, 'train.loss.class_weight'),
    ],
)
def test_bad_loss_config_is_a_config_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        SegmentationLoss(IGNORE, cfg)


def test_class_weight_length_is_checked_against_the_logits():
    logits, labels = random_batch()
    with pytest.raises(ValueError, match='3 values for 4 classes'):
        loss_of(logits, labels, class_weight=[1, 1, 1])


def test_missing_ohem_keys_take_their_defaults():
    _, cross_entropy = SegmentationLoss(IGNORE, {'ohem': {}}).terms_by_name['ce']
    assert cross_entropy.ohem == {'thresh': 0.7, 'min_kept': 100000}


def test_avg_non_ignore_false_averages_over_all_pixels_as_mmseg():
    """mmseg's CrossEntropyLoss default: the ignored pixels count in the denominator as zeros, and
    class weights scale each pixel's loss without renormalising."""
    logits, labels = random_batch()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    nll = F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE, reduction='sum')
    expected = (nll / labels.numel()).item()
    assert loss_of(logits, labels, class_weight=weight.tolist(), avg_non_ignore=False) == pytest.approx(
        expected, rel=1e-6
    )
    assert loss_of(logits, labels, avg_non_ignore=True) == pytest.approx(
        F.cross_entropy(logits, labels, ignore_index=IGNORE).item(), rel=1e-6
    )


def test_class_weight_auto_is_median_frequency_balancing_of_the_training_labels(tmp_path, capsys):
    """By hand: image a has class 0 on 12 of 16 pixels and class 1 on 4; image b class 0 on all 16;
    class 2 is in neither. f0 = 28 / 32, f1 = 4 / 16, median 0.5625: weights 0.642857, 2.25 and 0."""
    for split in ('train', 'val'):
        for folder in ('images', 'annotations'):
            (tmp_path / folder / split).mkdir(parents=True)
        a = np.zeros((4, 4), np.uint8)
        a[0] = 1
        for name, label in (('a', a), ('b', np.zeros((4, 4), np.uint8))):
            cv2.imwrite(str(tmp_path / 'images' / split / f'{name}.png'), np.full((4, 4, 3), 90, np.uint8))
            cv2.imwrite(str(tmp_path / 'annotations' / split / f'{name}.png'), label)
    config = tmp_path / 'auto.yaml'
    config.write_text(
        f'backbone: {{type: resnet, variant: 18}}\nhead: {{type: fcn, channels: 8}}\n'
        f'data: {{type: folder, root: {tmp_path}, num_classes: 3, workers: 0}}\n'
        'train: {max_iters: 1, batch_size: 2, loss: {class_weight: auto}}\n'
    )
    train.main(['--config', str(config), '--work-dir', str(tmp_path / 'work'), '--device', 'cpu'])
    stored = yaml.safe_load((tmp_path / 'work' / 'config.yaml').read_text())
    assert stored['train']['loss']['class_weight'] == pytest.approx([0.5625 / 0.875, 2.25, 0.0], abs=1e-6)
    assert 'class weights (train.loss.class_weight): 0 0.6429, 1 2.25, 2 0' in capsys.readouterr().out
