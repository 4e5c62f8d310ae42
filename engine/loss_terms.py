"""The per-pixel loss terms `train.loss` adds up: cross-entropy (class weights, OHEM), Dice and
Lovász-Softmax.

A term is a class: its keyword arguments are its options in `train.loss` (their defaults, types and
bounds are the config's, checked when the config is read), `weight` its default weight there, and a
call maps float32 logits (B, K, H, W) at the label size, the target class of each pixel (B, H, W;
0 where ignored) and the `valid` mask (B, H, W) to a scalar. `LOSS_TERMS` names them: a new term is a
class here and a line there, and `train.loss.<name>: <weight>` switches it on.
"""

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Len, Predicate


def non_negative_numbers(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values)


def non_negative_numbers_or_auto(values) -> bool:
    return values == AUTOMATIC or non_negative_numbers(values)


AUTOMATIC = 'auto'  # class_weight: the median-frequency weights of the training labels (engine/losses.py)


class LossTerm:
    """A term's __init__ may check more than its annotations say, raising ValueError naming the key.
    The first line of its docstring and the strings in its options' annotations document it in
    configs/README.md (tools/config_tables.py, written by tools/make_docs.py)."""

    weight = 0.0  # the default weight in train.loss: off unless the config gives one


def ohem_keep(nll: torch.Tensor, valid: torch.Tensor, thresh, min_kept: int) -> torch.Tensor:
    """mmseg's OHEMPixelSampler: which pixels (B, H, W) the cross-entropy keeps, given each pixel's
    `nll` (B, H, W; -log p of the true class, so p = exp(-nll)) and the `valid` mask.

    Selection runs over the whole batch at once, with `min_kept` per image: k = min_kept * B. With a
    `thresh`, a valid pixel is kept when p < max(thresh, p_k), p_k being the (k+1)-th smallest valid p
    (the largest valid p if there are no more than k): at least the k hardest pixels, and every pixel
    less confident than `thresh`. As in mmseg, when k reaches the number of valid pixels, the most
    confident one is still dropped. With `thresh` null, exactly the k pixels of highest loss are kept.
    """
    with torch.no_grad():
        batch_kept = min_kept * nll.shape[0]
        flat_valid = valid.flatten()
        if thresh is None:
            losses = torch.where(flat_valid, nll.flatten(), -torch.inf)
            hardest = losses.argsort(descending=True)[:batch_kept]
            keep = torch.zeros_like(flat_valid).index_fill_(0, hardest, True) & flat_valid
            return keep.view_as(valid)
        prob = torch.exp(-nll)
        ascending = torch.where(flat_valid, prob.flatten(), torch.inf).sort().values
        # Indexed by a tensor, so that no count leaves the device.
        kth = (flat_valid.sum() - 1).clamp(0, batch_kept)
        threshold = ascending[kth].clamp(min=thresh)
        return valid & (prob < threshold)


class CrossEntropy(LossTerm):
    """Cross-entropy: -log p(true class) of the valid (and, with OHEM, kept) pixels, weighted per class.

    With class weights w, `avg_non_ignore` true takes the mean as F.cross_entropy(weight=...) does,
    sum(w_y * nll) / sum(w_y) (0 when no pixel counts); false, mmseg's CrossEntropyLoss default,
    sum(w_y * nll) over the number of all pixels, ignored ones included, as the published recipes trained.
    """

    weight = 1.0
    OHEM_DEFAULTS = {'thresh': 0.7, 'min_kept': 100000}

    def __init__(
        self,
        class_weight: Annotated[
            list | Literal['auto'] | None,
            Len(1),
            Predicate(non_negative_numbers_or_auto),
            'per-class cross-entropy weights (null: all 1); `auto`: median frequency balancing (SegNet; Eigen '
            '& Fergus 2015) from the training labels, w_c = median(f) / f_c, f_c = the pixels of class c over '
            'all pixels of the training images c appears in (0 for a class they lack), written into the '
            "run's config.yaml and train.log",
        ] = None,
        ohem: Annotated[
            dict | None,
            "`{thresh: 0.7, min_kept: 100000}`: online hard example mining for the cross-entropy (mmseg's OHEM "
            'pixel sampler; missing keys take these values)',
        ] = None,
        avg_non_ignore: Annotated[
            bool,
            "the cross-entropy's denominator: true, the valid pixels (`F.cross_entropy`'s mean, class weights "
            "renormalised); false, all pixels with the ignored ones as 0 (mmseg's `CrossEntropyLoss` default, "
            'which the published recipes in `_base_/schedules/` use)',
        ] = True,
    ):
        if ohem is not None:
            check_ohem(ohem, self.OHEM_DEFAULTS)
        if class_weight == AUTOMATIC:
            raise ValueError("train.loss.class_weight 'auto' needs the training set: train.py fills it in")
        self.class_weight = None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32)
        self.ohem = None if ohem is None else {**self.OHEM_DEFAULTS, **ohem}
        self.avg_non_ignore = avg_non_ignore

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(logits, target, reduction='none')
        class_weight = self.class_weight_on(logits)
        weight = valid.float() if class_weight is None else class_weight[target] * valid
        if self.ohem is not None:
            # Without a threshold mmseg ranks pixels by the loss itself, class weights included.
            hardness = nll if self.ohem['thresh'] is not None or class_weight is None else nll * weight
            weight = weight * ohem_keep(hardness.detach(), valid, **self.ohem)
        if not self.avg_non_ignore:
            return (nll * weight).sum() / nll.numel()
        return (nll * weight).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)

    def class_weight_on(self, logits: torch.Tensor):
        if self.class_weight is None:
            return None
        if len(self.class_weight) != logits.shape[1]:
            count = len(self.class_weight)
            raise ValueError(f'train.loss.class_weight has {count} values for {logits.shape[1]} classes')
        self.class_weight = self.class_weight.to(logits.device)  # copied to the device once, then reused
        return self.class_weight


