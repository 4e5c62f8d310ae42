"""Checkpoints are plain dicts ({'model', 'config', ...}) written atomically and read with weights_only.

A training run keeps `iter_NNNNNN.pth` files (the last few), `last.pth` (a hard link to the newest,
so it costs no disk) and `best.pth`.
"""

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from models.weights import CheckpointError

log = logging.getLogger(__name__)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`:
    a run killed at any moment leaves either the old checkpoint or the new one, never half of one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
    except OSError as error:
        raise CheckpointError(f'cannot write {path}: {error.strerror or error}') from error
    try:
        with os.fdopen(handle, 'wb') as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = 'no space left on device' if error.errno == errno.ENOSPC else error.strerror or str(error)
            raise CheckpointError(
                f'cannot write {path}: {reason} (the checkpoints written before are intact)'
            ) from error
        raise


def save_iteration_checkpoint(state: dict, work_dir: Path, keep: int = 3) -> Path:
    """`iter_NNNNNN.pth`, then `last.pth` pointed at it, then all but the newest `keep` iteration files
    deleted (0: keep all). Each step leaves a complete checkpoint behind if the run dies right after it."""
    path = work_dir / f'iter_{state["iteration"]:06d}.pth'
    save_checkpoint(state, path)
    replace_with_link(path, work_dir / 'last.pth')
    if keep > 0:
        for old in iteration_checkpoints(work_dir)[:-keep]:
            old.unlink()
    return path


def iteration_of(path: Path) -> int:
    return int(path.stem.removeprefix('iter_'))


def iteration_checkpoints(work_dir: Path) -> list:
    """The run's `iter_NNNNNN.pth` files, oldest first."""
    return sorted(Path(work_dir).glob('iter_*.pth'), key=iteration_of)


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


RUN_FILES = ('last.pth', 'best.pth', 'best_ema.pth', 'iter_*.pth')


def run_checkpoints(work_dir: Path) -> list:
    """The checkpoint files a training run leaves in `work_dir`."""
    return sorted(path for pattern in RUN_FILES for path in Path(work_dir).glob(pattern))


def claim_work_dir(work_dir: Path, resuming: bool, overwrite: bool):
    """Take `work_dir` for this run: refuse it while another run holds it (a lock the kernel releases when
    that process ends, however it ends), and refuse to start afresh over another run's checkpoints
    unless `overwrite`, which then removes them. Returns the open lock file, held for the run's life."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = open(work_dir / '.lock', 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise CheckpointError(
            f'{work_dir} is in use by another training run; wait for it or pick another --work-dir'
        ) from None
    existing = run_checkpoints(work_dir)
    if existing and not resuming:
        if not overwrite:
            lock.close()
            raise CheckpointError(
                f"{work_dir} already holds a run's checkpoints ({', '.join(p.name for p in existing[:4])}"
                f'{" ..." if len(existing) > 4 else ""}): continue it with --resume auto, or start '
                'afresh with --overwrite (which deletes them)'
            )
        for path in existing:
            path.unlink()
        log.warning(f'--overwrite: removed {len(existing)} checkpoints of an earlier run in {work_dir}')
    return lock


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
        reason = str(error).split('. ')[0]  # torch's refusals of pickled code run on for a paragraph
        raise CheckpointError(f'{path}: cannot be read as a checkpoint ({reason})') from error
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise CheckpointError(
            f"{path}: expected a dict with 'model' (a checkpoint written by train.py or tools/convert_checkpoint.py)"
        )
    return checkpoint


def resume_checkpoint(resume, work_dir: Path) -> tuple:
    """(path, checkpoint) to continue a run from, or (None, None) to start afresh.

    `resume` is a training checkpoint file, a run folder, or 'auto' (this run's work_dir, where having
    nothing yet means a fresh start). From a folder the newest intact checkpoint is taken: `last.pth`,
    else the newest `iter_*.pth`, each damaged one skipped with a warning.
    """
    if resume is None:
        return None, None
    folder = Path(work_dir) if resume == 'auto' else Path(resume)
    if resume != 'auto' and not folder.is_dir():
        return folder, training_checkpoint(folder)
    candidates = [folder / 'last.pth', *reversed(iteration_checkpoints(folder))]
    for path in (p for p in candidates if p.is_file()):
        try:
            return path, training_checkpoint(path)
        except CheckpointError as error:
            log.warning(f'{error}; trying an older checkpoint')
    if resume == 'auto':
        return None, None
    raise CheckpointError(f'--resume {folder}: the folder holds no intact training checkpoint (last.pth or iter_*.pth)')


def training_checkpoint(path: Path) -> dict:
    """A checkpoint with the whole training state (train.py's last.pth / iter_*.pth), not weights only."""
    checkpoint = load_checkpoint(path)
    if not {'optimizer', 'scheduler', 'iteration', 'rng'} <= checkpoint.keys():
        raise CheckpointError(
            f"{path} holds model weights only, not a training state to resume (use a run's "
            f'last.pth or iter_*.pth); to start a new run from these weights: --load-from {path}'
        )
    return checkpoint
