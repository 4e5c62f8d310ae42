"""Heads: list of backbone maps -> logits. Every head takes `offset_learning` to swap its classifier."""
from .aspp import ASPPHead, DeepLabV3PlusHead
from .fcn import FCNHead

HEADS = {
    'aspp': DeepLabV3PlusHead,
    'deeplabv3': ASPPHead,
    'fcn': FCNHead,
}
