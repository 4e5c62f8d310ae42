"""A new user's first hour: SegHiero's guide YAML as written, swapping a model part in one line, the
README's conversion command verbatim on a clean checkout, and logs that read well off a terminal."""

import re
import subprocess
import sys

import pytest
import timm
import torch
import yaml

import train
from conftest import INTERPRETER_DIR, ROOT, SHARED, load_vector
from engine.config import ConfigError
from engine.rules import load_config

GUIDE = sorted((SHARED / 'seeds').glob('004_*'))
DEEPLAB_CAMVID = ROOT / 'configs' / 'camvid_deeplabv3plus.yaml'  # a config with DeepLabV3+-only head keys

DATA = """
data:
  type: demo
  root: {root}
  num_classes: 5
  workers: 0
  train: {{pipeline: [{{type: random_crop, size: [64, 64]}}]}}
  val: {{pipeline: [{{type: resize, scale: [64, 64], keep_ratio: false}}], split: {val_split}}}
train: {{max_iters: 1, batch_size: 2, val_interval: 1}}
"""
VAL_IMAGES = 4
"""Of the demo scenes' 48 val images: validation is not what these tests are about."""


def guide_snippets() -> list:
    """The YAML blocks of SegHiero's architecture guide that configure a model."""
    if not GUIDE:
        return []
    blocks = re.findall(r'```yaml\n(.*?)```', GUIDE[0].read_text(), re.S)
    return [block for block in blocks if {'backbone', 'head'} & set(yaml.safe_load(block))]


def guide_config(tmp_path, snippet: str, data_root=None) -> str:
    """A whole run around a guide snippet: the defaults it leaves out are the guide's (ResNet, ASPP);
    its data the demo scenes at `data_root` (default: generated on first use in tmp_path), validated on
    VAL_IMAGES of them."""
    sections = yaml.safe_load(snippet)
    sections.setdefault('backbone', {'type': 'resnet', 'depth': 18})
    sections.setdefault('head', {'type': 'aspp'})
    path, val_split = tmp_path / 'guide.yaml', tmp_path / 'val.txt'
    val_split.write_text(''.join(f'val/{i:04d}\n' for i in range(VAL_IMAGES)))
    path.write_text(yaml.safe_dump(sections) + DATA.format(root=data_root or tmp_path / 'demo', val_split=val_split))
    return str(path)


@pytest.mark.skipif(not guide_snippets(), reason='SegHiero guide not available in ../shared/seeds')
@pytest.mark.parametrize('snippet', guide_snippets())
def test_every_guide_snippet_reads_and_names_its_conventional_weights(snippet, tmp_path, monkeypatch):
    """`pretrained: true` means the variant's conventional file under pretrained/, named when absent."""
    monkeypatch.chdir(tmp_path)
    config = guide_config(tmp_path, snippet)
    if 'pretrained: true' in snippet:
        with pytest.raises(
            ConfigError,
            match=r"backbone.pretrained 'pretrained/(resnet\d+|convnext_\w+|mit_b\d)"
            r"\.pth' not found",
        ):
            load_config(config)
    cfg = load_config(config, ['backbone.pretrained=null'])
    assert cfg['backbone']['type'] in ('resnet', 'convnext', 'mit')


@pytest.mark.skipif(not guide_snippets(), reason='SegHiero guide not available in ../shared/seeds')
@pytest.mark.parametrize('snippet', [s for s in guide_snippets() if 'mit-b5' not in s and 'depth: 101' not in s])
def test_every_guide_snippet_trains(snippet, tmp_path, monkeypatch, demo_root):
    """One iteration of each guide model (the largest, ResNet-101 and MiT-B5, only read: too slow here)."""
    monkeypatch.chdir(tmp_path)
    train.main(
        [
            '--config',
            guide_config(tmp_path, snippet, demo_root),
            '--work-dir',
            str(tmp_path / 'work'),
            '--device',
            'cpu',
            '--set',
            'backbone.pretrained=null',
        ]
    )
    assert (tmp_path / 'work' / 'best.pth').is_file()


def test_pretrained_true_loads_the_conventional_file_and_says_so(tmp_path, monkeypatch, demo_root):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'pretrained').mkdir()
    torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'pretrained' / 'resnet18.pth')
    config = guide_config(tmp_path, 'backbone: {type: resnet, depth: 18, pretrained: true}\n', demo_root)
    train.main(['--config', config, '--work-dir', str(tmp_path / 'work'), '--device', 'cpu'])
    log = (tmp_path / 'work' / 'train.log').read_text()
    assert re.search(r'loaded (\d+)/\1 tensors from pretrained/resnet18\.pth', log)


