"""Scores from a confusion matrix accumulated on the device, as mmseg's IoUMetric computes them.

Pixels whose label is the ignore index are excluded. A metric is a function of each class's true
positives, label area and predicted area (float64 tensors over the classes): one value per class,
whose mean over the classes where it is defined (not NaN) is the score (`mIoU` from the per-class
`IoU`), or one value for all pixels (`aAcc`). `eval.metrics` lists the names of `METRICS` to report;
a new metric is a function here and a line in `METRICS`.
"""

import math

import torch


def iou(true_positive, label_area, predicted_area):
    return true_positive / (label_area + predicted_area - true_positive)


def accuracy(true_positive, label_area, predicted_area):
    """The share of each class's pixels predicted as it: mmseg's per-class Acc, which is also its Recall."""
    return true_positive / label_area


def precision(true_positive, label_area, predicted_area):
    return true_positive / predicted_area


def dice(true_positive, label_area, predicted_area):
    return 2 * true_positive / (label_area + predicted_area)


def fscore(true_positive, label_area, predicted_area):
    """F1 of precision and recall, as mmseg's f_score with beta 1: NaN where either is undefined or both
    are 0 (a class never predicted right), which the class mean then leaves out, unlike Dice's 0."""
    p, r = precision(true_positive, label_area, predicted_area), accuracy(true_positive, label_area, predicted_area)
    return 2 * p * r / (p + r)


def pixel_accuracy(true_positive, label_area, predicted_area):
    return true_positive.sum() / label_area.sum()


METRICS = {  # name in eval.metrics -> metric; an 'm' name is the class mean of the per-class values
    'mIoU': iou,
    'mAcc': accuracy,
    'aAcc': pixel_accuracy,
    'mDice': dice,
    'mFscore': fscore,
    'mPrecision': precision,
    'mRecall': accuracy,
}
DEFAULT_METRICS = ('mIoU', 'mAcc', 'aAcc')
SELECTION_METRIC = 'mIoU'  # always computed: it chooses best.pth


def per_class_key(name: str):
    """The key of a class-mean metric's per-class values ('mIoU' -> 'IoU'); None for one over all pixels."""
    return name[1:] if name.startswith('m') else None


def reported(names=DEFAULT_METRICS) -> list:
    """`names` with the selection metric first, each once."""
    return list(dict.fromkeys([SELECTION_METRIC, *names]))


def per_class_keys(names=DEFAULT_METRICS) -> list:
    """The keys of the per-class values reported with `names` ('IoU' for mIoU, ...)."""
    return [key for key in map(per_class_key, reported(names)) if key]


def null_for_nan(results: dict) -> dict:
    """`results` with the NaN in its per-class lists (classes absent from the data) as None: JSON's null."""
    return {k: [None if math.isnan(x) else x for x in v] if isinstance(v, list) else v for k, v in results.items()}


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int, device='cpu'):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """prediction and label: class-id tensors of the same shape (label at its original size)."""
        if prediction.shape != label.shape:
            raise ValueError(f'prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in size')
        valid = label != self.ignore_index
        index = label[valid].long() * self.num_classes + prediction[valid].long()
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (distributed evaluation)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self, names=DEFAULT_METRICS) -> dict:
        """{metric name: score} for `names` (the selection metric always included), and {per-class key:
        [value per class]} for the class means among them; in percent (rows: label, columns: prediction)."""
        matrix = self.matrix.double().cpu()
        counts = matrix.diag(), matrix.sum(1), matrix.sum(0)
        results = {}
        for name in reported(names):
            values = METRICS[name](*counts)
            key = per_class_key(name)
            results[name] = 100 * (values.nanmean() if key else values).item()
            if key:
                results[key] = (100 * values).tolist()
        return results
