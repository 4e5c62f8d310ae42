"""mIoU/mAcc/aAcc against a confusion matrix computed by hand."""

import math

import torch

from engine.metrics import ConfusionMatrix


def test_metrics_match_a_hand_computed_confusion_matrix():
    # 4 classes, ignore 255. Class 3 appears in neither prediction nor label: its IoU is undefined.
    label = torch.tensor([[0, 0, 1, 1, 255], [2, 2, 2, 0, 255]])
    prediction = torch.tensor(
        [
            [0, 1, 1, 1, 3],  # the 3 lies on an ignored pixel: not counted
            [2, 2, 0, 0, 1],
        ]
    )
    confusion = ConfusionMatrix(num_classes=4, ignore_index=255)
    confusion.update(prediction, label)
    # rows = label, columns = prediction, over the 8 valid pixels
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion.matrix, expected)
    results = confusion.compute()
    iou = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 2 / (3 + 2 - 2)]  # tp / (label + predicted - tp)
    acc = [2 / 3, 2 / 2, 2 / 3]
    assert all(math.isclose(a, 100 * b) for a, b in zip(results['IoU'][:3], iou))
    assert math.isnan(results['IoU'][3]) and math.isnan(results['Acc'][3])
    assert math.isclose(results['mIoU'], 100 * sum(iou) / 3)
    assert math.isclose(results['mAcc'], 100 * sum(acc) / 3)
    assert math.isclose(results['aAcc'], 100 * 6 / 8)


def test_updates_accumulate_and_sizes_must_agree():
    confusion = ConfusionMatrix(num_classes=2, ignore_index=255)
    confusion.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    confusion.update(torch.tensor([1]), torch.tensor([0]))
    assert confusion.matrix.tolist() == [[1, 1], [0, 1]]
    try:
        confusion.update(torch.zeros(2, 2), torch.zeros(2, 3))
    except ValueError as error:
        assert 'differ in size' in str(error)
    else:
        raise AssertionError('a size mismatch must be refused')


def test_dice_fscore_precision_and_recall_follow_mmseg_and_only_listed_metrics_are_reported():
    """mmseg's IoUMetric: Dice 2tp / (label + predicted), Precision tp / predicted, Recall tp / label,
    Fscore their harmonic mean; class means over the classes where they are defined."""
    confusion = ConfusionMatrix(num_classes=3, ignore_index=255)
    confusion.update(torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([0, 1, 1, 1, 0, 0]))  # class 2: absent
    results = confusion.compute(['mDice', 'mFscore', 'mPrecision', 'mRecall'])
    assert list(results) == ['mIoU', 'IoU', 'mDice', 'Dice', 'mFscore', 'Fscore', 'mPrecision', 'Precision',
                             'mRecall', 'Recall']  # fmt: skip
    tp, label, predicted = [2, 2], [3, 3], [3, 3]
    dice = [2 * t / (lab + p) for t, lab, p in zip(tp, label, predicted)]
    assert all(math.isclose(a, 100 * b) for a, b in zip(results['Dice'][:2], dice))
    assert math.isclose(results['mFscore'], results['mDice'])  # equal when both are defined
    assert math.isclose(results['mPrecision'], 100 * 2 / 3) and math.isclose(results['mRecall'], 100 * 2 / 3)
    assert all(math.isnan(results[key][2]) for key in ('Dice', 'Fscore', 'Precision', 'Recall'))
