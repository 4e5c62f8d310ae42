"""Swin Transformer: the reference vector's features, the parameter count and both checkpoint namings."""

import pytest
import torch
from timm.models.swin_transformer import PatchMerging
from torch import nn

from conftest import assert_close_to_reference, load_vector
from models import Segmentor
from models.backbones.swin import Swin
from models.heads.segformer import SegFormerHead


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_swin_t_matches_reference_features():
    backbone_file, model_file = load_vector('mask2former_swin_t_backbone'), load_vector('mask2former_swin_t_ol')
    state = {k.removeprefix('backbone.'): v for k, v in backbone_file['state_dict'].items()}
    backbone = Swin('tiny').eval()
    backbone.load_state_dict(Swin.convert_checkpoint(state), strict=True)
    with torch.no_grad():
        features = backbone(model_file['input'])
    for level, (ours, ref) in enumerate(zip(features, model_file['features'])):
        assert_close_to_reference(ours, ref, f'feature {level}')


def test_swin_t_parameter_count():
    with torch.device('meta'):
        assert count(Swin('tiny')) == 27_520_698  # mmseg's Swin-T with the output norms norm0-3


def mmseg_patch_merging(x: torch.Tensor, norm: nn.LayerNorm, reduction: nn.Linear) -> torch.Tensor:
    """mmseg's PatchMerging on (B, H, W, C): nn.Unfold(2, stride 2) gathers channels as c·4 + di·2 + dj."""
    b, h, w, c = x.shape
    patches = nn.functional.unfold(x.permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2)  # (B, HW/4, 4C)
    return reduction(norm(patches)).view(b, h // 2, w // 2, -1)


def test_mmseg_patch_merging_weights_give_mmseg_outputs():
    torch.manual_seed(0)
    norm, reduction = nn.LayerNorm(4 * 8), nn.Linear(4 * 8, 16, bias=False)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    mmseg_state = {
        'stages.0.blocks.0.attn.w_msa.qkv.bias': torch.zeros(24),
        'stages.0.downsample.norm.weight': norm.weight,
        'stages.0.downsample.norm.bias': norm.bias,
        'stages.0.downsample.reduction.weight': reduction.weight,
    }
    converted = Swin.convert_checkpoint(mmseg_state)
    ours = PatchMerging(8, 16)
    ours.load_state_dict(
        {
            k.removeprefix('stages.0.downsample.'): v
            for k, v in converted.items()
            if k.startswith('stages.0.downsample.')
        }
    )
    x = torch.randn(2, 6, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), mmseg_patch_merging(x, norm, reduction))


def official_imagenet_state(model: Swin) -> dict:
    """A random state_dict in the official `swin_tiny_patch4_window7_224.pth` naming, with its extras."""
    torch.manual_seed(0)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith('norms.'):
            continue
        state[key.replace('stages.', 'layers.', 1)] = torch.randn_like(value)
    for name, module in model.named_modules():
        if name.endswith('.attn'):
            state[name.replace('stages.', 'layers.', 1) + '.relative_position_index'] = module.relative_position_index
    state.update(
        {
            'layers.0.blocks.1.attn_mask': torch.zeros(64, 49, 49),
            'norm.weight': torch.ones(768),
            'norm.bias': torch.zeros(768),
            'head.weight': torch.zeros(1000, 768),
            'head.bias': torch.zeros(1000),
        }
    )
    return state


def test_official_imagenet_file_converts_with_fresh_output_norms():
    model = Swin('tiny')
    state = official_imagenet_state(model)
    converted = Swin.convert_checkpoint(state)
    assert converted.keys() == model.state_dict().keys()
    assert torch.equal(
        converted['stages.2.blocks.5.attn.relative_position_bias_table'],
        state['layers.2.blocks.5.attn.relative_position_bias_table'],
    )
    assert torch.equal(converted['stages.0.downsample.reduction.weight'], state['layers.0.downsample.reduction.weight'])
    assert torch.equal(converted['norms.3.weight'], torch.ones(768))


def test_wrong_relative_position_index_is_refused():
    state = official_imagenet_state(Swin('tiny'))
    key = 'layers.1.blocks.0.attn.relative_position_index'
    state[key] = state[key].flip(0)
    with pytest.raises(ValueError, match=key):
        Swin.convert_checkpoint(state)


def test_any_input_size_pads_like_mmseg():
    """Sizes that are no multiple of 4, of the window or of 2 at some stage: mmseg's output sizes."""
    backbone = Swin('tiny').eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 70, 99))
    assert [tuple(f.shape[-2:]) for f in features] == [(18, 25), (9, 13), (5, 7), (3, 4)]


def test_onnx_export_keeps_the_window_padding_dynamic(tmp_path):
    """Traced at 64x64, the graph pads, shifts and masks windows for other sizes too, odd ones included."""
    pytest.importorskip('onnxruntime')
    from tools import export_onnx

    torch.manual_seed(0)
    model = Segmentor(Swin('tiny'), SegFormerHead([96, 192, 384, 768], 5, channels=32)).eval()
    path = export_onnx.export(model, tmp_path / 'swin.onnx', size=(64, 64))
    assert max(export_onnx.check(path, model, [(64, 64), (96, 128), (70, 99)], batch=2)) < 1e-4
