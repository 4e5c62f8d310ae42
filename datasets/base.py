"""The dataset every benchmark builds on: the image/label pairs of one split, found by a declared
layout, checked once, mapped to train ids by a lookup table and run through the pipeline.

A subclass declares its dataset's layout and conventions as class attributes (folders, suffixes,
split list files, class names, palette, label mapping); `FolderDataset` takes them from YAML. The
default layout is mmseg's: `root/images/<split>/x.jpg` + `root/annotations/<split>/x.png`, paired by
name (extensions may differ). Samples come out as a uint8 (3, H, W) RGB image and an int64 (H, W)
label of train ids; normalisation happens on the device.
"""

import hashlib
import json
import os
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch
from torch.utils.data import Dataset

from .labels import LABEL_VALUES, ColorTable, describe_code, id_table, read_raw_label
from .scan import TIFF_SUFFIXES, scan
from .transforms import IMAGENET_MEAN, Pipeline

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
MAX_LISTED = 10  # problems spelled out in an error or a warning; the rest are counted


class DatasetError(ValueError):
    """Data on disk that does not match what the config describes: names the files and the problem."""


class DatasetWarning(UserWarning):
    """Pairs left out under `data.on_invalid: skip`; the message names them."""


def read_image(path: Path) -> np.ndarray:
    """RGB pixels as stored: an EXIF orientation tag is not applied, as it is not to the label, so image
    and label keep one size."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DatasetError(f"cannot read image '{path}' (missing, corrupt or not an image)")
    return image


def read_input(path: Path, channels: int = 3) -> np.ndarray:
    """An image as the model takes it: RGB (`read_image`), or `channels` bands (`read_bands`)."""
    return read_image(path) if channels == 3 else read_bands(path, channels)


def read_bands(path: Path, channels: int) -> np.ndarray:
    """(H, W, channels) pixels of an image of `data.in_channels` bands, in the file's band order and at
    its depth (8 or 16 bit): a TIFF (any number of bands, interleaved or planar) through tifffile, any
    other file through OpenCV (grey, grey + alpha, RGB, RGBA; 16-bit PNGs)."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                image, axes = series.asarray(), series.axes
            if image.ndim == 3:  # the samples axis last, however the file stores them
                image = np.moveaxis(image, axes.index('S') if 'S' in axes else 0, -1)
        else:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
            if image is not None and image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    except (OSError, ValueError, tifffile.TiffFileError):
        image = None
    if image is None:
        raise DatasetError(f"cannot read image '{path}' (missing, corrupt or not an image)")
    image = image[..., None] if image.ndim == 2 else image
    if image.shape[2] != channels:
        raise DatasetError(f"image '{path}' has {image.shape[2]} bands; data.in_channels is {channels}")
    if image.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"image '{path}' holds {image.dtype} values; expected 8- or 16-bit bands")
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class Source:
    """Where pairs of a split come from: folders relative to the root and, optionally, a text file
    (relative to the root) listing the names to use, one a line."""

    image_dir: str
    label_dir: str
    split_file: str = None


