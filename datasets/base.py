"""The folder dataset every benchmark builds on: `root/images/<split>/x.jpg` + `root/annotations/<split>/x.png`.

Image and label are paired by file stem (extensions may differ). Samples come out as a uint8
(3, H, W) image and an int64 (H, W) label; normalisation happens on the device.
"""
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import Pipeline

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class DatasetError(ValueError):
    """Data on disk that does not match what the config describes: names the files and the problem."""


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image '{path}' (missing, corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DatasetError(f"cannot read label '{path}' (missing, corrupt or not an image)")
    if label.ndim != 2:
        raise DatasetError(f"label '{path}' has {label.shape[2]} channels; expected a single-channel "
                           "class-id image")
    return label


class SegmentationDataset(Dataset):
    """Image/label pairs of one split, run through a pipeline of steps from the config."""

    CLASS_NAMES = None
    PALETTE = None
    IMAGE_DIR, LABEL_DIR, LABEL_SUFFIX = 'images', 'annotations', '.png'

    def __init__(self, root: str, split: str, num_classes: int, pipeline: list = (), ignore_index: int = 255,
                 reduce_zero_label: bool = False, class_names: list = None, palette: list = None, seed: int = 0):
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.ignore_index, self.reduce_zero_label, self.seed = ignore_index, reduce_zero_label, seed
        self.pipeline = Pipeline(list(pipeline), ignore_index)
        self.class_names = class_names or self.CLASS_NAMES or [str(i) for i in range(num_classes)]
        self.palette = np.array(palette or self.PALETTE or default_palette(num_classes), dtype=np.uint8)
        if len(self.class_names) != num_classes or len(self.palette) < num_classes:
            raise DatasetError(f"{self.root}: {num_classes} classes configured but {len(self.class_names)} "
                               f"class names and {len(self.palette)} palette colours given")
        self.samples = self.find_pairs()

    def find_pairs(self) -> list:
        image_dir, label_dir = self.root / self.IMAGE_DIR / self.split, self.root / self.LABEL_DIR / self.split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(f"data folder '{folder}' not found (data.root is '{self.root}')")
        images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        labels = {p.name.removesuffix(self.LABEL_SUFFIX): p for p in sorted(label_dir.iterdir())
                  if p.name.endswith(self.LABEL_SUFFIX)}
        unmatched = sorted(images.keys() ^ labels.keys())
        if unmatched:
            raise DatasetError(f"{image_dir} has {len(images)} images and {label_dir} {len(labels)} labels; "
                               f"{len(unmatched)} without a partner, e.g. {', '.join(unmatched[:5])}")
        if not images:
            raise DatasetError(f"no images in '{image_dir}'")
        return [(images[stem], labels[stem]) for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple:
        """The raw pair with labels mapped to train ids, checked for size and value range."""
        image_path, label_path = self.samples[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"size mismatch: image '{image_path}' is {image.shape[1]}x{image.shape[0]}, "
                               f"label '{label_path}' is {label.shape[1]}x{label.shape[0]}")
        if self.reduce_zero_label:
            label = np.where(label == 0, 255, label.astype(np.int64) - 1).astype(label.dtype)
        invalid = np.unique(label[(label >= self.num_classes) & (label != self.ignore_index)])
        if len(invalid):
            raise DatasetError(f"label '{label_path}' has values {invalid[:10].tolist()} outside "
                               f"[0, {self.num_classes}) and not the ignore index {self.ignore_index}")
        return image, label

    def __getitem__(self, item):
        """`item` is an index, or (index, draw) from the training sampler: augmentation randomness comes
        from (seed, draw) alone, so it does not depend on workers and is replayed exactly on resume."""
        index, draw = item if isinstance(item, tuple) else (item, item)
        image, label = self.pipeline(*self.load(index), np.random.default_rng([self.seed, draw]))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image, torch.from_numpy(label.astype(np.int64))


def default_palette(num_classes: int) -> list:
    """Distinct colours for datasets without a conventional palette (deterministic)."""
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(num_classes, 3)).tolist()
