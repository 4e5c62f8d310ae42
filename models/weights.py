"""Every weight that enters a model comes through here: read, routed to its part, mapped, loaded, reported.

Files: a `.pth`/`.pt`/`.bin`/`.safetensors` file or a Hugging Face folder, read locally with
`weights_only` (nothing is ever fetched from a hub), unwrapped from `state_dict` / `model` wrappers.

The prefix contract, in one place. A state_dict is either
- a published whole segmentation model: its keys start with a part prefix (mmseg / OffSeg
  `backbone.`, `decode_head.`, `auxiliary_head.`; Hugging Face `segformer.`, which stays on for
  MiT's key map). Each part is handed, without its prefix, to the `convert_checkpoint` of the class
  that builds it here and comes back under our prefix (`backbone.`, `head.`, `aux_head.`);
- or a backbone alone (an ImageNet file): no key carries a part prefix (`head.*` there is the
  ImageNet classifier, which the backbone's key map drops);
- or a checkpoint of this repo (train.py, tools/convert_checkpoint.py): our keys, loaded as they are.

Every load reports once what it matched, and what was missing, unexpected or of another shape; a
load that matches nothing is an error, never a silent random initialisation. The summary is logged
(logger `models.weights`), each misfit is a warning.
"""

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .heads.eomt import checkpoint_parts as eomt_checkpoint_parts
from .heads.eomt import holds_differences
from .input_channels import inflate_input_conv

log = logging.getLogger(__name__)

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.pth', 'model.pt')

