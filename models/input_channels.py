"""Images of other than three bands (multispectral, grey + depth): the backbone's input convolution,
the first one the image meets, rebuilt for `channels` bands, and pretrained RGB weights inflated into
it as torchseg and timm do (the RGB kernels repeated over the bands and scaled by 3 / bands, so that
the first layer's response to an image keeps its scale)."""

from timm.models import adapt_input_conv
from torch import nn


def input_conv(backbone: nn.Module) -> tuple:
    """(name, module) of the convolution the image enters: the backbone's first."""
    return next((name, module) for name, module in backbone.named_modules() if isinstance(module, nn.Conv2d))


def take_input_channels(backbone: nn.Module, channels: int) -> None:
    """Rebuild the input convolution for `channels` bands (freshly initialised; pretrained weights are
    inflated into it on loading)."""
    name, conv = input_conv(backbone)
    replacement = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    backbone.set_submodule(name, replacement)
    owner = backbone.get_submodule(name.rpartition('.')[0])
    if hasattr(owner, 'num_channels'):  # transformers' patch embeddings check the input against it
        owner.num_channels = channels


def inflate_input_conv(backbone: nn.Module, state: dict) -> tuple:
    """(state, [what was inflated]): an RGB kernel of the input convolution in `state` (the backbone's
    own names) adapted to the backbone's bands."""
    name, conv = input_conv(backbone)
    key = f'{name}.weight'
    weight = state.get(key)
    fits = weight is not None and weight.dim() == 4 and weight.shape[0] == conv.out_channels
    if not fits or weight.shape[1] == conv.in_channels:
        return state, []
    inflated = adapt_input_conv(conv.in_channels, weight)
    return {**state, key: inflated}, [f'{key} ({weight.shape[1]} -> {conv.in_channels} input channels)']