class SegmentationDataset(Dataset):
    """Image/label pairs of one split, run through a pipeline of steps from the config.

    `on_invalid`: 'error' stops at the first scan with every unusable pair named (a file without its
    partner, an unreadable file, a size mismatch, label values outside [0, num_classes) and not the
    ignore index); 'skip' leaves those pairs out with a DatasetWarning naming them. `cache_dir`: where
    the scan's result is kept (None: scan on every start).
    """

    CLASS_NAMES = None  # one name per class; None: '0', '1', ... unless data.class_names
    PALETTE = None  # RGB per class; None: generated
    IMAGE_DIR, LABEL_DIR = 'images/{split}', 'annotations/{split}'
    IMAGE_SUFFIX = None  # None: any image extension, which may differ from the label's
    LABEL_SUFFIX = '.png'
    SPLIT_FILE = None  # e.g. 'ImageSets/Segmentation/{split}.txt'
    SPLIT_DIRS = {}  # config split name -> its name on disk, e.g. {'train': 'training'}
    OTHER_LABEL_SUFFIXES = ()  # files in the label folder that are not these labels (converted copies)
    LABEL_MAP = None  # {raw value: train id}
    UNLISTED_IGNORED = False  # raw values LABEL_MAP does not list become ignore (else they stay)
    REDUCE_ZERO_LABEL = False  # the dataset's own convention, applied whatever data.reduce_zero_label says
    VOID_VALUES = ()  # raw values that mean "unlabelled" in this format: become the ignore index
    LABEL_COLORS = None  # {value: [r, g, b]} for colour-image labels

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        pipeline: list = (),
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        class_names: list = None,
        palette: list = None,
        seed: int = 0,
        mean: list = IMAGENET_MEAN,
        in_channels: int = 3,
        on_invalid: str = 'error',
        cache_dir: str | None = None,
    ):
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.ignore_index, self.seed, self.on_invalid = ignore_index, seed, on_invalid
        self.in_channels = in_channels
        self.reduce_zero_label = reduce_zero_label or self.REDUCE_ZERO_LABEL
        self.class_names = resolve_class_names(type(self), num_classes, class_names)
        self.check_arguments(class_names, palette)
        self.palette = resolve_palette(type(self), num_classes, palette)
        self.pipeline = Pipeline(list(pipeline), ignore_index, mean)
        self.colors = ColorTable(self.LABEL_COLORS) if self.LABEL_COLORS else None
        self.ids = id_table(
            ignore_index, self.LABEL_MAP, self.UNLISTED_IGNORED, self.reduce_zero_label, self.VOID_VALUES
        )
        self.table = self.ids.astype(np.uint8 if max(num_classes - 1, ignore_index) < 256 else np.uint16)
        self.sources = self.layout(self.SPLIT_DIRS.get(split, split))
        pairs, problems, unpaired = self.find_pairs()
        records = scan(pairs, self.colors is not None, self.cache_file(cache_dir), f'scan {self.root.name}/{split}')
        self.samples, self.class_pixels, self.ignored_pixels = [], np.zeros(num_classes, np.int64), 0
        self.class_images = np.zeros(num_classes, np.int64)  # images each class appears in
        self.class_image_pixels = np.zeros(num_classes, np.int64)  # all pixels of those images
        for pair, record in zip(pairs, records):
            problem = record.error or self.check_record(pair, record)
            if problem:
                problems.append(problem)
            else:
                self.samples.append(pair)
        self.report(problems, len(pairs) + unpaired)

    @property
    def where(self) -> str:
        return f"'{self.root}' ({self.split})"

    def check_arguments(self, class_names, palette) -> None:
        """The settings that do not depend on the files: one message per mistake, naming the key."""
        name, n = type(self).__name__, self.num_classes
        if self.on_invalid not in ('error', 'skip'):
            raise DatasetError(f"data.on_invalid must be 'error' or 'skip', got {self.on_invalid!r}")
        if not 0 <= self.ignore_index < LABEL_VALUES:
            raise DatasetError(f'data.ignore_index must be in [0, {LABEL_VALUES}), got {self.ignore_index}')
        if self.ignore_index < n:
            raise DatasetError(
                f'data.ignore_index {self.ignore_index} is also a class id (data.num_classes is '
                f'{n}); use a value >= num_classes, e.g. 255'
            )
        if self.CLASS_NAMES and not class_names and len(self.CLASS_NAMES) != n:
            raise DatasetError(
                f'data.num_classes is {n} but {name} has {len(self.CLASS_NAMES)} classes; the '
                f"model's classifier is sized by data.num_classes, so set it to "
                f'{len(self.CLASS_NAMES)}'
            )
        if len(self.class_names) != n:
            raise DatasetError(f'data.class_names has {len(self.class_names)} names for data.num_classes {n}')
        if palette and (len(palette) < n or not all(is_color(c) for c in palette)):
            raise DatasetError(f'data.palette must give an [r, g, b] colour (0-255) for each of the {n} classes')

    def layout(self, split: str) -> list:
        """The Sources of `split` (its name on disk); VOC's train_aug overrides this to combine two.
        A split that is a list file names its pairs across the split folders (`is_list_file`)."""
        if is_list_file(split):
            image_dir, label_dir = self.IMAGE_DIR.format(split=''), self.LABEL_DIR.format(split='')
            return [Source(image_dir.rstrip('/') or '.', label_dir.rstrip('/') or '.', str(Path(split).resolve()))]
        return [
            Source(
                self.IMAGE_DIR.format(split=split),
                self.LABEL_DIR.format(split=split),
                self.SPLIT_FILE and self.SPLIT_FILE.format(split=split),
            )
        ]

    def find_pairs(self) -> tuple:
        """(pairs, problems, unpaired): pairs sorted by name within each source; a name found in an
        earlier source is not taken again (VOC: the fine label wins over the SBD one)."""
        pairs, problems, unpaired, taken = [], [], 0, set()
        for source in self.sources:
            found, source_problems, source_unpaired = self.pair(source)
            pairs += [pair for key, pair in found if key not in taken]
            taken.update(key for key, _ in found)
            problems += source_problems
            unpaired += source_unpaired
        return pairs, problems, unpaired

    def pair(self, source: Source) -> tuple:
        image_dir, label_dir = self.root / source.image_dir, self.root / source.label_dir
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetError(f"data folder '{folder}' not found (data.root is '{self.root}')")
        image_suffixes = (self.IMAGE_SUFFIX,) if self.IMAGE_SUFFIX else IMAGE_SUFFIXES
        images, doubles = list_files(image_dir, image_suffixes, (self.LABEL_SUFFIX,) if image_dir == label_dir else ())
        labels, _ = list_files(label_dir, (self.LABEL_SUFFIX,), self.OTHER_LABEL_SUFFIXES)
        if not images:
            raise DatasetError(f"no images ({' or '.join(image_suffixes)}) in '{image_dir}'")
        problems = [
            f"'{image_dir}' has several images named {key}.*: pairing by name is ambiguous"
            for key in sorted(set(doubles))
        ]
        if source.split_file:
            names = read_split_file(self.root / source.split_file)
            missing = [name for name in names if name not in images or name not in labels]
            if missing:
                problems.append(
                    f"'{self.root / source.split_file}' lists {len(names)} names; {len(missing)} without "
                    f"an image in '{image_dir}' or a label in '{label_dir}', e.g. "
                    f'{examples(missing, images)}'
                )
            keys = [name for name in names if name in images and name in labels]
            unpaired = len(missing)
        else:
            unmatched = sorted(images.keys() ^ labels.keys())
            if unmatched:
                problems.append(
                    f"'{image_dir}' has {len(images)} images and '{label_dir}' {len(labels)} labels; "
                    f'{len(unmatched)} without a partner, e.g. {examples(unmatched, images)}'
                )
            keys = sorted(images.keys() & labels.keys())
            unpaired = len(unmatched)
        keys = [key for key in keys if key not in doubles]
        return [(key, (images[key], labels[key])) for key in keys], problems, unpaired + len(set(doubles))

    def cache_file(self, cache_dir):
        """One file per (root, split, layout); the scan checks inside it that the files are unchanged."""
        if not cache_dir:
            return None
        layout = json.dumps(
            [
                str(self.root.resolve()),
                [astuple(s) for s in self.sources],
                self.IMAGE_SUFFIX,
                self.LABEL_SUFFIX,
                self.OTHER_LABEL_SUFFIXES,
            ]
        )
        return Path(cache_dir) / f'{split_name(self.split)}-{hashlib.sha1(layout.encode()).hexdigest()[:12]}.json'

    def check_record(self, pair: tuple, record) -> str:
        """Why a scanned pair cannot be used, or None; counts the class pixels and images of usable ones."""
        (image_path, label_path), values, counts = pair, record.values, record.counts
        if record.image_size != record.label_size:
            (ih, iw), (lh, lw) = record.image_size, record.label_size
            return f"size mismatch: image '{image_path}' is {iw}x{ih}, label '{label_path}' is {lw}x{lh}"
        if self.colors is not None:
            unknown = values[~self.colors.known(values)]
            if len(unknown):
                return (
                    f"label '{label_path}' has colours {', '.join(describe_code(c) for c in unknown[:10])} "
                    f'that data.label_colors does not list'
                )
            values = self.colors.lookup(values)
        ids = self.ids[values]
        bad = (ids >= self.num_classes) & (ids != self.ignore_index)
        if bad.any():
            mapped = '' if np.array_equal(ids, values) else f' (train ids {ids[bad][:10].tolist()} after mapping)'
            return (
                f"label '{label_path}' has values {values[bad][:10].tolist()}{mapped} outside "
                f'[0, {self.num_classes}) and not the ignore index {self.ignore_index}'
            )
        known = ids < self.num_classes
        np.add.at(self.class_pixels, ids[known], counts[known])
        self.ignored_pixels += int(counts[~known].sum())
        present = np.unique(ids[known])
        self.class_images[present] += 1
        self.class_image_pixels[present] += int(counts.sum())
        return None

    def report(self, problems: list, total: int) -> None:
        """Stop with every problem named, or (on_invalid: skip) warn and go on without those pairs."""
        if problems:
            listed = problems[:MAX_LISTED] + (
                [f'... and {len(problems) - MAX_LISTED} more'] if len(problems) > MAX_LISTED else []
            )
            detail = listed[0] if len(problems) == 1 else '\n  ' + '\n  '.join(listed)
            if self.on_invalid == 'error':
                raise DatasetError(
                    f'{self.where}: {detail}\n(fix the files, or set data.on_invalid: skip to '
                    f'leave such pairs out with a warning)'
                )
            warnings.warn(
                f'{self.where}: left out {total - len(self.samples)} of {total} pairs '
                f'(data.on_invalid: skip): {detail}',
                DatasetWarning,
                stacklevel=3,
            )
        if not self.samples:
            raise DatasetError(f'{self.where}: no usable image/label pairs')

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple:
        """The raw pair, its label mapped to train ids by one table lookup."""
        image_path, label_path = self.samples[index]
        image = read_input(image_path, self.in_channels)
        label = read_raw_label(label_path, self.colors is not None)
        if label is None:
            raise DatasetError(f"cannot read label '{label_path}' (missing, corrupt or not an image)")
        if self.colors is not None:
            label = self.colors.decode(label)
        if image.shape[:2] != label.shape[:2]:
            raise DatasetError(
                f"size mismatch: image '{image_path}' is {image.shape[1]}x{image.shape[0]}, "
                f"label '{label_path}' is {label.shape[1]}x{label.shape[0]}"
            )
        return image, self.train_ids(label)

    def train_ids(self, label: np.ndarray) -> np.ndarray:
        """One table lookup: OpenCV's LUT for 8-bit labels and ids (the usual case; faster than np.take)."""
        if label.dtype == np.uint8 and self.table.dtype == np.uint8:
            return cv2.LUT(label, self.table[:256])
        return np.take(self.table, label)

    def __getitem__(self, item):
        """`item` is an index, or (index, draw) from the training sampler: augmentation randomness comes
        from (seed, draw) alone, so it does not depend on workers or ranks and replays exactly on resume."""
        index, draw = item if isinstance(item, tuple) else (item, item)
        image, label = self.pipeline(*self.load(index), np.random.default_rng([self.seed, draw]))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return image, torch.from_numpy(label.astype(np.int64))