@pytest.mark.parametrize(
    'yaml_text, expected',
    [
        ('backbone: {type: segformer, variant: mit-b0}', {'type': 'mit', 'variant': 'b0'}),
        ('backbone: {type: mit, variant: mit-b2}', {'type': 'mit', 'variant': 'b2'}),
        ('backbone: {type: resnet, depth: 50}', {'type': 'resnet', 'variant': '50'}),
    ],
)
def test_seghiero_backbone_names(yaml_text, expected, tmp_path):
    cfg = load_config(guide_config(tmp_path, yaml_text))
    assert {k: cfg['backbone'][k] for k in expected} == expected


def test_proj_dim_is_the_heads_width(tmp_path):
    cfg = load_config(guide_config(tmp_path, 'head: {type: ultrafast_segformer, proj_dim: 128}'))
    assert cfg['head'] == {'type': 'ultrafast_segformer', 'channels': 128}
    with pytest.raises(ConfigError, match="'head.proj_dim' and 'head.channels' say the same thing"):
        load_config(guide_config(tmp_path, 'head: {type: segformer, proj_dim: 64, channels: 32}'))


# --- one-line swaps ---------------------------------------------------------------------------------


def test_changing_a_section_type_drops_the_keys_the_new_type_does_not_take():
    """camvid_deeplabv3plus.yaml's DeepLabV3+ keys (dilations, c1_channels) do not follow the head to SegFormer;
    the keys the new head takes (channels, dropout, offset_learning) do."""
    cfg = load_config(DEEPLAB_CAMVID, ['head.type=segformer'])
    assert 'dilations' not in cfg['head'] and cfg['head']['type'] == 'segformer'
    kept = load_config(DEEPLAB_CAMVID)['head']
    assert {k: v for k, v in kept.items() if k in ('channels', 'dropout', 'offset_learning')} == {
        k: v for k, v in cfg['head'].items() if k != 'type'
    }
    swapped = load_config(DEEPLAB_CAMVID, ['backbone.type=mit', 'backbone.variant=b0'])
    assert swapped['backbone'] == {
        'type': 'mit',
        'variant': 'b0',
        'pretrained': None,
        'frozen': False,
        'with_cp': False,
    }


def test_delete_replaces_a_section_instead_of_merging_into_it(tmp_path):
    child = tmp_path / 'child.yaml'
    child.write_text(f'_base_: {DEEPLAB_CAMVID}\nhead: {{_delete_: true, type: aspp}}\n')
    assert load_config(child)['head'] == {'type': 'aspp'}


def test_the_five_line_camvid_config_of_configs_readme_reads_as_written(tmp_path):
    """The block after "A CamVid experiment with any model is five lines", verbatim, saved beside configs/_base_."""
    text = (ROOT / 'configs' / 'README.md').read_text()
    block = re.search(r'A CamVid experiment with any model is five lines:\n\n```yaml\n(.*?)```', text, re.S).group(1)
    assert len(block.splitlines()) <= 5
    (tmp_path / '_base_').symlink_to(ROOT / 'configs' / '_base_')
    (tmp_path / 'mine.yaml').write_text(block)
    cfg = load_config(tmp_path / 'mine.yaml')
    assert cfg['data']['type'] == 'camvid' and cfg['data']['num_classes'] == 11
    assert cfg['backbone']['type'] == 'mit'


# --- the README's conversion command, verbatim ---------------------------------------------------


def test_the_readme_conversion_command_works_on_a_clean_checkout(tmp_path):
    """No pretrained/ folder, the published config as shipped: a converted checkpoint needs no ImageNet file."""
    command = next(
        line.strip()
        for line in (ROOT / 'README.md').read_text().splitlines()
        if line.strip().startswith('python tools/convert_checkpoint.py offseg-t_ade20k.pth')
    )
    vector = load_vector('offseg_t')
    torch.save({'state_dict': vector['state_dict'], 'meta': {}}, tmp_path / 'offseg-t_ade20k.pth')
    for folder in ('configs', 'tools'):
        (tmp_path / folder).symlink_to(ROOT / folder)
    result = subprocess.run(
        command.split(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={'PATH': INTERPRETER_DIR, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'},
        executable=sys.executable,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'work_dirs' / 'offseg_t.pth').is_file() and not (tmp_path / 'pretrained').exists()


# --- logs off a terminal ----------------------------------------------------------------------------


def test_training_off_a_terminal_logs_plain_lines_with_time_and_eta(tmp_path, demo_root):
    config = guide_config(tmp_path, 'backbone: {type: resnet, depth: 18}\n', demo_root)
    result = subprocess.run(
        [
            sys.executable,
            'train.py',
            '--config',
            config,
            '--work-dir',
            str(tmp_path / 'work'),
            '--device',
            'cpu',
            '--set',
            'train.max_iters=2',
            'train.log_interval=1',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'PATH': INTERPRETER_DIR},
    )
    assert result.returncode == 0, result.stderr
    assert '\r' not in result.stdout + result.stderr
    log = (tmp_path / 'work' / 'train.log').read_text()
    assert re.search(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  iter 1/2: loss .* eta 0:00:\d\d$', log, re.M)
