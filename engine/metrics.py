"""mIoU, mAcc and aAcc from a confusion matrix accumulated on the device, as mmseg's IoUMetric.

Pixels whose label is the ignore index are excluded. A class absent from both prediction and label
has an undefined IoU (NaN) and is left out of the means.
"""

import torch


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

    def compute(self) -> dict:
        """Per-class IoU and accuracy (rows: label, columns: prediction) and their means, in percent."""
        matrix = self.matrix.double().cpu()
        true_positive = matrix.diag()
        label_area, predicted_area = matrix.sum(1), matrix.sum(0)
        iou = true_positive / (label_area + predicted_area - true_positive)
        accuracy = true_positive / label_area
        return {
            'aAcc': 100 * (true_positive.sum() / matrix.sum()).item(),
            'mIoU': 100 * iou.nanmean().item(),
            'mAcc': 100 * accuracy.nanmean().item(),
            'IoU': (100 * iou).tolist(),
            'Acc': (100 * accuracy).tolist(),
        }