def list_files(folder: Path, suffixes, exclude=()) -> tuple:
    """({key: path}, keys seen twice) for the files under `folder` (recursively, hidden ones skipped)
    ending in one of `suffixes` but none of `exclude`; the key is the path relative to `folder`
    without the suffix, so 'aachen/aachen_000000_000019' pairs across folders and extensions."""
    files, doubles = {}, []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith('.'))
        relative = os.path.relpath(directory, folder)
        for name in names:
            lower = name.lower()
            suffix = next((s for s in suffixes if lower.endswith(s.lower())), None)
            if suffix is None or name.startswith('.') or any(lower.endswith(e.lower()) for e in exclude):
                continue
            key = os.path.normpath(os.path.join(relative, name[: -len(suffix)]))
            if key in files:
                doubles.append(key)
            files[key] = Path(directory) / name
    return files, doubles


def is_list_file(split: str) -> bool:
    """A split given as a `.txt` file (relative to where the command runs, as data.root is) listing
    names relative to the image folder without its split part, one a line: `train/0001TP_006690` is
    CamVid's images/train/0001TP_006690.jpg. Folds that mix the dataset's own splits are such files."""
    return split.endswith('.txt')


def split_name(split: str) -> str:
    """The split's name in file names: a list file's stem."""
    return Path(split).stem if is_list_file(split) else split


