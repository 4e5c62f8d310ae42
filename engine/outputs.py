"""Writing result files so that a failure is an error naming the file, never a silent skip, and never
a half-written file: everything is written to a temporary file beside the target and renamed over it.

OpenCV's imwrite reports a failed write (read-only folder, full disk) only by returning False, and
writes through its own file handling; here images are encoded in memory and written by Python, so
the operating system's reason ("Permission denied", "No space left on device") reaches the user.
"""

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


class OutputError(OSError):
    """An output file that cannot, or must not, be written: the message names it and why."""


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~umask()
"""What a new file's mode would be under this process's umask (usually 0644)."""

FULL_DISK_BYTES = 1 << 20
"""Free space below which a failed write is put down to a full disk (torch.save reports it as a
RuntimeError of its zip writer, without the errno)."""


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file in `path`'s folder, flushed to disk, then renamed over
    `path`: a reader, or a run killed at any moment, sees the old file or the new one, never half of
    one. A failure removes the temporary file and raises OutputError naming `path` and the reason."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
        os.chmod(temporary, FILE_MODE)  # mkstemp's is 0600: the file gets the mode any other would
        with os.fdopen(handle, 'wb') as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        # the reason first: a full disk is seen by its free space, which removing the file restores
        reason = write_failure(error, path.parent) if isinstance(error, (OSError, RuntimeError)) else None
        if temporary:
            Path(temporary).unlink(missing_ok=True)
        if reason:
            raise OutputError(f"cannot write '{path}': {reason}") from None
        raise


def write_failure(error: Exception, folder: Path) -> str:
    full = getattr(error, 'errno', None) == errno.ENOSPC
    if not full and folder.is_dir():
        full = shutil.disk_usage(folder).free < FULL_DISK_BYTES
    if full:
        return 'no space left on device'
    return getattr(error, 'strerror', None) or str(error).strip().splitlines()[0]


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda file: file.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_results(folder: Path, texts: dict) -> None:
    """Result files {name: text} of a script that keeps them in an output folder of its own: each is
    claimed in the folder's list (`results.txt`) first, so an earlier run's results are replaced and a
    file someone else put there is not."""
    manifest = Manifest(folder, 'results.txt')
    for name in texts:
        manifest.claim(Path(folder) / name)
    for name, text in texts.items():
        write_text(Path(folder) / name, text)


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


class Manifest:
    """The files a command wrote in a folder, named in a list there before each is written: the files
    the command may write again (its own earlier output) or remove, never one someone else put there."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.path = Path(folder), Path(folder) / name
        self.names = set(self.path.read_text().split('\n')) - {''} if self.path.is_file() else set()

    def files(self) -> list:
        """The recorded files that are still there."""
        return sorted(self.folder / name for name in self.names if (self.folder / name).is_file())

    def claim(self, path: Path) -> None:
        """Record `path` (in the folder, or below it) as this command's, or refuse it: a file that is
        there and is not in the list is someone else's."""
        if str(Path(path).relative_to(self.folder)) not in self.names and Path(path).exists():
            raise OutputError(
                f"'{path}' is already there and was not written by this command; remove it or "
                'choose another output folder'
            )
        self.record(path)

    def record(self, path: Path) -> None:
        """Add `path` to the list unchecked (files the user says are this command's)."""
        name = str(Path(path).relative_to(self.folder))
        if name in self.names:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.path, 'a') as file:
                file.write(name + '\n')
        except OSError as error:
            raise OutputError(f"cannot write '{self.path}': {write_failure(error, self.folder)}") from None
        self.names.add(name)

    def forget(self) -> None:
        """Remove the recorded files and the list."""
        for path in self.files():
            path.unlink()
        self.path.unlink(missing_ok=True)
        self.names = set()
