"""The training criterion a head declares: the weighted sum of the per-pixel terms of `train.loss`
(engine/loss_terms.py) on logits upsampled to the label size, an auxiliary head getting the same sum
weighted; or, for a head with `set_prediction_loss` (Mask2Former), the set-prediction loss of
`train.mask_loss` (engine/mask_losses.py).

Every term runs in float32 with autocast off, so the loss is the same under AMP. Pixels labelled
`ignore_index` take no part in any term.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F

from models import HEADS

from .config import DEFAULTS, ConfigError, check_kwargs, did_you_mean, is_number, keyword_parameters
from .loss_terms import AUTOMATIC, LOSS_TERMS
from .mask_losses import MaskClassificationLoss

AUX_WEIGHT = 0.4  # the auxiliary head's share of the loss unless aux_head.loss_weight says otherwise


def build_criterion(cfg: dict):
    """The loss of the config's head: `criterion(outputs, labels)` and `criterion.terms(...)`."""
    ignore_index, train = cfg['data']['ignore_index'], cfg['train']
    if uses_set_prediction_loss(cfg['head']):
        return MaskClassificationLoss(ignore_index, **train['mask_loss'])
    return SegmentationLoss(ignore_index, train['loss'], aux_loss_weight(cfg))


def resolve_class_weight(cfg: dict, train_set) -> dict:
    """`cfg`, with `train.loss.class_weight: auto` replaced by the median-frequency weights of `train_set`."""
    if cfg['train']['loss'].get('class_weight') != AUTOMATIC:
        return cfg
    resolved = copy.deepcopy(cfg)
    weights = median_frequency_weights(train_set.class_pixels, train_set.class_image_pixels)
    resolved['train']['loss']['class_weight'] = weights
    return resolved


def median_frequency_weights(class_pixels: np.ndarray, class_image_pixels: np.ndarray) -> list:
    """SegNet's median frequency balancing (Eigen & Fergus 2015): w_c = median(f) / f_c, where f_c is
    the pixels of class c over all pixels of the images c appears in; 0 for a class no image has (it is
    never a target)."""
    present = class_pixels > 0
    frequency = class_pixels[present] / class_image_pixels[present]
    weights = np.zeros(len(class_pixels))
    weights[present] = np.median(frequency) / frequency
    return [round(float(weight), 6) for weight in weights]


def aux_loss_weight(cfg: dict):
    """The auxiliary head's share of the loss (`aux_head.loss_weight`, as mmseg's auxiliary FCN)."""
    return (cfg['aux_head'] or {}).get('loss_weight', AUX_WEIGHT)


def uses_set_prediction_loss(head: dict) -> bool:
    return getattr(HEADS.get(head['type']), 'set_prediction_loss', False)


def term_options(name: str) -> list:
    """The options of the term `name` in train.loss: its keyword arguments."""
    return list(keyword_parameters(LOSS_TERMS[name])[0])


class SegmentationLoss:
    """The weighted sum of the terms of `loss_cfg` (the `train.loss` section: each term's weight under
    its name in LOSS_TERMS, and its options); missing keys take their defaults.

    Called on logits (B, K, h, w), or [logits, aux_logits], and labels (B, H, W); the auxiliary
    head's loss is the same sum times `aux_weight`. `terms()` also returns each weighted term.
    """

    def __init__(self, ignore_index: int, loss_cfg: dict, aux_weight: float = AUX_WEIGHT):
        cfg = {**DEFAULTS['train']['loss'], **check_loss_config(loss_cfg)}
        self.ignore_index, self.aux_weight = ignore_index, aux_weight
        self.terms_by_name = {
            name: (float(cfg[name]), term(**{k: cfg[k] for k in term_options(name)}))
            for name, term in LOSS_TERMS.items()
            if cfg[name]
        }

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(outputs, labels)['loss']

    def terms(self, outputs, labels: torch.Tensor) -> dict:
        """{'loss': the total (with its graph), 'ce'/'dice'/...: the main head's weighted terms,
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

    def weighted_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        """One head's terms times their weights."""
        with torch.autocast(logits.device.type, enabled=False):
            # Class-planar (NCHW) logits: the per-pixel softmax and its masks over channels_last ones run
            # on strided class vectors, the loss's forward and backward ~20% slower on a CPU core.
            logits = logits.float().contiguous()
            logits = F.interpolate(logits, size=labels.shape[-2:], mode='bilinear', align_corners=False)
            valid = labels != self.ignore_index
            target = torch.where(valid, labels, 0).long()
            return {name: weight * term(logits, target, valid) for name, (weight, term) in self.terms_by_name.items()}


def check_loss_config(loss_cfg: dict, num_classes: int = None, source: str = 'config') -> dict:
    """`loss_cfg` itself, or a ConfigError naming the first key that cannot describe a loss: an unknown
    key, a weight that is not a number >= 0, no term on, an option of a term that is off, an option
    its term refuses (with `num_classes`, also a class_weight of another length)."""
    defaults = DEFAULTS['train']['loss']
    for key, value in loss_cfg.items():
        if key not in defaults:
            raise ConfigError(
                f"{source}: unknown key 'train.loss.{key}' (valid: {', '.join(defaults)}){did_you_mean(key, defaults)}"
            )
        if key in LOSS_TERMS and not (is_number(value) and value >= 0):
            raise ConfigError(f"{source}: 'train.loss.{key}' must be a weight >= 0, got {value!r}")
    cfg = {**defaults, **loss_cfg}
    if not any(cfg[name] for name in LOSS_TERMS):
        raise ConfigError(f'{source}: train.loss: at least one of {", ".join(LOSS_TERMS)} must have a weight > 0')
    for name, term in LOSS_TERMS.items():
        options = {key: cfg[key] for key in term_options(name)}
        changed = [key for key in options if key in loss_cfg and loss_cfg[key] != defaults[key]]
        if changed and not cfg[name]:
            raise ConfigError(
                f"{source}: 'train.loss.{changed[0]}' is an option of the {name} term, whose weight "
                f"'train.loss.{name}' is 0"
            )
        check_kwargs(term, options, 'train.loss', source, provided=())
        if options.get('class_weight') == AUTOMATIC:
            options['class_weight'] = None  # train.py fills it in from the training set
        try:
            term(**options)
        except ValueError as error:
            raise ConfigError(f'{source}: {error}') from None
    class_weight = cfg['class_weight']
    if class_weight not in (None, AUTOMATIC) and num_classes is not None and len(class_weight) != num_classes:
        raise ConfigError(
            f"{source}: 'train.loss.class_weight' has {len(class_weight)} values for data.num_classes {num_classes}"
        )
    return loss_cfg
