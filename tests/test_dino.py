"""DINOv2, DINOv3 and DINOv3 ConvNeXt backbones: the hidden states of transformers' own models on the
same weights, official-format checkpoints converted with every tensor matched, the feature pyramid's
strides, the input-size rule, and parameter counts equal to timm's models of the same published
checkpoints."""

import pytest
import timm
import torch
from test_segformer import rename

from engine.config import ConfigError
from models.backbones import BACKBONES
from models.errors import InputSizeError
from train import load_config

TOLERANCE = 1e-5


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    return (ours - reference).abs().max() <= TOLERANCE * reference.abs().max()


def seeded(family: str, **options):
    torch.manual_seed(0)
    backbone = BACKBONES[family]('test', **options).eval()
    with torch.no_grad():  # weights away from their (partly constant) initialisation
        for parameter in backbone.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return backbone


def reference_model(backbone):
    """transformers' model of the backbone's config, holding its weights."""
    model = type(backbone.vit)(backbone.vit.config).eval()
    missing, unexpected = model.load_state_dict(
        {k.removeprefix('vit.'): v for k, v in backbone.state_dict().items()}, strict=False
    )
    assert set(missing) <= {'embeddings.mask_token'} and not unexpected
    return model


@pytest.mark.parametrize('family, variant', [('dinov2', 'test'), ('dinov2', 'test_reg4'), ('dinov3', 'test')])
def test_vit_blocks_are_transformers_hidden_states_through_the_final_norm(family, variant):
    torch.manual_seed(0)
    backbone = BACKBONES[family](variant, out_indices=[0, 3, 1, 2], pyramid=False).eval()
    model = reference_model(backbone)
    images = torch.randn(2, 3, 4 * backbone.patch_size, 3 * backbone.patch_size)
    with torch.no_grad():
        maps = backbone(images)
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states
    norm = model.layernorm if family == 'dinov2' else model.norm
    for index, ours in zip([0, 3, 1, 2], maps):
        tokens = norm(hidden[index + 1])[:, -12:]  # the 4x3 patch tokens after class and registers
        assert ours.shape == (2, backbone.out_channels[0], 4, 3)
        assert close(ours.flatten(2).transpose(1, 2), tokens)


