"""Every registered backbone family: parameter counts, forward shapes of every variant, and pretrained
weights loaded offline through the config (`backbone.pretrained`), including the error cases.

Only the tiny variants run by default; `pytest -m large` runs the forward test on the others.
"""

import copy
import re
import socket
import sys
import warnings

import huggingface_hub.file_download
import pytest
import timm
import timm.models._builder
import torch
import transformers.utils.hub
import yaml
from safetensors.torch import save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from transformers import SegformerConfig, SegformerForSemanticSegmentation

import models.weights
import train
from conftest import ROOT, input_sizes
from engine.config import ConfigError
from models.activation_checkpointing import enable_activation_checkpointing
from models.backbones import BACKBONES
from models.weights import CheckpointError
from train import create_backbone, get_backbone_channels, load_config

VARIANTS = {family: tuple(sys.modules[cls.__module__].VARIANTS) for family, cls in BACKBONES.items()}
"""Each family's variants, read from its module's `VARIANTS` table."""
TINY = {
    'resnet': ('18', 'test'),
    'convnext': ('tiny', 'test'),
    'mit': ('b0', 'test'),
    'mscan': ('t', 'test'),
    'efficientformerv2': ('s0', 's1', 'test'),
    'swin': ('tiny', 'test'),
    'dinov2': ('test', 'test_reg4'),
    'dinov3': ('test',),
    'dinov3_convnext': ('test',),
}
"""The variants cheap enough for every test run."""
SIZES = input_sizes('resnet')
"""Multiples of 32: the CNN families give exactly side / stride here (at other sizes they round differently)."""


def variants(families=tuple(BACKBONES)):
    """(family, variant) parameters; all but the tiny ones are marked `large` (deselected by default)."""
    return [
        pytest.param(
            family,
            variant,
            id=f'{family}-{variant}',
            marks=() if variant in TINY.get(family, ()) else pytest.mark.large,
        )
        for family in families
        for variant in VARIANTS[family]
    ]


def tiny_variants():
    return [
        pytest.param(family, variant, id=f'{family}-{variant}') for family, names in TINY.items() for variant in names
    ]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomized(module: torch.nn.Module) -> dict:
    """`module`'s state_dict with every float entry random, so that a misplaced or unloaded tensor shows."""
    torch.manual_seed(0)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in module.state_dict().items()}


def yaml_config(tmp_path, backbone: dict) -> dict:
    """A minimal run config with this `backbone` section, written as YAML and read back by train.load_config."""
    path = tmp_path / 'config.yaml'
    path.write_text(
        yaml.safe_dump(
            {
                'backbone': backbone,
                'head': {'type': 'aspp'},
                'data': {
                    'type': 'demo',
                    'root': str(tmp_path / 'data'),
                    'num_classes': 7,
                    'train': {'pipeline': [{'type': 'random_crop', 'size': list(input_sizes(backbone['type'])[1])}]},
                },
                'train': {'max_iters': 1, 'batch_size': 1},
            }
        )
    )
    return load_config(str(path))


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything opens a network connection or asks timm / HF for hub weights (even cached ones)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError('hub or network access attempted')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(timm.models._builder, 'load_pretrained', refuse)
    monkeypatch.setattr(huggingface_hub.file_download, 'hf_hub_download', refuse)
    monkeypatch.setattr(transformers.utils.hub, 'cached_files', refuse)
    yield
    assert not attempts, 'hub or network access attempted (and the error was swallowed)'


# --- parameter counts ---------------------------------------------------------------------------

RESNET_FULL_PARAMS_M = {
    '18': 11.69,
    '34': 21.80,
    '50': 25.56,
    '50c': 25.58,
    '50d': 25.58,
    '101': 44.55,
    '101d': 44.57,
    '152': 60.19,
}
"""timm's ResNets with their ImageNet classifier (no published number for 101c)."""


