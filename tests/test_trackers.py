"""output.loggers: a tiny training reports its scalars, config and pictures to W&B (offline) and MLflow
(a file store) where those packages are installed; the choice is checked when the config is read."""

import importlib.util
import textwrap

import pytest
import yaml

import train
from conftest import TINY
from engine.config import ConfigError
from engine.rules import check_trackers_installed, load_config
from engine.trackers import missing_package


def tiny_run(tmp_path, demo_root, loggers: str) -> None:
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)) + f'output: {{loggers: {loggers}}}\n')
    train.main(['--config', str(config), '--work-dir', str(tmp_path / 'work'), '--device', 'cpu'])


def wandb_records(path) -> bytes:
    """The records of a W&B run file with their chunks joined. The file is a LevelDB-style log (a 7-byte
    header, then 32 KiB blocks of chunks with 7-byte headers), so a record, and a key in it, can straddle
    two blocks."""
    data, position, records, block = path.read_bytes(), 7, bytearray(), 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], 'little')
        records += data[position + 7 : position + 7 + length]
        position += 7 + length
    return bytes(records)


@pytest.mark.skipif(not importlib.util.find_spec('wandb'), reason='wandb not installed (requirements-trackers.txt)')
def test_a_wandb_offline_run_holds_the_scalars_the_config_and_the_pictures(tmp_path, demo_root, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    tiny_run(tmp_path, demo_root, '[wandb]')
    (run,) = (tmp_path / 'work' / 'wandb').glob('offline-run-*')
    records = wandb_records(next(run.glob('run-*.wandb')))  # protobuf: their keys and JSON values are plain
    assert all(key in records for key in (b'train/loss', b'train/lr', b'val/mIoU', b'val/IoU/disc'))
    assert b'{"max_iters":6,"batch_size":4' in records  # the config's values
    assert yaml.safe_load((run / 'files' / 'train_config.yaml').read_text())['train']['max_iters'] == 6
    assert list((run / 'files' / 'media' / 'images').glob('val/IoU_chart_*.png'))
    assert not (tmp_path / 'work' / 'tensorboard').exists()


@pytest.mark.skipif(not importlib.util.find_spec('mlflow'), reason='mlflow not installed (requirements-trackers.txt)')
def test_an_mlflow_file_store_holds_the_scalars_the_config_and_the_pictures(tmp_path, demo_root, monkeypatch):
    monkeypatch.setenv('MLFLOW_TRACKING_URI', f'file:{tmp_path / "mlruns"}')
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')  # MLflow 3 keeps its file store for such local use
    tiny_run(tmp_path, demo_root, '[tensorboard, mlflow]')
    (run,) = [path.parent for path in (tmp_path / 'mlruns').glob('*/*/meta.yaml') if path.parent.name != '0']
    assert yaml.safe_load((run / 'meta.yaml').read_text())['run_name'] == 'work'
    assert len((run / 'metrics' / 'train' / 'loss').read_text().splitlines()) == 3  # iterations 2, 4, 6
    assert (run / 'metrics' / 'val' / 'mIoU').is_file() and (run / 'params' / 'train.max_iters').read_text() == '6'
    assert (run / 'artifacts' / 'config.yaml').is_file() and list((run / 'artifacts' / 'images').rglob('*.png'))
    assert list((tmp_path / 'work' / 'tensorboard').glob('events.out.tfevents.*'))


def test_loggers_are_checked_when_the_config_is_read(tmp_path, demo_root, monkeypatch):
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)) + 'output: {loggers: [tensorbord]}\n')
    with pytest.raises(
        ConfigError, match=r"output.loggers: 'tensorbord' is not a tracker .*\(did you mean 'tensorboard'"
    ):
        load_config(config)
    monkeypatch.setattr('engine.trackers.importlib.util.find_spec', lambda name: None)
    assert missing_package('wandb') == 'wandb'
    with pytest.raises(
        ConfigError,
        match=r"names 'wandb', but the wandb package is not installed \(pip install -r requirements-trackers",
    ):
        check_trackers_installed(load_config(config, ['output.loggers=[wandb]']), str(config))
