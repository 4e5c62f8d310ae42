"""Training loss: cross-entropy on logits upsampled to the label size, plus weighted auxiliary terms."""
import torch
import torch.nn.functional as F


class SegmentationLoss:
    """CE with an ignore index and optional class weights; the mean runs over non-ignored pixels."""

    def __init__(self, ignore_index: int, class_weight=None, aux_weight: float = 0.4):
        self.ignore_index, self.aux_weight = ignore_index, aux_weight
        self.class_weight = torch.tensor(class_weight, dtype=torch.float32) if class_weight else None

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """`outputs` is the logits tensor, or [logits, aux_logits] from a model with an auxiliary head."""
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        weight = None if self.class_weight is None else self.class_weight.to(labels.device)
        total = 0
        for i, logits in enumerate(outputs):
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode='bilinear', align_corners=False)
            loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=self.ignore_index)
            total = total + (loss if i == 0 else self.aux_weight * loss)
        return total