@pytest.mark.parametrize('variant', RESNET_FULL_PARAMS_M)
def test_resnet_parameter_counts_match_timm_plus_classifier(variant):
    """Ours is timm's ResNet without `fc`: adding the C5 -> 1000 classifier gives the published count."""
    with torch.device('meta'):
        backbone = BACKBONES['resnet'](variant)
    assert not any(name.startswith('fc.') for name, _ in backbone.body.named_parameters())
    classifier = backbone.out_channels[-1] * 1000 + 1000
    assert abs((count(backbone) + classifier) / 1e6 - RESNET_FULL_PARAMS_M[variant]) < 0.005


@pytest.mark.parametrize('zero_init_last, start', [(True, 0.0), (False, 1.0)])
def test_resnet_zero_init_last_sets_where_every_block_starts(tmp_path, zero_init_last, start):
    """timm's default starts each block's last BatchNorm at zero; `zero_init_last: false` at one, as
    torchvision's ResNet (SMP's encoder) does."""
    backbone = create_backbone(
        yaml_config(tmp_path, {'type': 'resnet', 'variant': 18, 'zero_init_last': zero_init_last})
    )
    last_norms = [block.bn2.weight for stage in (1, 2, 3, 4) for block in getattr(backbone.body, f'layer{stage}')]
    assert all(torch.equal(weight, torch.full_like(weight, start)) for weight in last_norms)
    assert torch.equal(backbone.body.bn1.weight, torch.ones_like(backbone.body.bn1.weight))


# --- forward shapes -----------------------------------------------------------------------------


