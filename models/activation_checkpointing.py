"""`backbone.with_cp` (mmseg's name): activation checkpointing, one mechanism for every backbone.

Each backbone names its repeated blocks (`checkpoint_blocks`, module classes), and PyTorch's
checkpoint wrapper recomputes each one's activations in the backward pass instead of keeping them
from the forward. A BatchNorm inside a recomputed block updates its running statistics twice a
step, as with mmseg's and timm's checkpointing; MSCAN names the branches between its BatchNorms
instead. State-dict keys stay as they are (the wrapper leaves its own prefix out of them), so
weights load alike with and without it.
"""

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing


def enable_activation_checkpointing(backbone: nn.Module) -> None:
    blocks = backbone.checkpoint_blocks
    apply_activation_checkpointing(backbone, check_fn=lambda module: isinstance(module, blocks))
