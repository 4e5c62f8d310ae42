"""The mmseg data pipeline in OpenCV and numpy: image (H, W, 3) uint8 RGB and label (H, W) move together.

Every step is `step(image, label, rng) -> (image, label)`. Images are interpolated bilinearly,
labels with nearest neighbour, so no step ever mixes label ids. Everything stays uint8 until the
batch reaches the device, where `normalize` runs.
"""
import cv2
import numpy as np


def rescale_size(height: int, width: int, scale) -> tuple:
    """mmseg keep-ratio rescale: fit (long, short) = `scale` without exceeding either bound."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image, label, size):
    height, width = size
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, label


class Resize:
    """Resize keeping the aspect ratio to fit `scale` (long, short), as mmseg's test-time Resize."""

    def __init__(self, scale: list, keep_ratio: bool = True, resize_label: bool = False):
        self.scale, self.keep_ratio, self.resize_label = scale, keep_ratio, resize_label

    def __call__(self, image, label, rng):
        size = rescale_size(*image.shape[:2], self.scale) if self.keep_ratio else tuple(self.scale)
        resized, resized_label = resize_pair(image, label if self.resize_label else None, size)
        return resized, resized_label if self.resize_label else label


class RandomResize:
    """Rescale `scale` (long, short) by a ratio drawn from `ratio_range`, keeping the aspect ratio."""

    def __init__(self, scale: list, ratio_range: list = (0.5, 2.0)):
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, image, label, rng):
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(*image.shape[:2], [s * ratio for s in self.scale])
        return resize_pair(image, label, size)


class RandomCrop:
    """Random crop of `size` (h, w); retried up to 10 times until no class covers more than
    `cat_max_ratio` of the non-ignored pixels and at least two classes are present (mmseg)."""

    def __init__(self, size: list, cat_max_ratio: float = 1.0, ignore_index: int = 255):
        self.size, self.cat_max_ratio, self.ignore_index = tuple(size), cat_max_ratio, ignore_index

    def window(self, shape, rng):
        (height, width), (crop_h, crop_w) = shape, self.size
        top = rng.integers(0, max(height - crop_h, 0) + 1)
        left = rng.integers(0, max(width - crop_w, 0) + 1)
        return slice(top, top + crop_h), slice(left, left + crop_w)

    def __call__(self, image, label, rng):
        rows, cols = self.window(label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                counts = np.bincount(label[rows, cols].ravel())
                if self.ignore_index < len(counts):
                    counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                rows, cols = self.window(label.shape, rng)
        return image[rows, cols], label[rows, cols]


class RandomFlip:
    """Horizontal flip with probability `prob`."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, image, label, rng):
        if rng.random() < self.prob:
            return image[:, ::-1], label[:, ::-1]
        return image, label


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion: brightness, contrast (first or last), saturation and hue, each
    applied with probability 0.5, clipping to uint8 after every step."""

    def __init__(self, brightness_delta: int = 32, contrast_range: list = (0.5, 1.5),
                 saturation_range: list = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range

    @staticmethod
    def convert(image, alpha=1.0, beta=0.0):
        return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(self, image, rng):
        return self.convert(image, alpha=rng.uniform(*self.contrast_range)) if rng.integers(2) else image

    def __call__(self, image, label, rng):
        if rng.integers(2):
            image = self.convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2)
        if contrast_first:
            image = self.contrast(image, rng)
        saturate, shift_hue = rng.integers(2), rng.integers(2)
        if saturate or shift_hue:
            hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
            if saturate:
                hsv[..., 1] = self.convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            if shift_hue:
                hue = hsv[..., 0].astype(np.int32) + rng.integers(-self.hue_delta, self.hue_delta)
                hsv[..., 0] = (hue % 180).astype(np.uint8)
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            image = self.contrast(image, rng)
        return image, label


class Pad:
    """Pad bottom/right to at least `size` (h, w): image with 0, label with the ignore index."""

    def __init__(self, size: list, ignore_index: int = 255):
        self.size, self.ignore_index = tuple(size), ignore_index

    def __call__(self, image, label, rng):
        pad_h, pad_w = max(self.size[0] - image.shape[0], 0), max(self.size[1] - image.shape[1], 0)
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(np.ascontiguousarray(image), 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=0)
            label = cv2.copyMakeBorder(np.ascontiguousarray(label), 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT,
                                       value=self.ignore_index)
        return image, label


TRANSFORMS = {
    'resize': Resize,
    'random_resize': RandomResize,
    'random_crop': RandomCrop,
    'random_flip': RandomFlip,
    'photometric': PhotoMetricDistortion,
    'pad': Pad,
}

IGNORE_AWARE = (RandomCrop, Pad)


class Pipeline:
    """A list of steps built from YAML (`[{type: random_flip, prob: 0.5}, ...]`)."""

    def __init__(self, steps: list, ignore_index: int = 255):
        self.steps = []
        for spec in steps:
            kwargs = {k: v for k, v in spec.items() if k != 'type'}
            cls = TRANSFORMS[spec['type']]
            if cls in IGNORE_AWARE:
                kwargs.setdefault('ignore_index', ignore_index)
            self.steps.append(cls(**kwargs))

    def __call__(self, image, label, rng):
        for step in self.steps:
            image, label = step(image, label, rng)
        return image, label
