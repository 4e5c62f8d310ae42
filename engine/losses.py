"""Training loss: cross-entropy (class weights, OHEM), Dice and Lovász-Softmax, added with the weights of
`train.loss`, on logits upsampled to the label size; an auxiliary head gets the same sum, weighted.

Every term runs in float32 with autocast off, so the loss is the same under AMP. Pixels labelled
`ignore_index` take no part in any term.
"""

import torch
import torch.nn.functional as F

from .config import DEFAULTS, ConfigError, check_type, is_number
from .mask_losses import MaskClassificationLoss

TERMS = ('ce', 'dice', 'lovasz')
OHEM_DEFAULTS = {'thresh': 0.7, 'min_kept': 100000}


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


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    class_weight=None,
    ohem=None,
    avg_non_ignore: bool = True,
) -> torch.Tensor:
    """-log p(true class) of the valid (and, with OHEM, kept) pixels, weighted per class w_y.

    `avg_non_ignore` true: their mean as F.cross_entropy(weight=...) takes it, sum(w_y * nll) / sum(w_y)
    (0 when no pixel counts). False: mmseg's CrossEntropyLoss default, sum(w_y * nll) over the number of
    all pixels, ignored ones included, as the published recipes trained."""
    nll = F.cross_entropy(logits, target, reduction='none')
    weight = valid.float() if class_weight is None else class_weight[target] * valid
    if ohem is not None:
        # Without a threshold mmseg ranks pixels by the loss itself, class weights included.
        hardness = nll if ohem['thresh'] is not None or class_weight is None else nll * weight
        weight = weight * ohem_keep(hardness.detach(), valid, **ohem)
    if not avg_non_ignore:
        return (nll * weight).sum() / nll.numel()
    return (nll * weight).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, style: str = 'mmseg') -> torch.Tensor:
    """Soft Dice on softmax probabilities p with one-hot targets t, summed over valid pixels only.

    'mmseg': V-Net Dice as mmseg's DiceLoss (smooth 1, exponent 2): per image and class,
    1 - (2 sum(p t) + 1) / (sum(p^2) + sum(t^2) + 1), then the mean over images and classes.
    'smp': segmentation_models_pytorch's DiceLoss (multiclass): per class over the whole batch,
    1 - 2 sum(p t) / (sum(p) + sum(t)), zero for classes absent from the batch's labels, then the
    mean over all classes: pooled over the batch, as mIoU pools its counts over the val set.
    """
    batch, num_classes = logits.shape[:2]
    probs = logits.softmax(dim=1) * valid.unsqueeze(1)
    true_prob = probs.gather(1, target.unsqueeze(1)).flatten(1)
    # sum(p t) and sum(t) (= sum(t^2)) per image and class, without materialising the one-hot target.
    target = target.flatten(1)
    intersection = probs.new_zeros(batch, num_classes).scatter_add_(1, target, true_prob)
    target_area = probs.new_zeros(batch, num_classes).scatter_add_(1, target, valid.flatten(1).float())
    if style == 'mmseg':
        prob_area = probs.pow(2).sum(dim=(2, 3))
        return (1 - (2 * intersection + 1) / (prob_area + target_area + 1)).mean()
    intersection, target_area = intersection.sum(0), target_area.sum(0)
    score = 2 * intersection / (probs.sum(dim=(0, 2, 3)) + target_area).clamp(min=1e-7)
    return ((1 - score) * (target_area > 0)).mean()


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lovász-Softmax (Berman et al. 2018) over the valid pixels of the whole batch, averaged over the
    classes present in the labels (mmseg's LovaszLoss: per_image=False, classes='present').

    For class c with errors e_i = |[y_i = c] - p_ic| sorted in decreasing order, the loss is
    sum_i e_(i) (J_i - J_(i-1)), where J_i = 1 - |gt minus the first i| / |gt union the first i| is the
    Jaccard loss of predicting the i largest errors wrongly.
    """
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


class SegmentationLoss:
    """The weighted sum of the terms of `loss_cfg` (the `train.loss` section: `ce`, `dice`, `lovasz`
    weights, `class_weight`, `ohem` and `avg_non_ignore` for the cross-entropy); missing keys take
    their defaults.

    Called on logits (B, K, h, w), or [logits, aux_logits], and labels (B, H, W); the auxiliary
    head's loss is the same sum times `aux_weight`. `terms()` also returns each weighted term.
    A head that returns a dict of predictions (mask classification: Mask2Former) gets the
    set-prediction loss of `engine/mask_losses.py` with its published weights instead.
    """

    def __init__(self, ignore_index: int, loss_cfg: dict, aux_weight: float = 0.4):
        cfg = {**DEFAULTS['train']['loss'], **check_loss_config(loss_cfg)}
        self.ignore_index, self.aux_weight = ignore_index, aux_weight
        self.weights = {name: float(cfg[name]) for name in TERMS if cfg[name]}
        self.class_weight = (
            None if cfg['class_weight'] is None else torch.tensor(cfg['class_weight'], dtype=torch.float32)
        )
        self.ohem = None if cfg['ohem'] is None else {**OHEM_DEFAULTS, **cfg['ohem']}
        self.avg_non_ignore = cfg['avg_non_ignore']
        self.dice_style = cfg['dice_style']
        self.mask_classification = MaskClassificationLoss(ignore_index)

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(outputs, labels)['loss']

    def terms(self, outputs, labels: torch.Tensor) -> dict:
        """{'loss': the total (with its graph), 'ce'/'dice'/'lovasz': the main head's weighted terms,
        'aux_ce'/...: the auxiliary head's (detached, for logging; they add up to 'loss')}."""
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        terms, total = {}, 0
        for i, output in enumerate(outputs):
            weight, prefix = (1.0, '') if i == 0 else (self.aux_weight, 'aux_')
            for name, value in self.weighted_terms(output, labels).items():
                value = weight * value
                terms[prefix + name] = value.detach()
                total = total + value
        return {'loss': total, **terms}

    def weighted_terms(self, output, labels: torch.Tensor) -> dict:
        """One head's terms times their weights: a dict of mask predictions gets the set-prediction loss."""
        if isinstance(output, dict):
            return self.mask_classification.terms(output, labels)
        return {name: self.weights[name] * value for name, value in self.head_terms(output, labels).items()}

    def head_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        """The unweighted terms of one head's logits."""
        with torch.autocast(logits.device.type, enabled=False):
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode='bilinear', align_corners=False)
            valid = labels != self.ignore_index
            target = torch.where(valid, labels, 0).long()
            terms = {}
            if 'ce' in self.weights:
                terms['ce'] = cross_entropy(
                    logits, target, valid, self.class_weight_on(logits), self.ohem, self.avg_non_ignore
                )
            if 'dice' in self.weights:
                terms['dice'] = dice_loss(logits, target, valid, self.dice_style)
            if 'lovasz' in self.weights:
                terms['lovasz'] = lovasz_softmax(logits, target, valid)
            return terms

    def class_weight_on(self, logits: torch.Tensor):
        if self.class_weight is None:
            return None
        if len(self.class_weight) != logits.shape[1]:
            raise ConfigError(
                f"'train.loss.class_weight' has {len(self.class_weight)} values for {logits.shape[1]} classes"
            )
        self.class_weight = self.class_weight.to(logits.device)  # copied to the device once, then reused
        return self.class_weight


def check_loss_config(loss_cfg: dict, num_classes: int = None) -> dict:
    """`loss_cfg` itself, or a ConfigError naming the first key that cannot describe a loss (with
    `num_classes`, also a class_weight of another length)."""
    for key, value in loss_cfg.items():
        if key not in DEFAULTS['train']['loss']:
            raise ConfigError(f"unknown key 'train.loss.{key}' (valid: {', '.join(DEFAULTS['train']['loss'])})")
        if key in TERMS and not (is_number(value) and value >= 0):
            raise ConfigError(f"'train.loss.{key}' must be a weight >= 0, got {value!r}")
    if 'dice_style' in loss_cfg:  # the config's own check of a choice, for a loss built without a config file
        default = DEFAULTS['train']['loss']['dice_style']
        check_type('train.loss.dice_style', loss_cfg['dice_style'], default, 'train.loss')
    if not any(loss_cfg.get(name, DEFAULTS['train']['loss'][name]) for name in TERMS):
        raise ConfigError(f'train.loss: at least one of {", ".join(TERMS)} must have a weight > 0')
    class_weight = loss_cfg.get('class_weight')
    if class_weight is not None and not (isinstance(class_weight, list) and all(map(is_number, class_weight))):
        raise ConfigError(f"'train.loss.class_weight' must be null or a list of numbers, got {class_weight!r}")
    if class_weight is not None and num_classes is not None and len(class_weight) != num_classes:
        raise ConfigError(
            f"'train.loss.class_weight' has {len(class_weight)} values for data.num_classes {num_classes}"
        )
    if loss_cfg.get('ohem') is not None:
        check_ohem_config(loss_cfg)
    return loss_cfg


def check_ohem_config(loss_cfg: dict) -> None:
    ohem = loss_cfg['ohem']
    if not isinstance(ohem, dict):
        raise ConfigError(f"'train.loss.ohem' must be null or a mapping {OHEM_DEFAULTS}, got {ohem!r}")
    if not loss_cfg.get('ce', DEFAULTS['train']['loss']['ce']):
        raise ConfigError("'train.loss.ohem' selects pixels for the cross-entropy, but 'train.loss.ce' is 0")
    for key in ohem:
        if key not in OHEM_DEFAULTS:
            raise ConfigError(f"unknown key 'train.loss.ohem.{key}' (valid: {', '.join(OHEM_DEFAULTS)})")
    thresh, min_kept = ohem.get('thresh', OHEM_DEFAULTS['thresh']), ohem.get('min_kept', OHEM_DEFAULTS['min_kept'])
    if thresh is not None and not (is_number(thresh) and 0 <= thresh <= 1):
        raise ConfigError(f"'train.loss.ohem.thresh' must be null or a probability in [0, 1], got {thresh!r}")
    if not (isinstance(min_kept, int) and not isinstance(min_kept, bool) and min_kept > 0):
        raise ConfigError(f"'train.loss.ohem.min_kept' must be a positive integer, got {min_kept!r}")