def read_split_file(path: Path) -> list:
    if not path.is_file():
        raise DatasetError(f"split list '{path}' not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"split list '{path}' is empty; expected one name a line")
    return names


def examples(keys: list, images: dict) -> str:
    return ', '.join(f'{key} (no {"label" if key in images else "image"})' for key in keys[:5])


def is_color(value) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 256 for c in value)
    )


def resolve_class_names(dataset_class, num_classes: int, class_names: list = None) -> list:
    """The names a dataset's classes go by: the configured ones, else the dataset's own, else '0', '1', ..."""
    return list(class_names or dataset_class.CLASS_NAMES or [str(i) for i in range(num_classes)])


def resolve_palette(dataset_class, num_classes: int, palette: list = None) -> np.ndarray:
    """The colours a dataset draws its classes in: the configured ones, else the dataset's own, else generated."""
    return np.array(palette or dataset_class.PALETTE or default_palette(num_classes), dtype=np.uint8)


def default_palette(num_classes: int) -> list:
    """Colours for datasets without a conventional palette: hues a golden angle apart (neighbouring ids
    far apart on the colour wheel, however many classes), saturated and bright enough to read on a
    photo, with saturation and brightness cycling through a few levels so that hues that come round
    again still differ."""
    ids = np.arange(num_classes)
    hsv = np.stack([ids * 360 * 0.381966 % 360, 1 - ids % 3 * 0.2, 1 - ids % 2 * 0.25], axis=-1)
    rgb = cv2.cvtColor(hsv[None].astype(np.float32), cv2.COLOR_HSV2RGB)[0]
    return np.rint(rgb * 255).astype(int).tolist()
