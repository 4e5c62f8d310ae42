"""Whole-image, sliding-window and multi-scale + flip inference, shared by validation, evaluate.py and infer.py.

Every path returns logits at a requested output size (the label's, for scoring). Sliding windows are
padded to the crop size and run in batches; overlapping windows are averaged. Test-time
augmentation averages softmax probabilities over scales and flips, as mmseg's TTA does.
"""

import functools

import torch
import torch.nn.functional as F


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
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


def whole(model, images: torch.Tensor, size_divisor: int = 1) -> torch.Tensor:
    """One forward; the input is padded (bottom/right, zeros) to a multiple of `size_divisor` and the
    logits are cropped back, so any image size works with models that need divisible inputs."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % size_divisor, -width % size_divisor
    logits = model(F.pad(images, (0, pad_w, 0, pad_h)))
    return resize(logits, (height + pad_h, width + pad_w))[..., :height, :width]


def slide(model, images: torch.Tensor, crop_size, stride, num_classes: int, window_batch: int = 8) -> torch.Tensor:
    """Windows of `crop_size` every `stride` pixels (mmseg's grid; the last window is flush with the
    border), padded to the crop size so they batch, and averaged where they overlap."""
    batch, _, height, width = images.shape
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    total = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for start in range(0, len(windows), window_batch):
        chunk = windows[start : start + window_batch]
        crops = torch.cat(
            [
                F.pad(images[..., y1:y2, x1:x2], (0, crop_w - (x2 - x1), 0, crop_h - (y2 - y1)))
                for y1, y2, x1, x2 in chunk
            ]
        )
        logits = resize(model(crops), (crop_h, crop_w)).split(batch)
        for (y1, y2, x1, x2), window_logits in zip(chunk, logits):
            total[..., y1:y2, x1:x2] += window_logits[..., : y2 - y1, : x2 - x1]
            count[..., y1:y2, x1:x2] += 1
    return total / count


def inference_options(eval_cfg: dict) -> dict:
    """The `eval` config keys that `infer_logits` takes."""
    return {k: eval_cfg[k] for k in ('mode', 'crop_size', 'stride', 'scales', 'flip', 'size_divisor')}


def infer_logits(
    model,
    images: torch.Tensor,
    num_classes: int,
    out_size=None,
    mode: str = 'whole',
    crop_size=None,
    stride=None,
    scales=(1.0,),
    flip: bool = False,
    size_divisor: int = 32,
):
    """Logits (or averaged probabilities under TTA) of normalised `images`, resized to `out_size`."""
    out_size = tuple(out_size or images.shape[-2:])
    height, width = images.shape[-2:]
    outputs = []
    for scale in scales:
        # Sizes round half up, as mmcv's rescale does (Python's round() would send 2.5 to 2).
        scaled = images if scale == 1 else resize(images, (int(height * scale + 0.5), int(width * scale + 0.5)))
        for flipped in (False, True) if flip else (False,):
            batch = scaled.flip(-1) if flipped else scaled
            if mode == 'slide':
                logits = slide(model, batch, crop_size, stride, num_classes)
            else:
                logits = whole(model, batch, size_divisor)
            logits = resize(logits.float(), out_size)
            outputs.append(logits.flip(-1) if flipped else logits)
    if len(outputs) == 1:
        return outputs[0]
    return torch.stack([o.softmax(dim=1) for o in outputs]).mean(0)
