"""Reading label files and turning their values into train ids, without per-pixel Python.

A label file holds raw values: class ids in a grey (8- or 16-bit) PNG, palette indices in a
palette-mode PNG (Pascal VOC), or colours in an RGB PNG. Raw values become train ids through one
lookup table covering every 8- and 16-bit value (`id_table`), applied in a single lookup per label.
Colour labels are first turned into values by a colour table (`ColorTable`).
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
LABEL_VALUES = 65536  # every value an 8- or 16-bit label file can hold: one table covers both


def is_palette_png(path: Path) -> bool:
    """True for a palette-mode PNG (IHDR colour type 3). OpenCV expands those to colours, so their
    indices, which are the class ids, have to be read with Pillow."""
    with open(path, 'rb') as file:
        header = file.read(26)
    return len(header) == 26 and header.startswith(PNG_SIGNATURE) and header[25] == 3


def read_raw_label(path: Path, colors: bool = False):
    """The label's raw values as a 2-D uint8/uint16 array, or its RGB colours (H, W, 3) with `colors`;
    None if the file cannot be decoded. Anything else (e.g. a 3-channel label read without `colors`)
    comes back as read, for the caller to report."""
    if colors:
        return cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
    if is_palette_png(path):
        try:
            with Image.open(path) as image:
                return np.asarray(image)
        except (OSError, ValueError):
            return None
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def pack_colors(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) uint32 codes 0xRRGGBB, so colours compare as single numbers."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class ColorTable:
    """RGB colour -> label value, for datasets whose labels are colour images (`data.label_colors`).

    Built from `{value: [r, g, b]}` (several colours may share a value, e.g. two void colours)."""

    def __init__(self, colors: dict):
        codes = {int(pack_colors(np.array(rgb, np.uint8))): value for value, rgb in colors.items()}
        self.codes = np.array(sorted(codes), np.uint32)
        self.values = np.array([codes[c] for c in self.codes], np.int64)
        self.dtype = np.uint8 if self.values.max() < 256 else np.uint16

    def known(self, codes: np.ndarray) -> np.ndarray:
        """Which of `codes` (uint32) have an entry."""
        position = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        return self.codes[position] == codes

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Values of `codes`, all of which must be known (the scan makes sure of that)."""
        return self.values[np.searchsorted(self.codes, codes)]

    def decode(self, rgb: np.ndarray) -> np.ndarray:
        return self.lookup(pack_colors(rgb)).astype(self.dtype)


def describe_code(code: int) -> str:
    return f'({code >> 16}, {(code >> 8) & 255}, {code & 255})'


def id_table(
    ignore_index: int,
    label_map: dict = None,
    unlisted_ignored: bool = False,
    reduce_zero_label: bool = False,
    void_values=(),
) -> np.ndarray:
    """Train id (int64) of every raw value 0..LABEL_VALUES-1, in this order:

    1. `label_map` {raw: id}; values it does not list stay as they are, or become ignore when
       `unlisted_ignored` (Cityscapes labelIds, COCO-Stuff raw ids);
    2. `reduce_zero_label`: 0 -> ignore, k -> k - 1, the ignore value itself stays ignore (mmseg);
    3. raw values that mean "not labelled" in the file format (`void_values`) -> ignore.
    """
    table = np.arange(LABEL_VALUES, dtype=np.int64)
    if label_map:
        mapped = np.full(LABEL_VALUES, ignore_index, np.int64) if unlisted_ignored else table.copy()
        mapped[list(label_map)] = list(label_map.values())
        table = mapped
    if reduce_zero_label:
        table = np.where((table == 0) | (table == ignore_index), ignore_index, table - 1)
    table[list(void_values)] = ignore_index
    return table
