"""Checkpoints are plain dicts ({'model', 'config', ...}) written atomically and read with weights_only.

A training run keeps `iter_NNNNNN.pth` files (the last few), `last.pth` (a hard link to the newest,
so it costs no disk) and `best.pth`.
"""
import os
import shutil
import tempfile
from pathlib import Path

import torch

from models.pretrained import CheckpointError


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`:
    a run killed at any moment leaves either the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
    try:
        with os.fdopen(handle, 'wb') as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_iteration_checkpoint(state: dict, work_dir: Path, keep: int = 3) -> Path:
    """`iter_NNNNNN.pth`, then `last.pth` pointed at it, then all but the newest `keep` iteration files
    deleted (0: keep all). Each step leaves a complete checkpoint behind if the run dies right after it."""
    path = work_dir / f"iter_{state['iteration']:06d}.pth"
    save_checkpoint(state, path)
    replace_with_link(path, work_dir / 'last.pth')
    if keep > 0:
        for old in sorted(work_dir.glob('iter_*.pth'), key=iteration_of)[:-keep]:
            old.unlink()
    return path


def iteration_of(path: Path) -> int:
    return int(path.stem.removeprefix('iter_'))


def replace_with_link(source: Path, target: Path) -> None:
    """Atomically make `target` the same file as `source`: a hard link where the filesystem has them,
    else a copy, created under a temporary name and renamed over `target`."""
    temporary = target.with_name(f'.{target.name}.link')
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def remove_partial_writes(work_dir: Path) -> None:
    """Temporary files of writes that a killed run never finished (the complete checkpoints are intact)."""
    for partial in work_dir.glob('.*.pth.*'):
        partial.unlink(missing_ok=True)


def load_checkpoint(path) -> dict:
    """A checkpoint written by train.py (or tools/convert_checkpoint.py), with a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or not {'model', 'config'} <= checkpoint.keys():
        raise CheckpointError(f"{path}: expected a dict with 'model' and 'config' (a checkpoint written by "
                              "train.py or tools/convert_checkpoint.py)")
    return checkpoint