def check_ohem(ohem, defaults: dict) -> None:
    if not isinstance(ohem, dict):
        raise ValueError(f"'train.loss.ohem' must be null or a mapping {defaults}, got {ohem!r}")
    for key in ohem:
        if key not in defaults:
            raise ValueError(f"unknown key 'train.loss.ohem.{key}' (valid: {', '.join(defaults)})")
    thresh, min_kept = ohem.get('thresh', defaults['thresh']), ohem.get('min_kept', defaults['min_kept'])
    if thresh is not None and not (isinstance(thresh, (int, float)) and 0 <= thresh <= 1):
        raise ValueError(f"'train.loss.ohem.thresh' must be null or a probability in [0, 1], got {thresh!r}")
    if not (isinstance(min_kept, int) and not isinstance(min_kept, bool) and min_kept > 0):
        raise ValueError(f"'train.loss.ohem.min_kept' must be a positive integer, got {min_kept!r}")


class Dice(LossTerm):
    """Soft Dice on softmax probabilities p with one-hot targets t, summed over valid pixels only.

    'mmseg': V-Net Dice as mmseg's DiceLoss (smooth 1, exponent 2): per image and class,
    1 - (2 sum(p t) + 1) / (sum(p^2) + sum(t^2) + 1), then the mean over images and classes.
    'smp': segmentation_models_pytorch's DiceLoss (multiclass): per class over the whole batch,
    1 - 2 sum(p t) / (sum(p) + sum(t)), zero for classes absent from the batch's labels, then the
    mean over all classes: pooled over the batch, as mIoU pools its counts over the val set.
    """

    def __init__(
        self,
        dice_style: Annotated[
            Literal['mmseg', 'smp'],
            "which soft Dice: `mmseg`, V-Net Dice per image (squared areas, smooth 1, mmseg's `DiceLoss`); `smp`, "
            "pooled over the batch with linear areas, classes absent from the batch's labels left out "
            "(segmentation_models_pytorch's `DiceLoss`)",
        ] = 'mmseg',
    ):
        self.style = dice_style

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, num_classes = logits.shape[:2]
        probs = logits.softmax(dim=1) * valid.unsqueeze(1)
        true_prob = probs.gather(1, target.unsqueeze(1)).flatten(1)
        # sum(p t) and sum(t) (= sum(t^2)) per image and class, without materialising the one-hot target.
        target = target.flatten(1)
        intersection = probs.new_zeros(batch, num_classes).scatter_add_(1, target, true_prob)
        target_area = probs.new_zeros(batch, num_classes).scatter_add_(1, target, valid.flatten(1).float())
        if self.style == 'mmseg':
            prob_area = probs.pow(2).sum(dim=(2, 3))
            return (1 - (2 * intersection + 1) / (prob_area + target_area + 1)).mean()
        intersection, target_area = intersection.sum(0), target_area.sum(0)
        score = 2 * intersection / (probs.sum(dim=(0, 2, 3)) + target_area).clamp(min=1e-7)
        return ((1 - score) * (target_area > 0)).mean()


class LovaszSoftmax(LossTerm):
    """Lovász-Softmax (Berman et al. 2018) over the valid pixels of the whole batch, averaged over the
    classes present in the labels (mmseg's LovaszLoss: per_image=False, classes='present').

    For class c with errors e_i = |[y_i = c] - p_ic| sorted in decreasing order, the loss is
    sum_i e_(i) (J_i - J_(i-1)), where J_i = 1 - |gt minus the first i| / |gt union the first i| is the
    Jaccard loss of predicting the i largest errors wrongly.
    """

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1).movedim(1, -1)[valid]  # (P, C)
        labels = target[valid]
        if labels.numel() == 0:
            return logits.sum() * 0
        losses = []
        for c in labels.unique().tolist():
            foreground = (labels == c).float()
            errors, order = (foreground - probs[:, c]).abs().sort(descending=True)
            in_gt = foreground[order]
            jaccard = 1 - (in_gt.sum() - in_gt.cumsum(0)) / (in_gt.sum() + (1 - in_gt).cumsum(0))
            steps = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
            losses.append(errors @ steps)
        return torch.stack(losses).mean()


LOSS_TERMS = {'ce': CrossEntropy, 'dice': Dice, 'lovasz': LovaszSoftmax}
