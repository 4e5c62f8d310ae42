"""UPerNet: the logits of transformers' UperNetForSemanticSegmentation (ConvNeXt backbone) from its own
backbone's features through our head and auxiliary FCN head, the size of mmseg's ConvNeXt-T head,
and mmseg's key names."""

import re

import torch
import torch.nn.functional as F
from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

from models.heads import HEADS

TOLERANCE = 1e-5


def transformers_upernet(channels: list, classes: int, width: int = 32) -> UperNetForSemanticSegmentation:
    backbone = ConvNextConfig(
        depths=[1, 1, 1, 1], hidden_sizes=channels, out_features=['stage1', 'stage2', 'stage3', 'stage4']
    )
    config = UperNetConfig(
        backbone_config=backbone,
        hidden_size=width,
        num_labels=classes,
        auxiliary_in_channels=channels[2],
        auxiliary_channels=16,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config).eval()
    with torch.no_grad():  # BatchNorm statistics away from identity, so that they count
        for name, buffer in model.named_buffers():
            if name.endswith(('running_mean', 'running_var')):
                buffer.uniform_(0.5, 1.5)
    return model


def ours_from(state: dict, prefix: str) -> dict:
    """transformers' head keys -> mmseg's (ours): `batch_norm` is `bn`, the classifier a conv in ours."""
    return {
        re.sub(r'^classifier\.', 'classifier.conv.', key.removeprefix(prefix).replace('.batch_norm.', '.bn.')): value
        for key, value in state.items()
        if key.startswith(prefix)
    }


def test_upernet_and_its_auxiliary_head_give_transformers_logits():
    channels = [16, 32, 64, 128]
    reference = transformers_upernet(channels, classes=5)
    head = HEADS['upernet'](channels, 5, channels=32).eval()
    aux = HEADS['fcn'](channels, 5, in_index=2, channels=16).eval()
    head.load_state_dict(ours_from(reference.state_dict(), 'decode_head.'))
    aux.load_state_dict(ours_from(reference.state_dict(), 'auxiliary_head.'))
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        expected = reference(pixel_values=images).logits
        features = list(reference.backbone(images).feature_maps)
        expected_aux = reference.auxiliary_head(features)  # transformers computes it only for the loss
        logits = F.interpolate(head(features), size=(96, 64), mode='bilinear')
        aux_logits = aux(features)
    assert head(features).shape[-2:] == features[0].shape[-2:]
    assert (logits - expected).abs().max() <= TOLERANCE * expected.abs().max()
    assert (aux_logits - expected_aux).abs().max() <= TOLERANCE * expected_aux.abs().max()


def test_mmseg_convnext_t_head_has_transformers_size_and_mmseg_keys():
    """ConvNeXt-T's UPerNet head at 150 classes: the same parameters as transformers' head; keys as in
    mmseg's `decode_head.*` once `conv_seg` is renamed."""
    channels = [96, 192, 384, 768]
    ours = HEADS['upernet'](channels, 150)
    with torch.device('meta'):
        reference = transformers_upernet(channels, 150, width=512).decode_head
    reference_state = {key: value for key, value in reference.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(
        v.numel() for k, v in reference_state.items() if 'running' not in k and 'num_batches' not in k
    )
    mmseg = {k.replace('classifier.conv.', 'conv_seg.'): v for k, v in ours.state_dict().items()}
    assert {'psp_modules.0.1.conv.weight', 'psp_modules.3.1.bn.weight', 'bottleneck.conv.weight'} <= set(mmseg)
    assert HEADS['upernet'].convert_checkpoint(mmseg).keys() == ours.state_dict().keys()


def test_offset_learning_replaces_the_classifier():
    head = HEADS['upernet']([16, 32, 64, 128], 5, channels=32, offset_learning=True).eval()
    features = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([16, 32, 64, 128])]
    with torch.no_grad():
        assert head(features).shape == (1, 5, 32, 32)
    assert type(head.classifier).__name__ == 'OffsetLearning'
