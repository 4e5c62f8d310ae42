"""The one-time scan of a split: every pair read once, the result cached, later runs only stat the files.

For each pair the scan records the image size (from the file header, so images are not decoded),
the label size, and the raw values present in the label with their pixel counts (colours, packed
as 0xRRGGBB, for colour labels), or why a file could not be read. Whether a record is acceptable
(equal sizes, values that map into [0, num_classes) or to ignore) is decided from it on every start,
so changing num_classes, label_map or ignore_index needs no rescan. The cache is valid while every
file keeps its path, size and modification time.
"""

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from .labels import pack_colors, read_raw_label

FORMAT = 1  # bump when the record layout changes: old caches are then rescanned
EXIF_ORIENTATION = 0x0112


@dataclass
class Record:
    image_size: tuple = None  # (h, w) as OpenCV decodes it; None if the image is unreadable
    label_size: tuple = None
    values: np.ndarray = None  # raw label values (or colour codes) present, ascending
    counts: np.ndarray = None  # pixels of each
    error: str = None  # why the pair cannot be used, naming the file


TIFF_SUFFIXES = ('.tif', '.tiff')  # read with tifffile: any number of bands


def image_size(path: Path) -> tuple:
    """(h, w) read from the header. OpenCV applies EXIF rotation when decoding, so a rotated JPEG
    swaps its sides here too. A TIFF's through tifffile, which reads any number of bands."""
    if Path(path).suffix.lower() in TIFF_SUFFIXES:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            return page.imagelength, page.imagewidth
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (width, height) if rotated else (height, width)


def scan_pair(pair: tuple, colors: bool) -> Record:
    image_path, label_path = pair
    try:
        size = image_size(image_path)
    except (OSError, ValueError, SyntaxError, tifffile.TiffFileError):
        return Record(error=f"cannot read image '{image_path}' (missing, corrupt or not an image)")
    label = read_raw_label(label_path, colors)
    if label is None:
        return Record(size, error=f"cannot read label '{label_path}' (missing, corrupt or not an image)")
    if not colors and label.ndim != 2:
        return Record(
            size,
            error=f"label '{label_path}' has {label.shape[2]} channels; expected single-channel "
            'class ids (palette PNGs are read as their indices; for RGB colour labels set '
            'data.label_colors)',
        )
    if label.dtype not in (np.uint8, np.uint16):
        return Record(
            size, error=f"label '{label_path}' holds {label.dtype} values; expected 8- or 16-bit integer class ids"
        )
    if colors:
        values, counts = np.unique(pack_colors(label), return_counts=True)
    else:
        counts = np.bincount(label.ravel())
        values = np.flatnonzero(counts)
        counts = counts[values]
    return Record(size, label.shape[:2], values, counts)


def fingerprint(pairs: list, colors: bool) -> str:
    files = [(str(path), *stat_of(path)) for pair in pairs for path in pair]
    return hashlib.sha1(json.dumps([FORMAT, colors, files]).encode()).hexdigest()


def stat_of(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def scan(pairs: list, colors: bool, cache_file: Path = None, desc: str = 'scan') -> list:
    """A Record per (image, label) pair, from `cache_file` when it matches the files, else read anew
    (in threads: OpenCV decodes without the GIL) and written there. A progress bar appears when the
    scan takes more than a couple of seconds."""
    key = fingerprint(pairs, colors)
    cached = read_cache(cache_file, key)
    if cached is not None and len(cached) == len(pairs):
        return cached
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        records = list(
            tqdm(
                pool.map(lambda pair: scan_pair(pair, colors), pairs),
                total=len(pairs),
                desc=desc,
                unit='pair',
                delay=2,
                leave=False,
                disable=None,
            )
        )
    if cache_file is not None:
        write_cache(cache_file, key, records)
    return records


def read_cache(cache_file: Path, key: str):
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        content = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if content.get('fingerprint') != key:
        return None
    return [
        Record(
            tuple(image) if image else None,
            tuple(label) if label else None,
            np.array(values, np.int64),
            np.array(counts, np.int64),
            error,
        )
        for image, label, values, counts, error in content['records']
    ]


def write_cache(cache_file: Path, key: str, records: list) -> None:
    """Written to a temporary file and renamed into place, so a reader never sees half a cache."""
    rows = [
        [
            r.image_size,
            r.label_size,
            [] if r.values is None else r.values.tolist(),
            [] if r.counts is None else r.counts.tolist(),
            r.error,
        ]
        for r in records
    ]
    partial = cache_file.with_name(f'{cache_file.name}.{os.getpid()}.tmp')
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({'fingerprint': key, 'records': rows}, separators=(',', ':')))
        os.replace(partial, cache_file)
    except OSError as error:
        warnings.warn(f"could not write the scan cache '{cache_file}' ({error}); the next run scans again")