def assert_maps(backbone: torch.nn.Module, strides: list, sizes=SIZES) -> None:
    """Four finite maps with the backbone's `out_channels`, each side = input side / stride, at every size."""
    for size in sizes:
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, *size))
        assert len(features) == 4
        for level, (feature, channels, stride) in enumerate(zip(features, backbone.out_channels, strides)):
            assert feature.shape == (1, channels, size[0] // stride, size[1] // stride), (size, level)
            assert torch.isfinite(feature).all(), (size, level)


def test_every_family_has_tiny_variants():
    """The default run covers every registered family: a new family must name its cheap variants here."""
    assert TINY.keys() == BACKBONES.keys()
    for family, names in TINY.items():
        assert set(names) <= set(VARIANTS[family]), family


@pytest.mark.parametrize('family, variant', variants())
def test_forward_every_variant(family, variant):
    """Every variant in eval mode: 4 maps at strides s, 2s, 4s, 8s (4/8/16/32; a ViT's pyramid from a
    quarter of its patch) with the advertised channels."""
    torch.manual_seed(0)
    backbone = BACKBONES[family](variant).eval()
    assert backbone.strides == [backbone.strides[0] * 2**level for level in range(4)]
    assert len(backbone.out_channels) == 4
    assert_maps(backbone, backbone.strides, input_sizes(family))


@pytest.mark.parametrize('output_stride, strides', [(8, [4, 8, 8, 8]), (16, [4, 8, 16, 16])], ids=['os8', 'os16'])
@pytest.mark.parametrize('family, variant', variants(['resnet']))
def test_forward_dilated_resnet(family, variant, output_stride, strides):
    """DeepLab output strides: the last stages dilate instead of downsampling, and `strides` says so."""
    backbone = BACKBONES[family](variant, output_stride=output_stride).eval()
    assert backbone.strides == strides
    assert_maps(backbone, strides)


# --- pretrained weights through the config ------------------------------------------------------
# Each builder turns our randomized state into a file as users have it on disk (plus the classifier
# the loader must drop) and returns it with the state we must end up with.


def resnet_timm_file(variant, model, ours):
    """timm / torchvision ImageNet naming (`conv1.weight`, `layer1.0...`) with the `fc` classifier."""
    state = {k.removeprefix('body.'): v for k, v in ours.items()}
    state |= {'fc.weight': torch.randn(1000, model.out_channels[-1]), 'fc.bias': torch.randn(1000)}
    with torch.device('meta'):
        assert state.keys() == timm.create_model(f'resnet{variant}').state_dict().keys()
    return state, ours


def convnext_timm_file(variant, model, ours):
    """timm ImageNet naming (`stem.0`, `stages.0.blocks.0...`) with the `head.norm` / `head.fc` classifier.
    It has no output norms: ours must come out as fresh LayerNorms."""
    state = {re.sub(r'^body\.(stem|stages)_(\d+)\.', r'\1.\2.', k): v for k, v in ours.items() if k.startswith('body.')}
    width = model.out_channels[-1]
    state |= {
        'head.norm.weight': torch.randn(width),
        'head.norm.bias': torch.randn(width),
        'head.fc.weight': torch.randn(1000, width),
        'head.fc.bias': torch.randn(1000),
    }
    with torch.device('meta'):
        assert state.keys() == timm.create_model(f'convnext_{variant}').state_dict().keys()
    fresh = {
        k: torch.ones_like(v) if k.endswith('weight') else torch.zeros_like(v)
        for k, v in ours.items()
        if k.startswith('norms.')
    }
    return state, {**ours, **fresh}


MIT_TO_NVLABS = [
    ('layernorm_before', 'norm1'),
    ('layernorm_after', 'norm2'),
    ('attention.q_proj', 'attn.q'),
    ('attention.o_proj', 'attn.proj'),
    ('attention.sequence_reduction.sequence_reduction', 'attn.sr'),
    ('attention.sequence_reduction.layer_norm', 'attn.norm'),
]


def mit_nvlabs_file(variant, model, ours):
    """The official NVlabs `mit_b*.pth` naming (1-based `patch_embed{s}`, `block{s}`, `norm{s}`; k and v
    stacked as `attn.kv`) with its ImageNet `head`."""
    state = {}
    for key, value in ours.items():
        stage, rest = re.fullmatch(r'segformer\.stages\.(\d)\.(.*)', key).groups()
        s = int(stage) + 1
        rest = re.sub(r'^patch_embeddings\.layer_norm\.', f'patch_embed{s}.norm.', rest)
        rest = re.sub(r'^patch_embeddings\.', f'patch_embed{s}.', rest)
        rest = re.sub(r'^blocks\.', f'block{s}.', rest)
        rest = re.sub(r'^layer_norm\.', f'norm{s}.', rest)
        for old, new in MIT_TO_NVLABS:
            rest = rest.replace(old, new)
        state[rest] = value
    for k_key in [k for k in state if '.attention.k_proj.' in k]:
        v_key = k_key.replace('.k_proj.', '.v_proj.')
        state[k_key.replace('.attention.k_proj.', '.attn.kv.')] = torch.cat([state.pop(k_key), state.pop(v_key)])
    assert 'block1.0.attn.kv.weight' in state and 'patch_embed4.norm.bias' in state and 'norm4.weight' in state
    assert not any(name in k for k in state for name in ('stages.', 'attention.', 'layernorm_'))  # no HF name left
    return state | {'head.weight': torch.randn(1000, model.out_channels[-1]), 'head.bias': torch.randn(1000)}, ours


def mscan_official_file(variant, model, ours):
    """The official SegNeXt `mscan_*.pth`: our keys with the MLP's depthwise conv nested once more, plus `head`."""
    state = {k.replace('.mlp.dwconv.', '.mlp.dwconv.dwconv.'): v for k, v in ours.items()}
    state |= {'head.weight': torch.randn(1000, model.out_channels[-1]), 'head.bias': torch.randn(1000)}
    return {'state_dict': state}, ours


def offseg_file(variant, model, ours):
    """A published OffSeg (mmseg) checkpoint's backbone: `backbone.*`, with the stored bias index buffers
    and the ImageNet leftovers (`attention_biases`, `attention_bias_idxs`) that the loader drops."""
    state = dict(ours)
    for name, index in model.named_buffers():
        if name.endswith('attention_bias_idxs_seg'):
            prefix = name.removesuffix('attention_bias_idxs_seg')
            keys = 49 if index.shape[0] == index.shape[1] else 196  # ImageNet 7x7 / 14x14 key grids
            state |= {
                name: index.clone(),
                prefix + 'attention_biases': torch.randn(8, keys),
                prefix + 'attention_bias_idxs': torch.ones(49, keys, dtype=torch.long),
            }
    return {'meta': {'mmseg_version': '0.30.0'}, 'state_dict': {f'backbone.{k}': v for k, v in state.items()}}, ours


USER_FILES = {  # family: (variant, builder, file name)
    'resnet': ('18', resnet_timm_file, 'resnet18_a1_in1k.pth'),
    'convnext': ('tiny', convnext_timm_file, 'convnext_tiny.safetensors'),
    'mit': ('b0', mit_nvlabs_file, 'mit_b0.pth'),
    'mscan': ('t', mscan_official_file, 'mscan_t.pth'),
    'efficientformerv2': ('s0', offseg_file, 'offseg_t.pth'),
}


def save(state: dict, path) -> None:
    if path.suffix == '.safetensors':
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize('family', USER_FILES)
def test_user_checkpoint_loads_through_the_config(family, tmp_path, no_hub):
    """`backbone.pretrained: <file>` loads every weight of a published-format file, drops its classifier
    without a word, and never touches a hub."""
    variant, build_file, name = USER_FILES[family]
    source = BACKBONES[family](variant)
    saved, expected = build_file(variant, source, randomized(source))
    save(saved, tmp_path / name)
    cfg = yaml_config(tmp_path, {'type': family, 'variant': variant, 'pretrained': str(tmp_path / name)})
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a missing, unexpected or classifier key reported fails the test
        loaded = create_backbone(cfg).state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_efficientformerv2_imagenet_file_reports_only_the_segmentation_bias_tables(tmp_path, no_hub):
    """snap-research `eformer_s0_450.pth`: the classifier (`head`, `dist_head`, final `norm`) and the
    ImageNet bias tables are dropped silently. Such files have no segmentation bias tables
    (`attention_biases_seg`): those are the only keys reported, and they keep their zero init."""
    source = BACKBONES['efficientformerv2']('s0')
    saved, ours = offseg_file('s0', source, randomized(source))
    state = {
        k.removeprefix('backbone.'): v
        for k, v in saved['state_dict'].items()
        if not k.endswith(('attention_biases_seg', 'attention_bias_idxs_seg'))
    }
    width = source.out_channels[-1]
    state |= {
        'head.weight': torch.randn(1000, width),
        'head.bias': torch.randn(1000),
        'dist_head.weight': torch.randn(1000, width),
        'dist_head.bias': torch.randn(1000),
        'norm.weight': torch.randn(width),
        'norm.running_mean': torch.randn(width),
    }
    torch.save({'model': state}, tmp_path / 'eformer_s0_450.pth')
    cfg = yaml_config(
        tmp_path, {'type': 'efficientformerv2', 'variant': 's0', 'pretrained': str(tmp_path / 'eformer_s0_450.pth')}
    )
    with pytest.warns(UserWarning) as caught:
        loaded = create_backbone(cfg).state_dict()
    seg_tables = sorted(k for k in ours if k.endswith('attention_biases_seg'))
    assert len(seg_tables) == 5  # 2 + 2 attention blocks and the attention downsampler
    assert [str(w.message) for w in caught] == [
        f'{tmp_path / "eformer_s0_450.pth"}: 5 keys missing from the checkpoint: {", ".join(seg_tables)}'
    ]
    for key, value in ours.items():
        assert torch.equal(loaded[key], torch.zeros_like(value) if key in seg_tables else value), key


def test_hf_folder_loads_into_mit_b0(tmp_path, no_hub):
    """A Hugging Face folder (config.json + model.safetensors, as `save_pretrained` writes it) loads
    through `backbone.pretrained: <folder>`; the decode head is dropped silently."""
    hf = SegformerForSemanticSegmentation(SegformerConfig(num_labels=19))  # the default config is B0
    hf.load_state_dict(randomized(hf))
    folder = tmp_path / 'segformer-b0'
    hf.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {'config.json', 'model.safetensors'}
    cfg = yaml_config(tmp_path, {'type': 'mit', 'variant': 'b0', 'pretrained': str(folder)})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loaded = create_backbone(cfg).state_dict()
    expected = {f'segformer.{k}': v for k, v in hf.segformer.state_dict().items()}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# --- pretrained error cases ---------------------------------------------------------------------


def test_missing_pretrained_path_fails_when_the_config_is_read(tmp_path, no_hub):
    """A wrong path is an error naming it (nothing is downloaded instead), before any model is built."""
    missing = tmp_path / 'weights' / 'resnet18.pth'
    with pytest.raises(ConfigError, match=re.escape(f"backbone.pretrained '{missing}' not found")):
        yaml_config(tmp_path, {'type': 'resnet', 'variant': 18, 'pretrained': str(missing)})


def test_pretrained_file_gone_after_validation_fails_naming_it_before_any_weight_is_loaded(
    tmp_path, monkeypatch, no_hub
):
    """If the file disappears between reading the config and building, loading fails naming it."""
    missing = tmp_path / 'weights' / 'resnet18.pth'
    missing.parent.mkdir()
    missing.write_bytes(b'')
    cfg = yaml_config(tmp_path, {'type': 'resnet', 'variant': 18, 'pretrained': str(missing)})
    missing.unlink()
    loads = []
    monkeypatch.setattr(models.weights, 'load_into', lambda *args, **kwargs: loads.append(args))
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        create_backbone(cfg)
    assert not loads


def test_wrong_variant_is_a_shape_error(tmp_path):
    """ResNet-50 weights into a ResNet-18 fail loudly with the mismatched shapes, not a partial load."""
    with torch.device('meta'):
        resnet50 = timm.create_model('resnet50')
    torch.save(
        {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in resnet50.state_dict().items()}, tmp_path / 'resnet50.pth'
    )
    cfg = yaml_config(tmp_path, {'type': 'resnet', 'variant': 18, 'pretrained': str(tmp_path / 'resnet50.pth')})
    with pytest.raises(CheckpointError, match='shapes do not match') as error:
        create_backbone(cfg)
    assert 'layer1.0.conv1.weight: (64, 64, 1, 1) in file, (64, 64, 3, 3) in model' in str(error.value)


def test_unknown_keys_are_listed_in_a_warning(tmp_path):
    """Keys that are neither ours nor the classifier are named in one warning; the rest still loads."""
    source = BACKBONES['resnet']('18')
    saved, expected = resnet_timm_file('18', source, randomized(source))
    saved |= {'layer5.0.conv1.weight': torch.randn(8, 8, 1, 1), 'extra_scale': torch.ones(1)}
    torch.save(saved, tmp_path / 'resnet18_extra.pth')
    cfg = yaml_config(tmp_path, {'type': 'resnet', 'variant': 18, 'pretrained': str(tmp_path / 'resnet18_extra.pth')})
    with pytest.warns(UserWarning) as caught:
        loaded = create_backbone(cfg).state_dict()
    [message] = [str(w.message) for w in caught]
    # the keys are named as the converter renamed them (`body.extra_scale`), which still shows the file's names
    assert message.startswith(f'{tmp_path / "resnet18_extra.pth"}: 2 keys unexpected in the checkpoint: ')
    assert 'extra_scale' in message and 'layer5.0.conv1.weight' in message and 'fc.' not in message
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


# --- channels without weights -------------------------------------------------------------------


@pytest.mark.parametrize('family, variant', tiny_variants())
def test_backbone_channels_do_not_read_the_weights(family, variant, tmp_path, monkeypatch):
    """get_backbone_channels (used to size the heads) equals the built backbone's channels and never
    opens `pretrained`: here the file is gone and loading would fail."""
    path = tmp_path / 'weights.pth'
    torch.save({}, path)
    cfg = yaml_config(tmp_path, {'type': family, 'variant': variant, 'pretrained': str(path)})
    path.unlink()

    def fail(*args, **kwargs):
        raise AssertionError('get_backbone_channels loaded pretrained weights')

    monkeypatch.setattr(train, 'load_pretrained', fail)
    monkeypatch.setattr(models.weights, 'read_state_dict', fail)
    assert get_backbone_channels(cfg) == BACKBONES[family](variant).out_channels


def test_an_mmseg_resnet_v1c_backbone_loads_with_its_deep_stem():
    """mmseg's ResNetV1c keeps its deep stem in `stem.0-8` (conv, BN, ReLU three times); timm splits off
    the last BatchNorm as `bn1`. Every key of mmseg's layout maps to one of ours, so a DeepLab
    checkpoint loads whole."""
    backbone = BACKBONES['resnet']('50c')
    mmseg = {}
    for key, value in backbone.state_dict().items():
        key = key.removeprefix('body.')
        if key.startswith('conv1.'):
            key = 'stem.' + key.removeprefix('conv1.')
        elif key.startswith('bn1.'):
            key = 'stem.7.' + key.removeprefix('bn1.')
        mmseg[key] = value.clone()
    assert {'stem.0.weight', 'stem.1.running_mean', 'stem.6.weight', 'stem.7.weight', 'layer1.0.bn1.weight'} <= set(
        mmseg
    )
    converted = BACKBONES['resnet'].convert_checkpoint(mmseg)
    assert converted.keys() == backbone.state_dict().keys()
    assert all(torch.equal(converted[key], value) for key, value in backbone.state_dict().items())


WITH_CP = [
    ('resnet', {'variant': 18}, 64),
    ('convnext', {'variant': 'test'}, 64),
    ('mit', {'variant': 'test'}, 64),
    ('mscan', {'variant': 'test'}, 64),
    ('efficientformerv2', {'variant': 'test'}, 64),
    ('swin', {'variant': 'test'}, 64),
    ('dinov2', {'variant': 'test'}, 56),
    ('dinov3', {'variant': 'test'}, 64),
    ('dinov3_convnext', {'variant': 'test'}, 64),
]


@pytest.mark.parametrize('kind, options, side', WITH_CP, ids=[kind for kind, _, _ in WITH_CP])
def test_with_cp_recomputes_each_backbones_blocks_with_the_same_gradients_and_weights(kind, options, side):
    """One mechanism for every backbone (models/activation_checkpointing.py): its blocks run again in
    backward; gradients, state-dict keys and (where no BatchNorm is recomputed) BN statistics unchanged."""
    torch.manual_seed(0)
    plain = BACKBONES[kind](drop_path_rate=0.0, **options).train()
    recomputed = copy.deepcopy(plain)
    enable_activation_checkpointing(recomputed)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    wrapped = [m._checkpoint_wrapped_module for m in recomputed.modules() if isinstance(m, CheckpointWrapper)]
    calls = []
    wrapped[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, side, side)
    for model in (plain, recomputed):
        sum(f.square().mean() for f in model(x)).backward()
    assert len(calls) == 2, 'the block should run again in backward'
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    if not any(isinstance(m, torch.nn.BatchNorm2d) for block in wrapped for m in block.modules()):
        for key, value in recomputed.state_dict().items():
            assert torch.equal(value, plain.state_dict()[key]), key


def test_with_cp_is_a_backbone_key_of_every_config_and_the_old_name_still_reads(tmp_path):
    assert {kind for kind, _, _ in WITH_CP} == set(BACKBONES)  # each declares its checkpoint_blocks
    cfg = load_config(ROOT / 'configs' / 'camvid.yaml', ['backbone.checkpointing=true'])
    assert cfg['backbone']['with_cp'] is True and 'checkpointing' not in cfg['backbone']
    assert any(isinstance(m, CheckpointWrapper) for m in create_backbone(cfg).modules())
