"""Config loading: _base_ inheritance, --set overrides, and the validation messages users see."""

import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from datasets import DatasetError
from engine.config import ConfigError, parse_override
from engine.data import build_dataset
from engine.rules import load_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base_config(tmp_path):
    write(
        tmp_path / 'bases' / 'model.yaml',
        """
        backbone: {type: resnet, variant: 18, output_stride: 16}
        head: {type: aspp, channels: 32, dilations: [1, 2, 3]}
    """,
    )
    write(
        tmp_path / 'bases' / 'data.yaml',
        """
        data:
          type: demo
          root: data/demo
          num_classes: 5
          train:
            pipeline: [{type: random_flip, prob: 0.5}]
    """,
    )
    return write(
        tmp_path / 'run.yaml',
        """
        _base_: [bases/model.yaml, bases/data.yaml]
        head: {channels: 64}
        train: {max_iters: 10, batch_size: 2}
    """,
    )


def test_base_files_merge_recursively_and_later_wins(base_config):
    cfg = load_config(base_config)
    assert cfg['backbone'] == {
        'type': 'resnet',
        'variant': 18,
        'output_stride': 16,
        'pretrained': None,
        'frozen': False,
        'with_cp': False,
    }
    assert cfg['head'] == {'type': 'aspp', 'channels': 64, 'dilations': [1, 2, 3]}
    assert cfg['data']['train']['pipeline'] == [{'type': 'random_flip', 'prob': 0.5}]
    assert cfg['data']['val']['split'] == 'val'  # filled from the defaults
    assert cfg['train']['optimizer']['type'] == 'adamw'


def test_overrides_are_parsed_as_yaml_and_win(base_config):
    cfg = load_config(
        base_config, ['train.max_iters=200', 'head.dilations=[1, 6, 12]', 'eval.flip=true', 'head.type=deeplabv3']
    )
    assert cfg['train']['max_iters'] == 200
    assert cfg['head']['dilations'] == [1, 6, 12]
    assert cfg['eval']['flip'] is True
    assert cfg['head']['type'] == 'deeplabv3'
    assert parse_override('a.b.c=0.5') == {'a': {'b': {'c': 0.5}}}


@pytest.mark.parametrize(
    'override, message',
    [
        ('trian.max_iters=5', "unknown key 'trian' (did you mean 'train'?)"),
        ('train.max_iter=5', "unknown key 'train.max_iter' (did you mean 'max_iters'?)"),
        ('train.max_iters=abc', "'train.max_iters' must be int, got str 'abc'"),
        ('train.optimizer.lr=fast', "'train.optimizer.lr' must be float"),
        ('eval.mode=sliding', "'eval.mode' must be one of ['whole', 'slide'], got 'sliding' (did you mean 'slide'?)"),
        ('backbone.type=resnt', "'backbone.type' is 'resnt'; valid: resnet"),
        ('head.type=segfomer', "'head.type' is 'segfomer'; valid:"),
        ('head.chanels=8', "unknown key 'head.chanels' for DeepLabV3PlusHead"),
        ('head.channels=wide', "'head.channels' must be int, got str 'wide'"),
        ('backbone.output_stride=[8]', "'backbone.output_stride' must be int"),
        ('data.train.pipeline=[{type: random_flop}]', "'data.train.pipeline[0].type' is 'random_flop'"),
        ('data.train.pipeline=[{type: random_flip, p: 0.5}]', "unknown key 'data.train.pipeline[0].p' for RandomFlip"),
        ('data.type=ade', "'data.type' is 'ade'; valid:"),
        ('train.batch_size=null', "'train.batch_size' must be int"),
        ('device=cuda', "'device' is not a config key: the device is chosen on the command line: --device cuda"),
    ],
)
def test_invalid_configs_name_the_key_and_file(base_config, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(base_config, [override])
    assert message in str(error.value)
    assert str(base_config) in str(error.value)


def test_missing_required_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'backbone.type' is required"):
        load_config(write(tmp_path / 'a.yaml', 'head: {type: aspp}\n'))
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' not found"):
        load_config(tmp_path / 'nope.yaml')
    with pytest.raises(ConfigError, match='expected KEY=VALUE'):
        parse_override('train.max_iters')


def test_missing_dataset_folder_is_named(base_config, tmp_path):
    cfg = load_config(base_config, ['data.type=folder', f'data.root={tmp_path}/nowhere'])
    with pytest.raises(DatasetError, match=r"data folder '.*nowhere/images/train' not found"):
        build_dataset(cfg, 'train')


def test_cli_reports_a_misspelt_key_in_one_line_with_exit_code_2(tmp_path):
    config = write(
        tmp_path / 'typo.yaml',
        f"""
        _base_: {ROOT / 'configs' / 'demo.yaml'}
        head: {{chanels: 64}}
    """,
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / 'train.py'), '--config', str(config)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0, result.stderr
    assert "unknown key 'head.chanels'" in result.stderr and "did you mean 'channels'" in result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize(
    'override, message',
    [
        ('train.loss.ohem={thresh: 0.7, min_keep: 10}', "unknown key 'train.loss.ohem.min_keep'"),
        ('train.loss.class_weight=[1, 2]', "'train.loss.class_weight' has 2 values for data.num_classes 5"),
        ('train.param_groups={head: {lr_mul: 10}}', "unknown key 'train.param_groups.head.lr_mul'"),
    ],
)
def test_loss_and_param_group_mistakes_are_caught_with_the_config(override, message):
    with pytest.raises(ConfigError, match=f'demo.yaml: .*{re.escape(message)}'):
        load_config(str(ROOT / 'configs' / 'demo.yaml'), [override])
