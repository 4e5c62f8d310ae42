"""From a model's output to class scores at the original image size: the one path that validation,
evaluate.py, infer.py and the ONNX graphs share, with mmseg 1.x's semantics step for step.

* Padding (`eval.size_divisor`, mmseg's `data_preprocessor.test_cfg`): the normalised input is
  zero-padded at the bottom and right to a multiple, inference runs on it, and the padding is cut
  from the scores (`EncoderDecoder.postprocess_result`).
* Whole (`whole_inference`): the head's output is resized to the padded input size.
* Slide (`slide_inference`): windows of the crop size every `stride` pixels, the last flush with the
  border; an image smaller than the crop is one window of its own size, unpadded. Each window's
  output is resized to the window, and overlaps are averaged.
* Mask classification (Mask2Former): its mask logits are resized to that size before the classes
  are combined (`models/heads/mask_classification.py`).
* The scores are then resized bilinearly to the size asked for (the label's, the image's).
* Test-time augmentation (any `eval.scales` other than [1.0], or `eval.flip`; mmseg's `--tta`):
  each scale resizes the *loaded* image as mmseg's `tta_pipeline` does (OpenCV, mmcv's rounding; the
  val pipeline's resize is not applied), each view is flipped or not, run as above, brought back to
  the original size, and the softmax probabilities are averaged (`SegTTAModel`).
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F

from datasets.transforms import scale_image
from models.heads.mask_classification import MaskClassification, semantic_scores

TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""The scales of mmseg's `tta_pipeline` (every dataset config of mmseg and OffSeg), used with flip."""


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB -> float, normalised on whatever device the batch is on."""
    mean, std = channel_statistics(tuple(mean), tuple(std), images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=8)
def channel_statistics(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """`mean` and `std` as (1, C, 1, 1) tensors on `device`, made once: built from Python lists on
    every call, they would be a host-to-GPU copy, and a wait for the GPU, in each training step."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False (mmseg's `resize`); a map already at `size` is returned as is."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


def class_scores(output, size) -> torch.Tensor:
    """A model's output -> float32 class scores (B, K, *size): per-pixel logits resized, mask
    classification combined at `size`."""
    if isinstance(output, MaskClassification):
        return semantic_scores(output, size)
    return resize(output.float(), size)


def whole(model, images: torch.Tensor) -> torch.Tensor:
    """One forward; scores at the input's size."""
    return class_scores(model(images), images.shape[-2:])


def slide(model, images: torch.Tensor, crop_size, stride, window_batch: int = 8) -> torch.Tensor:
    """mmseg's sliding windows, run `window_batch` at a time (all windows have one size), each
    window's scores at its size, averaged where windows overlap."""
    batch, _, height, width = images.shape
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)
    stride_h, stride_w = stride
    rows = (height - crop_h + stride_h - 1) // stride_h + 1
    cols = (width - crop_w + stride_w - 1) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            windows.append((y2 - crop_h, y2, x2 - crop_w, x2))
    total, count = None, images.new_zeros(1, 1, height, width)
    for start in range(0, len(windows), window_batch):
        chunk = windows[start : start + window_batch]
        crops = torch.cat([images[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        scores = class_scores(model(crops), (crop_h, crop_w)).split(batch)
        if total is None:
            total = scores[0].new_zeros(batch, scores[0].shape[1], height, width)
        for (y1, y2, x1, x2), window_scores in zip(chunk, scores):
            total[..., y1:y2, x1:x2] += window_scores
            count[..., y1:y2, x1:x2] += 1
    return total / count


def padded_size(size, divisor: int) -> tuple:
    """(H, W) rounded up to multiples of `divisor`: the size `single_view` pads an image to."""
    return tuple(-(-side // divisor) * divisor for side in size)


def single_view(model, images: torch.Tensor, mode='whole', crop_size=None, stride=None, size_divisor=1):
    """Scores of normalised `images` at their own size: padded to `size_divisor`, whole or slide,
    the padding cut off."""
    height, width = images.shape[-2:]
    padded_height, padded_width = padded_size((height, width), size_divisor)
    padded = F.pad(images, (0, padded_width - width, 0, padded_height - height))
    scores = slide(model, padded, crop_size, stride) if mode == 'slide' else whole(model, padded)
    return scores[..., :height, :width]


def inference_options(eval_cfg: dict) -> dict:
    """The `eval` config keys that `predict_scores` takes."""
    return {k: eval_cfg[k] for k in ('mode', 'crop_size', 'stride', 'scales', 'flip', 'size_divisor')}


def is_tta(scales, flip: bool) -> bool:
    """Whether `eval.scales` and `eval.flip` ask for test-time augmentation, which starts from the
    loaded image rather than the val pipeline's output."""
    return list(scales) != [1.0] or bool(flip)


def eval_pipeline(cfg: dict) -> list:
    """The val pipeline steps that bring a loaded image to what `predict_scores` takes: none under
    test-time augmentation, whose scales resize the loaded image (mmseg's `tta_pipeline` replaces its
    `test_pipeline`)."""
    return [] if is_tta(cfg['eval']['scales'], cfg['eval']['flip']) else cfg['data']['val']['pipeline']


def tta_views(images: torch.Tensor, scales) -> list:
    """uint8 (B, 3, H, W) loaded images -> one uint8 batch per scale, resized by OpenCV as mmseg's
    `Resize(scale_factor=s, keep_ratio=True)` resizes them."""
    arrays = images.cpu().numpy().transpose(0, 2, 3, 1)
    return [
        torch.from_numpy(np.stack([scale_image(a, s) for a in arrays]).transpose(0, 3, 1, 2)).to(images.device)
        for s in scales
    ]


def predict_scores(
    model,
    images: torch.Tensor,
    mean,
    std,
    out_size=None,
    mode: str = 'whole',
    crop_size=None,
    stride=None,
    scales=(1.0,),
    flip: bool = False,
    size_divisor: int = 1,
) -> torch.Tensor:
    """uint8 RGB `images` (B, 3, H, W) -> float32 class scores (B, K, *out_size; default (H, W)).

    Single scale, `images` are the val pipeline's output and the scores are the model's (logits, or
    mask classification's combined scores). With test-time augmentation (`is_tta`), `images` are the
    loaded images and the scores are the averaged probabilities.
    """
    out_size = tuple(out_size or images.shape[-2:])
    options = dict(mode=mode, crop_size=crop_size, stride=stride, size_divisor=size_divisor)
    if not is_tta(scales, flip):
        return resize(single_view(model, normalize(images, mean, std), **options), out_size)
    probabilities = []
    for view in tta_views(images, scales):
        for flipped in (False, True) if flip else (False,):
            batch = normalize(view.flip(-1) if flipped else view, mean, std)
            scores = single_view(model, batch, **options)
            scores = resize(scores.flip(-1) if flipped else scores, out_size)
            probabilities.append(scores.softmax(dim=1))
    return torch.stack(probabilities).mean(0)
