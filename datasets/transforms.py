"""The mmseg data pipeline in OpenCV and numpy: image (H, W, 3) uint8 RGB and label (H, W) move together.

Every step is `step(image, label, rng) -> (image, label)`. Images are interpolated bilinearly,
labels with nearest neighbour, so no step ever mixes label ids. Images stay uint8 until the batch
reaches the device, where `normalize` runs; colour changes are 256-entry lookup tables, which give
exactly mmseg's float arithmetic at a fraction of its cost. All randomness comes from `rng`.
"""

import inspect
import os
from typing import Annotated

import cv2
import numpy as np
from annotated_types import Ge, Gt, Le, Len, Predicate

IMAGENET_MEAN = (123.675, 116.28, 103.53)


def positive_numbers(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def an_increasing_pair(values) -> bool:
    return positive_numbers(values) and values[0] <= values[1]


# Argument types with their bounds, checked when the config is read (engine/config.py::check_kwargs).
Size = Annotated[list, Len(2, 2), Predicate(positive_numbers)]
FactorRange = Annotated[list, Len(2, 2), Predicate(an_increasing_pair)]
Probability = Annotated[float, Ge(0), Le(1)]


def rescale_size(height: int, width: int, scale) -> tuple:
    """mmseg keep-ratio rescale: fit (long, short) = `scale` without exceeding either bound."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def scale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """mmcv's `Resize(scale_factor=factor, keep_ratio=True)`, the resize of mmseg's test-time
    augmentation: the target (w, h) is rounded half up, then rescaled to keep the aspect ratio,
    rounded again; bilinear, by OpenCV."""
    height, width = image.shape[:2]
    target = (int(width * factor + 0.5), int(height * factor + 0.5))
    size = rescale_size(height, width, target)
    return image if size == (height, width) else resize_pair(image, None, size)[0]


def resize_pair(image, label, size):
    height, width = size
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, label


class Resize:
    """Resize keeping the aspect ratio to fit `scale` (long, short), as mmseg's test-time Resize;
    with keep_ratio false, to exactly `scale` (h, w). Labels keep their size (they are scored there)
    unless `resize_label`."""

    def __init__(self, scale: Size, keep_ratio: bool = True, resize_label: bool = False):
        self.scale, self.keep_ratio, self.resize_label = scale, keep_ratio, resize_label

    def __call__(self, image, label, rng):
        size = rescale_size(*image.shape[:2], self.scale) if self.keep_ratio else tuple(self.scale)
        resized, resized_label = resize_pair(image, label if self.resize_label else None, size)
        return resized, resized_label if self.resize_label else label


class RandomResize:
    """mmseg's RandomResize: `scale` (long, short) times a ratio drawn from `ratio_range`, truncated to
    integers, then a keep-ratio rescale to fit it."""

    def __init__(self, scale: Size, ratio_range: FactorRange = (0.5, 2.0)):
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, image, label, rng):
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(*image.shape[:2], [int(s * ratio) for s in self.scale])
        return resize_pair(image, label, size)


class RandomChoiceResize:
    """mmseg's RandomChoiceResize of ResizeShortestEdge (the Mask2Former recipe): the short edge becomes
    one of `short_edges`, drawn uniformly, the long edge follows the aspect ratio unless that exceeds
    `max_size`, which then bounds it; rounded half up, then mmseg's keep-ratio rescale to that size."""

    def __init__(self, short_edges: list, max_size: int = 2048):
        self.short_edges, self.max_size = short_edges, max_size

    def __call__(self, image, label, rng):
        height, width = image.shape[:2]
        short_edge = self.short_edges[rng.integers(len(self.short_edges))]
        factor = min(short_edge / min(height, width), self.max_size / max(height, width))
        size = rescale_size(height, width, [int(height * factor + 0.5), int(width * factor + 0.5)])
        return resize_pair(image, label, size)


class RandomCrop:
    """Random crop of `size` (h, w), smaller where the image is; with `cat_max_ratio` < 1 the window
    is redrawn up to 10 times until at least two classes are present and none covers `cat_max_ratio`
    or more of the non-ignored pixels (mmseg). Where no window qualifies, the last one drawn is used."""

    def __init__(self, size: Size, cat_max_ratio: Annotated[float, Gt(0), Le(1)] = 1.0, ignore_index: int = 255):
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
    """Horizontal flip with probability `prob` (OpenCV's flip: contiguous results for the steps after)."""

    def __init__(self, prob: Probability = 0.5):
        self.prob = prob

    def __call__(self, image, label, rng):
        if rng.random() < self.prob:
            return cv2.flip(image, 1), cv2.flip(label, 1)
        return image, label


IDENTITY = np.arange(256, dtype=np.uint8)  # the table of a step that does not fire


def compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    return first if then is IDENTITY else then[first]


def apply_table(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return image if table is IDENTITY else cv2.LUT(image, table)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion: brightness + U(-32, 32); contrast x U(0.5, 1.5), either right
    after brightness or last (50/50); saturation x U(0.5, 1.5); hue + randint(-18, 18) mod 180 (OpenCV
    scale). Each step fires with probability 0.5 and clips to uint8.

    Every step is a function of the pixel value alone, so each becomes a 256-entry table computed
    with mmseg's float32 arithmetic; consecutive RGB steps compose into one table. Saturation and hue
    share one HSV round trip (mmseg makes one for each), so results can differ from mmseg's by the
    rounding of one HSV conversion.
    """

    def __init__(
        self,
        brightness_delta: Annotated[int, Ge(0), Le(255)] = 32,
        contrast_range: FactorRange = (0.5, 1.5),
        saturation_range: FactorRange = (0.5, 1.5),
        hue_delta: Annotated[int, Ge(0), Le(180)] = 18,
    ):
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range

    @staticmethod
    def table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        """mmseg's convert(x) = uint8(clip(float32(x) * alpha + beta, 0, 255)) for every x."""
        return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(self, rng) -> np.ndarray:
        return self.table(alpha=rng.uniform(*self.contrast_range)) if rng.integers(2) else IDENTITY

    def __call__(self, image, label, rng):
        before_hsv = IDENTITY
        if rng.integers(2):
            before_hsv = self.table(beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2)
        if contrast_first:
            before_hsv = compose(before_hsv, self.contrast(rng))
        image = apply_table(image, before_hsv)
        saturation = hue = IDENTITY
        if rng.integers(2):
            saturation = self.table(alpha=rng.uniform(*self.saturation_range))
        if rng.integers(2):
            hue = ((np.arange(256) + rng.integers(-self.hue_delta, self.hue_delta)) % 180).astype(np.uint8)
        if saturation is not IDENTITY or hue is not IDENTITY:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            image = cv2.cvtColor(
                cv2.LUT(hsv, np.stack([hue, saturation, IDENTITY], axis=-1)[:, None]), cv2.COLOR_HSV2RGB
            )
        if not contrast_first:
            image = apply_table(image, self.contrast(rng))
        return image, label


class Pad:
    """Pad bottom/right to at least `size` (h, w): the label with the ignore index, the image with
    `value` (one per band). mmseg normalises first and pads with 0; here images stay uint8 (or 16-bit)
    until the device normalises them, so the default `value` is the normalisation mean (data.mean,
    rounded), which normalises to ~0 just the same."""

    def __init__(self, size: Size, value: Annotated[list, Len(1)] = IMAGENET_MEAN, ignore_index: int = 255):
        self.size, self.ignore_index = tuple(size), ignore_index
        self.value = tuple(int(round(v)) for v in value)

    def __call__(self, image, label, rng):
        pad_h, pad_w = max(self.size[0] - image.shape[0], 0), max(self.size[1] - image.shape[1], 0)
        if pad_h or pad_w:
            height, width, bands = image.shape
            padded = np.empty((height + pad_h, width + pad_w, bands), image.dtype)
            padded[...] = self.value  # one value per band: any number of them
            padded[:height, :width] = image
            image = padded
            label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=self.ignore_index)
        return image, label


def albumentations():
    """The albumentations module, imported on first use without its update check (a network call)."""
    os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
    import albumentations

    return albumentations


def build_albumentation(spec, ignore_index: int):
    """One albumentations transform from `{type: <class name>, **arguments}`; compositions (OneOf,
    SomeOf, Sequential) build their `transforms` the same way, and every transform that fills borders
    (shift-scale, perspective, pad) fills the label with `ignore_index` unless told otherwise."""
    library = albumentations()
    if not isinstance(spec, dict) or not isinstance(spec.get('type'), str):
        raise ValueError(f"each albumentations transform is a mapping with a 'type' (a class name), got {spec!r}")
    cls = getattr(library, spec['type'], None)
    if not (isinstance(cls, type) and issubclass(cls, (library.BasicTransform, library.BaseCompose))):
        raise ValueError(f'albumentations has no transform {spec["type"]!r}')
    kwargs = {key: value for key, value in spec.items() if key != 'type'}
    accepted = inspect.signature(cls).parameters
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:  # albumentations itself only warns
        accepts = ', '.join(accepted)
        raise ValueError(f'albumentations {cls.__name__} has no argument {unknown[0]!r} (accepts: {accepts})')
    if issubclass(cls, library.BaseCompose):
        kwargs['transforms'] = [build_albumentation(s, ignore_index) for s in kwargs.get('transforms', [])]
    elif 'fill_mask' in accepted:
        kwargs.setdefault('fill_mask', ignore_index)
    try:
        return cls(**kwargs)
    except ValueError as error:  # raised from pydantic's ValidationError: one line per invalid argument
        if not hasattr(error.__cause__, 'errors'):
            raise ValueError(f'albumentations {cls.__name__}: {error}') from None
        reasons = '; '.join(f'{".".join(map(str, e["loc"]))}: {e["msg"]}' for e in error.__cause__.errors())
        raise ValueError(f'albumentations {cls.__name__}: {reasons}') from None


class Albumentations:
    """A list of albumentations transforms as one step, for the geometric and photometric jitter mmseg's
    pipeline lacks (shift-scale, perspective, noise, CLAHE, gamma, blur, sharpen): albumentations is the
    maintained library for them, on the same OpenCV arrays. Its random state is reseeded from `rng`
    for every sample, so the step is as reproducible and resumable as the others."""

    def __init__(self, transforms: list, ignore_index: int = 255):
        self.compose = albumentations().Compose([build_albumentation(s, ignore_index) for s in transforms])

    def __call__(self, image, label, rng):
        self.compose.set_random_seed(int(rng.integers(2**32)))
        sample = self.compose(image=image, mask=label)
        return np.ascontiguousarray(sample['image']), np.ascontiguousarray(sample['mask'])


RGB_ONLY = (PhotoMetricDistortion, Albumentations)  # steps for 8-bit RGB images (data.in_channels 3)

TRANSFORMS = {
    'resize': Resize,
    'random_resize': RandomResize,
    'random_choice_resize': RandomChoiceResize,
    'random_crop': RandomCrop,
    'random_flip': RandomFlip,
    'photometric': PhotoMetricDistortion,
    'pad': Pad,
    'albumentations': Albumentations,
}

IGNORE_AWARE = (RandomCrop, Pad, Albumentations)


class Pipeline:
    """A list of steps built from YAML (`[{type: random_flip, prob: 0.5}, ...]`); steps that need the
    ignore index get data.ignore_index, and Pad fills with the normalisation mean unless told otherwise."""

    def __init__(self, steps: list, ignore_index: int = 255, mean: list = IMAGENET_MEAN):
        self.steps = []
        for spec in steps:
            kwargs = {k: v for k, v in spec.items() if k != 'type'}
            cls = TRANSFORMS[spec['type']]
            if cls in IGNORE_AWARE:
                kwargs.setdefault('ignore_index', ignore_index)
            if cls is Pad:
                kwargs.setdefault('value', mean)
            self.steps.append(cls(**kwargs))

    def __call__(self, image, label, rng):
        for step in self.steps:
            image, label = step(image, label, rng)
            image = image[..., None] if image.ndim == 2 else image  # OpenCV drops a single band's axis
        return image, label
