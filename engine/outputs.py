"""Writing result files so that a failure is an error naming the file, never a silent skip.

OpenCV's imwrite reports a failed write (read-only folder, full disk) only by returning False, and
writes through its own file handling; here images are encoded in memory and written by Python, so
the operating system's reason ("Permission denied", "No space left on device") reaches the user.
"""

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


class OutputError(OSError):
    """An output file that cannot, or must not, be written: the message names it and why."""


def write_bytes(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as error:
        raise OutputError(f"cannot write '{path}': {error.strerror or error}") from None


def write_image(path: Path, image: np.ndarray, jpeg_quality: int = 95) -> None:
    """An RGB (H, W, 3) or single-channel (H, W) uint8/uint16 array, in the format of the file's suffix."""
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix.lower() in ('.jpg', '.jpeg') else []
    ok, encoded = cv2.imencode(path.suffix, pixels, params)
    if not ok:
        raise OutputError(f"cannot encode '{path}' as {path.suffix}")
    write_bytes(path, encoded.tobytes())


def write_class_ids(path: Path, ids: np.ndarray, palette: np.ndarray) -> None:
    """Class ids (H, W) as a PNG that viewers show in the class colours and that reads back as the ids
    (`np.asarray(PIL.Image.open(path))`): a palette-mode PNG. Palettes hold 256 colours, so with more
    classes it is a 16-bit grey PNG of the ids instead."""
    if len(palette) > 256:
        write_image(path, ids.astype(np.uint16))
        return
    image = Image.fromarray(ids.astype(np.uint8))
    image.putpalette(palette.astype(np.uint8).flatten().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    write_bytes(path, buffer.getvalue())
