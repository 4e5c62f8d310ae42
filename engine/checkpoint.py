"""Checkpoints are plain dicts ({'model', 'config', ...}) written atomically and read with weights_only."""
import os
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
