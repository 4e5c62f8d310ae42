"""A small generated dataset so the repo trains out of the box: textured shapes on textured ground.

Each class has its own texture (stripe orientation and period, or checks) and shape, with random
colours, positions and sizes; a thin band on every shape's outline is labelled ignore (255), like
the void borders of Pascal VOC. Generated once into `root` on first use, deterministic from `seed`.
"""

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .base import SegmentationDataset

SIZE = 128
SPLITS = {'train': 240, 'val': 48}


class DemoScenes(SegmentationDataset):
    CLASS_NAMES = ['ground', 'disc', 'box', 'triangle', 'ring']
    PALETTE = [[60, 60, 60], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]]

    def __init__(self, root: str, split: str, num_classes: int = 5, **kwargs):
        if not (Path(root) / 'images' / split).is_dir():
            generate(Path(root))
        super().__init__(root, split, num_classes, **kwargs)


def texture(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A SIZE x SIZE x 3 float texture in [0, 1]: class `kind` fixes the pattern, colours are random."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    if kind == 0:
        pattern = cv2.GaussianBlur(rng.random((SIZE, SIZE)).astype(np.float32), (0, 0), 3)
        pattern = (pattern - pattern.min()) / (np.ptp(pattern) + 1e-6)
    elif kind == 2:
        period = rng.uniform(10, 14)
        pattern = ((x // (period / 2) + y // (period / 2)) % 2).astype(np.float32)
    else:
        angle = {1: 0.0, 3: np.pi / 4, 4: np.pi / 2}[kind] + rng.uniform(-0.2, 0.2)
        period = {1: 6.0, 3: 9.0, 4: 5.0}[kind] * rng.uniform(0.85, 1.15)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    dark, light = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1.0, 3)
    image = dark + pattern[..., None] * (light - dark)
    return image + rng.normal(0, 0.04, image.shape)


def shape_mask(kind: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cx, cy, r = rng.integers(20, SIZE - 20), rng.integers(20, SIZE - 20), int(rng.integers(12, 26))
    if kind == 1:
        cv2.circle(mask, (cx, cy), r, 1, -1)
    elif kind == 2:
        cv2.rectangle(mask, (cx - r, cy - int(r * rng.uniform(0.6, 1))), (cx + r, cy + r), 1, -1)
    elif kind == 3:
        points = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(mask, [points], 1)
    else:
        cv2.circle(mask, (cx, cy), r, 1, -1)
        cv2.circle(mask, (cx, cy), r // 2, 0, -1)
    return mask


def scene(rng: np.random.Generator) -> tuple:
    image, label = texture(0, rng), np.zeros((SIZE, SIZE), np.uint8)
    outlines = np.zeros((SIZE, SIZE), np.uint8)
    for kind in rng.choice([1, 2, 3, 4], size=rng.integers(2, 5)):
        mask = shape_mask(int(kind), rng)
        image[mask > 0] = texture(int(kind), rng)[mask > 0]
        label[mask > 0] = kind
        outlines |= cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    label[outlines > 0] = 255
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return image, label


def generate(root: Path, seed: int = 0) -> None:
    """Write every split into a temporary folder, then move it into place (safe if run twice at once)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.demo-', dir=root.parent))
    rng = np.random.default_rng(seed)
    for split, count in SPLITS.items():
        for sub in ('images', 'annotations'):
            (staging / sub / split).mkdir(parents=True)
        for i in range(count):
            image, label = scene(rng)
            cv2.imwrite(
                str(staging / 'images' / split / f'{i:04d}.jpg'),
                cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )
            cv2.imwrite(str(staging / 'annotations' / split / f'{i:04d}.png'), label)
    try:
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging)
        if not root.is_dir():
            raise
