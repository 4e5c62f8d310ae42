"""Whole-model conversion of published checkpoints to our keys: each part goes through its own key map.

mmseg / OffSeg checkpoints name the parts `backbone.`, `decode_head.` and `auxiliary_head.`;
Hugging Face SegFormer checkpoints `segformer.` and `decode_head.`. Every part is handed, without
its prefix, to the `convert_checkpoint` of the class that builds it here, and comes back under our
prefix (`backbone.`, `head.`, `aux_head.`). Keys of no known part are returned separately, so the
caller can list them.
"""
from torch import nn

PARTS = {  # published prefix -> (our attribute on Segmentor, whether the prefix is kept for the key map)
    'backbone.': ('backbone', False),
    'segformer.': ('backbone', True),       # HF: MiT's map reads its own `segformer.` prefix
    'decode_head.': ('head', False),
    'auxiliary_head.': ('aux_head', False),
}


def convert_model_state(model: nn.Module, state: dict) -> tuple:
    """(our state_dict, [keys no part of `model` claims]) for a published state_dict: a whole model,
    or a backbone alone (an ImageNet file: no key carries a part prefix)."""
    if not any(key.startswith(tuple(PARTS)) for key in state):
        state = {f'backbone.{key}': value for key, value in state.items()}
    grouped, unclaimed = {}, []
    for key, value in state.items():
        prefix = next((p for p in PARTS if key.startswith(p)), None)
        if prefix is None or getattr(model, PARTS[prefix][0], None) is None:
            unclaimed.append(key)
            continue
        part, keep_prefix = PARTS[prefix]
        grouped.setdefault(part, {})[key if keep_prefix else key.removeprefix(prefix)] = value
    converted = {}
    for part, part_state in grouped.items():
        module = getattr(model, part)
        convert = getattr(type(module), 'convert_checkpoint', None)
        part_state = convert(part_state) if convert else part_state
        converted.update({f'{part}.{k}': v for k, v in part_state.items()})
    return converted, unclaimed