def test_dinov3_convnext_stages_are_transformers_hidden_states():
    backbone = seeded('dinov3_convnext')
    model = type(backbone.convnext)(backbone.convnext.config).eval()
    state = {k.removeprefix('convnext.'): v for k, v in backbone.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert all(key.startswith('layer_norm.') for key in missing) and not unexpected
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = backbone(images)
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states[1:]
    assert [m.shape[-2:] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(close(ours, reference) for ours, reference in zip(maps, hidden))


def official_dinov2(state: dict) -> dict:
    """Our DINOv2 state in the facebookresearch names: fused qkv, `ls1.gamma`, `blocks.{i}`."""
    official = rename(
        {key.removeprefix('vit.'): value for key, value in state.items()},
        [
            (r'^embeddings\.cls_token$', 'cls_token'),
            (r'^embeddings\.position_embeddings$', 'pos_embed'),
            (r'^embeddings\.register_tokens$', 'register_tokens'),
            (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
            (r'^encoder\.layer\.(\d+)\.', r'blocks.\1.'),
            (r'\.attention\.o_proj\.', '.attn.proj.'),
            (r'\.layer_scale([12])\.lambda1$', r'.ls\1.gamma'),
            (r'^layernorm\.', 'norm.'),
        ],
    )
    return fuse_qkv(official, with_k_bias=True)


def official_dinov3(state: dict) -> dict:
    """Our DINOv3 state in the facebookresearch names, with the masked (zero) k bias and its mask."""
    official = rename(
        {key.removeprefix('vit.'): value for key, value in state.items()},
        [
            (r'^embeddings\.cls_token$', 'cls_token'),
            (r'^embeddings\.register_tokens$', 'storage_tokens'),
            (r'^embeddings\.patch_embeddings\.', 'patch_embed.proj.'),
            (r'^model\.layer\.(\d+)\.', r'blocks.\1.'),
            (r'\.attention\.o_proj\.', '.attn.proj.'),
            (r'\.layer_scale([12])\.lambda1$', r'.ls\1.gamma'),
            (r'\.mlp\.up_proj\.', '.mlp.fc1.'),
            (r'\.mlp\.down_proj\.', '.mlp.fc2.'),
        ],
    )
    official['mask_token'] = torch.zeros(1, state['vit.embeddings.cls_token'].shape[-1])
    official['rope_embed.periods'] = torch.ones(4)
    return fuse_qkv(official, with_k_bias=False)


def fuse_qkv(state: dict, with_k_bias: bool) -> dict:
    for key in [k for k in state if '.attention.q_proj.' in k]:
        stem, kind = key.split('.attention.q_proj.')
        q, v = state.pop(key), state.pop(f'{stem}.attention.v_proj.{kind}')
        k = state.pop(f'{stem}.attention.k_proj.{kind}', None)
        if k is None:  # DINOv3's k has no bias: the official file stores zeros and a mask
            k = torch.zeros_like(q)
            state[f'{stem}.attn.qkv.bias_mask'] = torch.ones(3 * q.shape[0])
        state[f'{stem}.attn.qkv.{kind}'] = torch.cat([q, k, v])
    return state


@pytest.mark.parametrize(
    'family, variant, to_official',
    [
        ('dinov2', 'test', official_dinov2),
        ('dinov2', 'test_reg4', official_dinov2),
        ('dinov3', 'test', official_dinov3),
    ],
)
def test_official_vit_checkpoints_convert_with_every_tensor_matched(family, variant, to_official):
    torch.manual_seed(0)
    ours = BACKBONES[family](variant).state_dict()
    vit = {k: v for k, v in ours.items() if k.startswith('vit.')}
    converted = BACKBONES[family].convert_checkpoint(to_official(dict(vit)))
    assert converted.keys() == vit.keys()
    assert all(torch.equal(converted[key], value) for key, value in vit.items())


def test_official_dinov3_convnext_checkpoints_convert_with_every_tensor_matched():
    ours = {k.removeprefix('convnext.'): v for k, v in BACKBONES['dinov3_convnext']('test').state_dict().items()}
    official = rename(
        ours,
        [
            (r'^model\.stages\.(\d+)\.downsample_layers\.', r'downsample_layers.\1.'),
            (r'^model\.stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.', r'stages.\1.\2.dwconv.'),
            (r'^model\.stages\.(\d+)\.layers\.(\d+)\.layer_norm\.', r'stages.\1.\2.norm.'),
            (r'^model\.stages\.(\d+)\.layers\.(\d+)\.pointwise_conv([12])\.', r'stages.\1.\2.pwconv\3.'),
            (r'^model\.stages\.(\d+)\.layers\.(\d+)\.gamma$', r'stages.\1.\2.gamma'),
        ],
    )
    official.update({'norm.weight': torch.ones(128), 'norms.3.weight': torch.ones(128)})
    converted = BACKBONES['dinov3_convnext'].convert_checkpoint(official)
    assert converted.keys() == {f'convnext.{key}' for key in ours}
    assert all(torch.equal(converted[f'convnext.{key}'], value) for key, value in ours.items())


def test_a_pretrained_vit_file_fills_the_vit_and_reports_the_pyramid_as_new_not_missing(tmp_path):
    from models.weights import load_pretrained

    torch.save(official_dinov3(seeded('dinov3', pyramid=False).state_dict()), tmp_path / 'dinov3_test.pth')
    target = BACKBONES['dinov3']('test')
    report = load_pretrained(target, tmp_path / 'dinov3_test.pth')
    assert report.complete and report.new == sorted(f'pyramid.{key}' for key in target.pyramid.state_dict())
    assert report.summary().endswith(f'({len(report.new)} new ones initialised: pyramid)')


@pytest.mark.parametrize('family', ['dinov2', 'dinov3'])
def test_the_pyramid_gives_strides_a_quarter_to_twice_the_patch(family):
    backbone = BACKBONES[family]('test').eval()
    p = backbone.patch_size
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 4 * p, 6 * p))
    assert [m.shape[-2:] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert backbone.strides == [p / 4, p / 2, p, 2 * p]


def test_a_side_the_patch_grid_cannot_take_is_refused_when_the_config_is_read(tmp_path):
    with pytest.raises(InputSizeError, match='multiples of 28'):
        BACKBONES['dinov2']('test')(torch.randn(1, 3, 56, 42))
    config = tmp_path / 'vit.yaml'
    config.write_text(
        'backbone: {type: dinov3, variant: test}\nhead: {type: segformer, channels: 16}\n'
        'data: {type: demo, root: data/demo, num_classes: 5,\n'
        '       train: {pipeline: [{type: random_crop, size: [96, 100]}]}}\n'
        'train: {max_iters: 1, batch_size: 2}\n'
    )
    with pytest.raises(ConfigError, match='multiples of 32'):
        load_config(config)


TIMM_MODELS = {  # timm's models of the official checkpoints, by the variants built here
    ('dinov2', 'vits14'): 'vit_small_patch14_dinov2',
    ('dinov2', 'vitb14'): 'vit_base_patch14_dinov2',
    ('dinov2', 'vitl14'): 'vit_large_patch14_dinov2',
    ('dinov2', 'vitg14'): 'vit_giant_patch14_dinov2',
    ('dinov2', 'vits14_reg4'): 'vit_small_patch14_reg4_dinov2',
    ('dinov2', 'vitb14_reg4'): 'vit_base_patch14_reg4_dinov2',
    ('dinov2', 'vitl14_reg4'): 'vit_large_patch14_reg4_dinov2',
    ('dinov2', 'vitg14_reg4'): 'vit_giant_patch14_reg4_dinov2',
    ('dinov3', 'vits16'): 'vit_small_patch16_dinov3_qkvb',
    ('dinov3', 'vits16plus'): 'vit_small_plus_patch16_dinov3_qkvb',
    ('dinov3', 'vitb16'): 'vit_base_patch16_dinov3_qkvb',
    ('dinov3', 'vitl16'): 'vit_large_patch16_dinov3_qkvb',
    ('dinov3_convnext', 'tiny'): 'convnext_tiny',
    ('dinov3_convnext', 'small'): 'convnext_small',
    ('dinov3_convnext', 'base'): 'convnext_base',
    ('dinov3_convnext', 'large'): 'convnext_large',
}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('family, variant', TIMM_MODELS, ids=[f'{f}-{v}' for f, v in TIMM_MODELS])
def test_parameter_counts_are_those_of_the_published_checkpoints(family, variant):
    """timm's independent models of the same checkpoints count the same, less what one side does not
    build: timm drops the class token's position embedding of DINOv2 with registers (the official file
    has it), and the ConvNeXt's final LayerNorm serves only the pooled token (not built here)."""
    with torch.device('meta'):
        ours = BACKBONES[family](variant, **({} if family == 'dinov3_convnext' else {'pyramid': False}))
        reference = timm.create_model(TIMM_MODELS[family, variant], pretrained=False, num_classes=0)
    not_built_by_timm = ours.out_channels[-1] if variant.endswith('_reg4') else 0
    not_built_here = 2 * ours.out_channels[-1] if family == 'dinov3_convnext' else 0
    assert parameter_count(ours) - not_built_by_timm == parameter_count(reference) - not_built_here


def test_patch_14_weights_load_into_a_patch_16_vit_resampled_as_timm_loads_them(tmp_path):
    """EoMT runs DINOv2 at patch 16 on a 32x32 grid: the official patch-14 file's kernel and 37x37
    position table are resized on loading, as timm's checkpoint filter does for the official code."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    from models.weights import load_pretrained

    source = seeded('dinov2', pyramid=False)
    torch.save(official_dinov2(source.state_dict()), tmp_path / 'dinov2_test_pretrain.pth')
    target = BACKBONES['dinov2']('test', pyramid=False, patch_size=16, image_size=64)
    report = load_pretrained(target, tmp_path / 'dinov2_test_pretrain.pth')
    assert report.complete
    kernel = source.vit.embeddings.patch_embeddings.projection.weight
    table = source.vit.embeddings.position_embeddings
    assert torch.equal(target.vit.embeddings.patch_embeddings.projection.weight, resample_patch_embed(kernel, [16, 16]))
    assert torch.equal(target.vit.embeddings.position_embeddings, resample_abs_pos_embed(table, [4, 4]))
    assert target(torch.randn(1, 3, 64, 96))[0].shape == (1, 64, 4, 6)
