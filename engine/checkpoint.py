"""Checkpoints are plain dicts ({'model', 'config', ...}) written atomically and read with weights_only.

A training run keeps `iter_NNNNNN.pth` files (the last few), `last.pth` (a hard link to the newest,
so it costs no disk) and `best.pth`. It names every checkpoint file in `run_files.txt` before it
writes it: the files `--overwrite` may remove are those, never a user's file that matches a pattern.
"""

import fcntl
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from models.weights import CheckpointError

from .outputs import Manifest, OutputError, atomic_write

log = logging.getLogger(__name__)


MANIFEST = 'run_files.txt'
"""The checkpoint files a training run wrote in its work dir, one name a line."""
ITERATION_FILE = re.compile(r'iter_(\d{6,})\.pth')


def run_manifest(work_dir: Path) -> Manifest:
    return Manifest(work_dir, MANIFEST)


def save_run_checkpoint(state: dict, path: Path) -> None:
    """A training run's checkpoint: named in the run's manifest, then written atomically."""
    run_manifest(path.parent).claim(path)
    save_checkpoint(state, path)


def save_checkpoint(state: dict, path: Path) -> None:
    """Written atomically (engine/outputs.py): a run killed at any moment leaves either the old
    checkpoint or the new one, never half of one."""
    try:
        atomic_write(path, lambda file: torch.save(state, file))
    except OutputError as error:
        raise CheckpointError(f'{error} (the checkpoints written before are intact)') from None


def save_iteration_checkpoint(state: dict, work_dir: Path, keep: int = 3) -> Path:
    """`iter_NNNNNN.pth`, then `last.pth` pointed at it, then all but the newest `keep` iteration files
    deleted (0: keep all). Each step leaves a complete checkpoint behind if the run dies right after it."""
    path = work_dir / f'iter_{state["iteration"]:06d}.pth'
    save_run_checkpoint(state, path)
    run_manifest(work_dir).claim(work_dir / 'last.pth')
    replace_with_link(path, work_dir / 'last.pth')
    if keep > 0:
        for old in iteration_checkpoints(work_dir)[:-keep]:
            old.unlink()
    return path


def iteration_checkpoints(work_dir: Path) -> list:
    """The run's `iter_NNNNNN.pth` files, oldest first (a user's `iter_backup.pth` is none of them)."""
    numbered = {}
    for path in Path(work_dir).glob('iter_*.pth'):
        if match := ITERATION_FILE.fullmatch(path.name):
            numbered[int(match.group(1))] = path
    return [numbered[i] for i in sorted(numbered)]


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


def is_checkpoint_name(name: str) -> bool:
    """A name train.py gives checkpoints: in a work dir, a file of such a name that no manifest names
    is another run's (never removed; a fresh run there is refused, a resumed one adopts it)."""
    return name in ('last.pth', 'best.pth', 'best_ema.pth') or bool(ITERATION_FILE.fullmatch(name))


def run_checkpoints(work_dir: Path) -> list:
    """The files a training run left in `work_dir` (named in its manifest, still there): its checkpoints
    and its metrics.jsonl."""
    return run_manifest(work_dir).files()


def unrecorded_checkpoints(work_dir: Path) -> list:
    """Files named like a run's checkpoints that no manifest names (an older run's, or a user's)."""
    recorded = run_manifest(work_dir).names
    return sorted(p for p in Path(work_dir).glob('*.pth') if is_checkpoint_name(p.name) and p.name not in recorded)


def claim_work_dir(work_dir: Path, resuming: bool, overwrite: bool):
    """Take `work_dir` for this run: refuse it while another run holds it (a lock the kernel releases when
    that process ends, however it ends), and refuse to start afresh over another run's checkpoints
    unless `overwrite`, which then removes those its manifest names (and refuses checkpoint files no
    manifest names). Returns the open lock file, held for the run's life."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        lock = open(work_dir / '.lock', 'a+')
    except OSError as error:
        raise CheckpointError(f'cannot use {work_dir} as the work dir: {error.strerror or error}') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise CheckpointError(
            f'{work_dir} is in use by another training run; wait for it or pick another --work-dir'
        ) from None
    existing, foreign = run_checkpoints(work_dir), unrecorded_checkpoints(work_dir)
    if resuming:  # the user says this is the run's folder: its checkpoints are the run's
        manifest = run_manifest(work_dir)
        for path in foreign:
            manifest.record(path)
        return lock
    if not (existing or foreign):
        return lock
    if not overwrite or foreign:
        lock.close()
        if not overwrite:
            raise CheckpointError(
                f"{work_dir} already holds a run's checkpoints ({names(existing + foreign)}): continue it with "
                '--resume auto, or start afresh with --overwrite (which deletes the checkpoints that run wrote)'
            )
        raise CheckpointError(
            f'{work_dir} holds checkpoint files that no run recorded in {MANIFEST} ({names(foreign)}): '
            '--overwrite removes only files a run wrote; move them away or choose another --work-dir'
        )
    run_manifest(work_dir).forget()
    log.warning(f'--overwrite: removed {len(existing)} checkpoints of an earlier run in {work_dir}')
    return lock


def names(paths: list, shown: int = 4) -> str:
    return ', '.join(p.name for p in paths[:shown]) + (' ...' if len(paths) > shown else '')


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

    `resume` is a training checkpoint file, a run folder, or 'auto' (this run's work_dir, where having no
    checkpoint yet means a fresh start). From a folder the newest intact checkpoint is taken: `last.pth`,
    else the newest `iter_*.pth`, each damaged one skipped with a warning.
    """
    if resume is None:
        return None, None
    folder = Path(work_dir) if resume == 'auto' else Path(resume)
    if resume != 'auto' and not folder.is_dir():
        return folder, training_checkpoint(folder)
    candidates = [p for p in (folder / 'last.pth', *reversed(iteration_checkpoints(folder))) if p.is_file()]
    problems = []
    for path in candidates:
        try:
            return path, training_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            log.warning(f'{error}; trying an older checkpoint')
    # a run killed before its first checkpoint left only its metrics: under 'auto' it starts again
    found = [p for p in run_checkpoints(folder) if is_checkpoint_name(p.name)] + unrecorded_checkpoints(folder)
    if resume == 'auto' and not found:
        return None, None
    raise CheckpointError(
        f'--resume {resume}: {folder} holds no intact training checkpoint (last.pth or iter_*.pth)'
        + (f'; found {names(found)}' if found else '')
        + (f' ({"; ".join(problems)})' if problems else '')
        + '; nothing was changed'
    )


def training_checkpoint(path: Path) -> dict:
    """A checkpoint with the whole training state (train.py's last.pth / iter_*.pth), not weights only."""
    checkpoint = load_checkpoint(path)
    if not {'optimizer', 'scheduler', 'iteration', 'rng'} <= checkpoint.keys():
        raise CheckpointError(
            f"{path} holds model weights only, not a training state to resume (use a run's "
            f'last.pth or iter_*.pth); to start a new run from these weights: --load-from {path}'
        )
    return checkpoint
