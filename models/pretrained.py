"""Offline weight loading: a local file or Hugging Face folder, converted by the model's own key map.

Nothing is ever fetched from a hub. A missing path fails at once; every key that is neither loaded
nor a dropped classifier key is reported, so a wrong checkpoint never loads silently.
"""
import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.pth', 'model.pt')


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def read_state_dict(path: str) -> dict:
    """Tensors of a .pth/.pt/.bin/.safetensors file or an HF folder, unwrapped from the usual wrappers."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: folder holds none of {', '.join(WEIGHT_FILES)}")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"pretrained weights '{path}' not found (a local file or folder is expected; "
                              "nothing is downloaded)")
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({error})") from error
    for wrapper in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    return {key.removeprefix('module.'): value for key, value in state.items()}


def hf_config(path: str) -> Optional[dict]:
    """The config.json of a Hugging Face folder, or None for a plain file."""
    config = Path(path).expanduser() / 'config.json'
    return json.loads(config.read_text()) if config.is_file() else None


def load_into(module: nn.Module, state: dict, source: str, strict: bool = False,
              skip_mismatched: bool = False) -> list:
    """Load what fits and refuse shape mismatches (or, with `skip_mismatched`, as when fine-tuning on
    other classes, leave those keys as initialised). Returns one line per kind of key problem (skipped,
    missing from the checkpoint, unexpected in it); with `strict` (our own checkpoints) they are an error."""
    own = module.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    if mismatched and not skip_mismatched:
        raise CheckpointError(f"{source}: shapes do not match the model (wrong variant?):\n  " + '\n  '.join(
            f'{k}: {tuple(state[k].shape)} in file, {tuple(own[k].shape)} in model' for k in mismatched[:10]))
    state = {k: v for k, v in state.items() if k not in mismatched}
    skipped = [f'{len(mismatched)} keys skipped, shapes differ from the model: ' + ', '.join(mismatched[:8])
               ] if mismatched else []
    problems = [(kind, keys) for kind, keys in (('missing from', sorted(own.keys() - state.keys())),
                                                ('unexpected in', sorted(state.keys() - own.keys()))) if keys]
    messages = skipped + [f"{len(keys)} keys {kind} the checkpoint: " + ', '.join(keys[:8])
                          + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '') for kind, keys in problems]
    if strict and messages:
        raise CheckpointError(f"{source} does not match the model (built from its config):\n  " + '\n  '.join(messages))
    module.load_state_dict(state, strict=False)
    return messages


def load_pretrained(module: nn.Module, path: str, convert: Callable[[dict], dict] = lambda sd: sd) -> None:
    """Read `path`, map its keys with `convert` (the model family's key map), load it into `module`.

    From a whole segmentation checkpoint (keys `backbone.*`, `decode_head.*`, ...) only the backbone
    part is taken.
    """
    state = read_state_dict(path)
    if any(key.startswith('backbone.') for key in state):
        state = {k.removeprefix('backbone.'): v for k, v in state.items() if k.startswith('backbone.')}
    for message in load_into(module, convert(state), source=str(path)):
        warnings.warn(f'{path}: {message}', stacklevel=2)
