"""Mask2Former's set-prediction loss on semantic labels (mmdet 3.x `Mask2FormerHead.loss`, mmseg 1.x's
conversion of the labels), for heads that return {'cls_scores': [...], 'mask_preds': [...]} in training.

Each image's label map becomes one binary mask per class present (the ignore index gets none, so its
pixels are background in every mask, as in mmseg). At every prediction point, queries are matched
one to one to these masks (Hungarian, on class + mask BCE + Dice costs over random points); matched
queries learn their mask (BCE and Dice on points chosen where the prediction is most uncertain) and
their class, unmatched ones the "no object" class. The weights (`train.mask_loss`, the keyword
arguments of MaskClassificationLoss) default to the published ones: class CE 2 (no object 0.1), BCE 5,
Dice 5, for the matching costs as for the loss.
"""

from typing import Annotated

import torch
import torch.distributed as dist
import torch.nn.functional as F
from annotated_types import Ge, Le
from scipy.optimize import linear_sum_assignment

Weight = Annotated[float, Ge(0)]


def point_sample(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of masks (N, H, W) at points (N, P, 2), (x, y) in [0, 1] (0 and 1 the outer
    pixel edges, zeros outside) -> (N, P)."""
    return F.grid_sample(masks[:, None], 2 * points[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def uncertain_points(
    mask_logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
) -> torch.Tensor:
    """PointRend's training points for mask logits (N, H, W) -> (N, num_points, 2): of
    oversample_ratio·num_points random points, the importance_ratio·num_points with logits closest
    to 0, then uniformly random points for the rest."""
    count, device = mask_logits.shape[0], mask_logits.device
    candidates = torch.rand(count, int(num_points * oversample_ratio), 2, device=device)
    uncertainty = -point_sample(mask_logits, candidates).abs()
    num_uncertain = int(importance_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    return torch.cat(
        [
            candidates.gather(1, chosen[..., None].expand(-1, -1, 2)),
            torch.rand(count, num_points - num_uncertain, 2, device=device),
        ],
        dim=1,
    )


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per mask of (N, P) point logits and 0/1 targets: 1 - (2 Σ p·t + 1) / (Σ p + Σ t + 1), p = sigmoid."""
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def pairwise_mask_costs(logits: torch.Tensor, targets: torch.Tensor, mask_weight: float, dice_weight: float):
    """(Q, P) predicted point logits, (G, P) target points -> (Q, G): mask_weight · mean BCE +
    dice_weight · Dice of every prediction against every target."""
    # BCE(x, t) = softplus(x) - x·t, so the mean over points of every pair is one matrix product.
    bce = (F.softplus(logits).sum(-1)[:, None] - logits @ targets.T) / logits.shape[1]
    probs = logits.sigmoid()
    dice = 1 - (2 * probs @ targets.T + 1) / (probs.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    return mask_weight * bce + dice_weight * dice


def semantic_to_masks(labels: torch.Tensor, ignore_index: int) -> tuple:
    """(H, W) labels -> (classes present (G,), their masks (G, H, W) as float); `ignore_index` excluded."""
    classes = labels.unique()
    classes = classes[classes != ignore_index]
    return classes, (labels[None] == classes[:, None, None]).float()


def match(cls_scores: list, mask_preds: list, targets: list, num_points: int, weights: tuple) -> list:
    """Hungarian matching of every prediction point and image: [[(query indices, target indices)]].

    cls_scores [(B, Q, K+1)], mask_preds [(B, Q, h, w)] per point; targets [(classes, masks)] per image;
    weights (class, mask BCE, Dice) of the costs.
    All costs go to the CPU together, in one transfer. Non-finite costs (a diverged model) become
    large finite ones, so that matching still runs and the training loop reports the non-finite loss.
    """
    costs, (cls_weight, mask_weight, dice_weight) = [], weights
    with torch.no_grad():
        for point_cls, point_masks in zip(cls_scores, mask_preds):
            for scores, masks, (classes, target_masks) in zip(point_cls, point_masks, targets):
                if len(classes) == 0:
                    costs.append(scores.new_zeros(len(scores), 0))
                    continue
                points = torch.rand(1, num_points, 2, device=masks.device)  # the same points for all masks
                predicted = point_sample(masks, points.expand(len(masks), -1, -1))
                target = point_sample(target_masks, points.expand(len(target_masks), -1, -1))
                class_cost = -cls_weight * scores.softmax(-1)[:, classes]
                costs.append(class_cost + pairwise_mask_costs(predicted, target, mask_weight, dice_weight))
        flat = torch.cat([c.flatten() for c in costs]).cpu().nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8)
    assignments = []
    for cost, shape in zip(flat.split([c.numel() for c in costs]), [c.shape for c in costs]):
        rows, cols = linear_sum_assignment(cost.view(shape).numpy())
        assignments.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    batch = len(targets)
    return [assignments[i : i + batch] for i in range(0, len(assignments), batch)]


def mean_over_processes(count: torch.Tensor) -> torch.Tensor:
    """The number of target masks averaged over processes (mmdet's `reduce_mean`), so every process
    normalises its mask losses by the same number under DDP."""
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count


class MaskClassificationLoss:
    """`terms(outputs, labels)`: a head's training output and labels (B, H, W) -> {'loss', 'mask_cls',
    'mask_bce', 'mask_dice'}, the weighted terms summed over all prediction points and their sum, with
    their graph. Runs in float32 with autocast off. The keyword arguments are `train.mask_loss`."""

    def __init__(
        self,
        ignore_index: int,
        cls_weight: Annotated[Weight, 'weight of the class cross-entropy (and of the class cost in matching)'] = 2.0,
        mask_weight: Annotated[Weight, 'weight of the mask binary cross-entropy (and its matching cost)'] = 5.0,
        dice_weight: Annotated[Weight, 'weight of the mask Dice (and its matching cost)'] = 5.0,
        no_object_weight: Annotated[Weight, 'class weight of "no object", the class of unmatched queries'] = 0.1,
        num_points: Annotated[int, Ge(1), 'points per mask where BCE and Dice are computed (PointRend)'] = 12544,
        oversample_ratio: Annotated[float, Ge(1), 'candidates drawn per point, to choose the uncertain ones'] = 3.0,
        importance_sample_ratio: Annotated[
            float, Ge(0), Le(1), 'share of the points chosen where the prediction is most uncertain'
        ] = 0.75,
    ):
        self.ignore_index, self.num_points = ignore_index, num_points
        self.weights = cls_weight, mask_weight, dice_weight
        self.no_object_weight = no_object_weight
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio

    def __call__(self, outputs: dict, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(outputs, labels)['loss']

    def terms(self, outputs: dict, labels: torch.Tensor) -> dict:
        with torch.autocast(labels.device.type, enabled=False):
            cls_scores = [c.float() for c in outputs['cls_scores']]
            mask_preds = [m.float() for m in outputs['mask_preds']]
            targets = [semantic_to_masks(image_labels, self.ignore_index) for image_labels in labels]
            num_masks = mean_over_processes(labels.new_tensor(sum(len(c) for c, _ in targets), dtype=torch.float32))
            num_masks = num_masks.clamp(min=1)
            terms = {'mask_cls': 0, 'mask_bce': 0, 'mask_dice': 0}
            for point_cls, point_masks, assignment in zip(
                cls_scores, mask_preds, match(cls_scores, mask_preds, targets, self.num_points, self.weights)
            ):
                for name, value in self.point_terms(point_cls, point_masks, targets, assignment, num_masks).items():
                    terms[name] = terms[name] + value
        return {'loss': sum(terms.values()), **terms}

    def point_terms(self, cls_scores, mask_preds, targets, assignment, num_masks) -> dict:
        """The weighted terms of one prediction point: cls_scores (B, Q, K+1), mask_preds (B, Q, h, w)."""
        num_classes = cls_scores.shape[-1] - 1
        labels = torch.full(cls_scores.shape[:2], num_classes, dtype=torch.long, device=cls_scores.device)
        matched_preds, matched_targets = [], []
        for image, ((classes, masks), (queries, indices)) in enumerate(zip(targets, assignment)):
            queries, indices = queries.to(labels.device), indices.to(labels.device)
            labels[image, queries] = classes[indices]
            matched_preds.append(mask_preds[image, queries])
            matched_targets.append(masks[indices])
        class_weight = cls_scores.new_ones(num_classes + 1)
        class_weight[-1] = self.no_object_weight
        cls_weight, mask_weight, dice_weight = self.weights
        terms = {
            'mask_cls': cls_weight * F.cross_entropy(cls_scores.flatten(0, 1), labels.flatten(), weight=class_weight)
        }
        preds = torch.cat(matched_preds)
        if len(preds) == 0:  # no target mask in the batch: zero mask terms that still reach the graph
            return {**terms, 'mask_bce': preds.sum(), 'mask_dice': preds.sum()}
        with torch.no_grad():
            points = uncertain_points(preds, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            point_targets = point_sample(torch.cat(matched_targets), points)
        point_logits = point_sample(preds, points)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction='sum')
        terms['mask_bce'] = mask_weight * bce / (num_masks * self.num_points)
        terms['mask_dice'] = dice_weight * dice_loss(point_logits, point_targets).sum() / num_masks
        return terms