PARTS = {  # prefix in a published file -> (our attribute on Segmentor, whether the prefix stays for the key map)
    'backbone.': ('backbone', False),
    'segformer.': ('backbone', True),
    'decode_head.': ('head', False),
    'auxiliary_head.': ('aux_head', False),
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def read_state_dict(path) -> dict:
    """Tensors of a .pth/.pt/.bin/.safetensors file or an HF folder, unwrapped from the usual wrappers."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f'{path}: folder holds none of {", ".join(WEIGHT_FILES)}')
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"weights '{path}' not found (a local file or folder is expected; nothing is downloaded)")
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        reason = str(error).split('. ')[0]  # torch's refusals of pickled code run on for a paragraph
        raise CheckpointError(f'{path}: cannot be read as a PyTorch checkpoint ({reason})') from error
    for wrapper in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path}: expected a state_dict of tensors')
    return {key.removeprefix('module.'): value for key, value in state.items()}


def split_parts(state: dict, differences: bool = False) -> tuple:
    """({part: its state_dict, ready for that part's key map}, [keys of no known part]) by the prefix contract
    (an EoMT checkpoint, official or transformers', is put into that form first)."""
    try:
        state = eomt_checkpoint_parts(state, differences) or state
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if not any(key.startswith(tuple(PARTS)) for key in state):
        return {'backbone': dict(state)}, []
    parts, unclaimed = {}, []
    for key, value in state.items():
        prefix = next((p for p in PARTS if key.startswith(p)), None)
        if prefix is None:
            unclaimed.append(key)
            continue
        part, keep_prefix = PARTS[prefix]
        parts.setdefault(part, {})[key if keep_prefix else key.removeprefix(prefix)] = value
    return parts, unclaimed


def convert_part(module: nn.Module, state: dict) -> dict:
    """`state` through the key map of the class that built `module` (the identity if it has none), then
    through the module's `fit_checkpoint` where it resizes tensors to its own sizes (a ViT's patch kernel
    and position table)."""
    convert = getattr(type(module), 'convert_checkpoint', None)
    state = convert(state) if convert else state
    fit = getattr(module, 'fit_checkpoint', None)
    return fit(state) if fit else state


def convert_model_state(model: nn.Module, state: dict, start: dict = None) -> tuple:
    """(our state_dict, [keys no part of `model` claims]) for a published or our own whole-model state_dict,
    or for a backbone alone. `start`: for a file of differences (an official DINOv3 EoMT checkpoint), the
    state (our names) they are differences to; each converted tensor is then start + difference."""
    if start is not None and not holds_differences(state):
        raise CheckpointError('only an official DINOv3 EoMT checkpoint holds differences to a base; this file does not')
    parts, unclaimed = split_parts(state, differences=start is not None)
    converted = {}
    for part, part_state in parts.items():
        module = getattr(model, part, None)
        if module is None:
            unclaimed += list(part_state)
            continue
        converted.update({f'{part}.{k}': v for k, v in convert_part(module, part_state).items()})
    if start is not None:
        converted = {
            key: start[key] + value if key in start and start[key].shape == value.shape else value
            for key, value in converted.items()
        }
    return converted, unclaimed


@dataclass
class LoadReport:
    """What one load did: how many of the module's tensors it filled, and every key that did not fit."""

    source: str
    loaded: int
    total: int
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    new: list = field(default_factory=list)  # tensors no pretrained file has (a ViT's feature pyramid): not misfits
    inflated: list = field(default_factory=list)  # an RGB input kernel adapted to other bands (input_channels.py)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> list:
        """One line per kind of key that did not fit (empty for a complete load)."""
        lines = (
            [f'{len(self.mismatched)} keys skipped, shapes differ from the model: ' + ', '.join(self.mismatched[:8])]
            if self.mismatched
            else []
        )
        for kind, keys in (('missing from', self.missing), ('unexpected in', self.unexpected)):
            if keys:
                lines.append(
                    f'{len(keys)} keys {kind} the checkpoint: '
                    + ', '.join(keys[:8])
                    + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')
                )
        return lines

    def summary(self) -> str:
        fresh = f' ({len(self.new)} new ones initialised: {self.new[0].split(".")[0]})' if self.new else ''
        inflated = ''.join(f'; inflated {item}' for item in self.inflated)
        return f'loaded {self.loaded}/{self.total} tensors from {self.source}{fresh}{inflated}'


def load_into(
    module: nn.Module, state: dict, source: str, strict: bool = False, skip_mismatched: bool = False
) -> LoadReport:
    """Load what fits into `module` and report the rest. Shape mismatches are refused (or, with
    `skip_mismatched`, as when fine-tuning on other classes, left as initialised); with `strict` (our own
    checkpoints) any key difference is an error; a state that fills none of the module's tensors is always one."""
    own = module.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    if mismatched and not skip_mismatched:
        raise CheckpointError(
            f'{source}: shapes do not match the model (wrong variant?):\n  '
            + '\n  '.join(
                f'{k}: {tuple(state[k].shape)} in file, {tuple(own[k].shape)} in model' for k in mismatched[:10]
            )
        )
    fitting = {k: v for k, v in state.items() if k not in mismatched}
    report = LoadReport(
        source,
        len(fitting.keys() & own.keys()),
        len(own),
        sorted(own.keys() - fitting.keys()),
        sorted(fitting.keys() - own.keys()),
        mismatched,
    )
    if own and not report.loaded:
        raise CheckpointError(
            f'{source}: none of its {len(state)} tensors fits {type(module).__name__} '
            f'(0/{len(own)} loaded; weights of another architecture, or keys under another prefix?)'
        )
    if strict and not report.complete:
        raise CheckpointError(
            f'{source} does not match the model (built from its config):\n  ' + '\n  '.join(report.problems())
        )
    module.load_state_dict(fitting, strict=False)
    return report


def load_pretrained(module: nn.Module, path, part: str = 'backbone') -> LoadReport:
    """Published weights for one part (`backbone.pretrained`: all of an ImageNet file, `backbone.*` of a
    whole segmentation checkpoint) through the module's own key map. The result is logged: one line for
    a full match, every misfit otherwise."""
    parts, _ = split_parts(read_state_dict(path))
    if part not in parts:
        raise CheckpointError(f'{path}: holds no {part} weights (parts found: {", ".join(parts)})')
    state, inflated = inflate_input_conv(module, convert_part(module, parts[part]))
    report = load_into(module, state, source=str(path))
    report.inflated = inflated
    pretrained_part = getattr(module, 'pretrained_part', '')
    if pretrained_part:  # the rest of the module is new by design
        report.new = [key for key in report.missing if not key.startswith(f'{pretrained_part}.')]
        report.missing = [key for key in report.missing if key.startswith(f'{pretrained_part}.')]
    log_report(report)
    return report


def load_weights_from(model: nn.Module, path) -> LoadReport:
    """Fine-tuning initialisation from a checkpoint of this repo (train.py or tools/convert_checkpoint.py):
    what fits is loaded; missing, unexpected and shape-mismatched keys (e.g. a classifier for another
    number of classes) are left as initialised and reported."""
    state = read_state_dict(path)
    own = model.state_dict()
    if not any(k.startswith('backbone.') and k in own and v.shape == own[k].shape for k, v in state.items()):
        raise CheckpointError(
            f'{path}: none of its backbone weights fit this model (a checkpoint of another '
            'architecture? published files need tools/convert_checkpoint.py first)'
        )
    report = load_into(model, state, str(path), skip_mismatched=True)
    log_report(report)
    return report


def load_model_weights(model: nn.Module, checkpoint: dict, source: str) -> None:
    """Strict load of a checkpoint's `model` (this repo's keys) into `model`: any key difference is an error."""
    load_into(model, checkpoint['model'], source, strict=True)


def log_report(report: LoadReport) -> None:
    """The summary as a log line; each misfit as a warning (train.py writes both to train.log)."""
    log.info(report.summary())
    for line in report.problems():
        warnings.warn(f'{report.source}: {line}', stacklevel=3)
