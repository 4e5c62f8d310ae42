"""Hostile input through the public entry points: every bad value is one line and exit code 2 at the
door, and no command loses a file it did not create."""

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import train
from conftest import ROOT, TINY
from datasets.base import read_image
from engine import checkpoint as checkpoints
from engine.checkpoint import claim_work_dir, load_checkpoint, resume_checkpoint
from engine.cli import run_cli
from engine.config import BOUNDS, DEFAULTS, FREE_FORM, ConfigError
from engine.logger import validation_curve
from engine.rules import load_config, training_warnings
from models.weights import CheckpointError

DEMO = ROOT / 'configs' / 'demo.yaml'

TWO_ITERATIONS = ['--set', 'train.max_iters=2', 'train.val_interval=2']


def cli_error(main, argv, capsys) -> str:
    """Run a script's main through run_cli; assert exit code 2 and one line without a traceback; return it."""
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def fingerprints(folder) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished two-iteration run of the tiny config: its config and its work dir."""
    folder = tmp_path_factory.mktemp('trained')
    config = folder / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=folder / 'demo')))
    train.main(['--config', str(config), '--work-dir', str(folder / 'work'), '--device', 'cpu', *TWO_ITERATIONS])
    return config, folder / 'work'


@pytest.fixture(autouse=True)
def trained_run_unchanged(request):
    """Whatever a test does with the trained run (evaluate it, infer, export, copy, fail), every file
    that was there is byte-identical afterwards: commands write beside a run, never over it."""
    if 'trained' not in request.fixturenames:
        yield
        return
    folder = request.getfixturevalue('trained')[0].parent
    before = fingerprints(folder)
    yield
    after = fingerprints(folder)
    assert {path: after.get(path) for path in before} == before


# --- every documented key: a wrong kind or an out-of-range value is one ConfigError ----------------


def leaf_keys(schema: dict, prefix: str = ''):
    for key, value in schema.items():
        name = prefix + key
        if isinstance(value, dict) and name not in FREE_FORM:
            yield from leaf_keys(value, name + '.')
        else:
            yield name


def wrong_kind(name: str):
    """A value of the wrong kind for the key: a mapping where a scalar or list is expected, else a list."""
    default = DEFAULTS
    for part in name.split('.'):
        default = default[part] if isinstance(default, dict) else None
    return [1, 2] if isinstance(default, dict) or name in ('aux_head', 'paper', 'train.loss.ohem') else {'bad': 1}


def out_of_range(bounds) -> object:
    """A value breaking the first bound (a too-short list for a length bound)."""
    import annotated_types as at

    bound = bounds[0]
    return {
        at.Gt: lambda b: b.gt - 1,
        at.Ge: lambda b: b.ge - 1,
        at.Lt: lambda b: b.lt + 1,
        at.Le: lambda b: b.le + 1,
        at.Len: lambda b: [],
    }[type(bound)](bound)


def overrides_for(name: str, value) -> list:
    return [f'{name}={value!r}'.replace("'", '"') if not isinstance(value, dict) else f'{name}={{bad: 1}}']


@pytest.mark.parametrize('name', sorted(set(leaf_keys(DEFAULTS))))
def test_a_wrong_kind_of_value_for_any_key_is_one_config_error(name):
    with pytest.raises(ConfigError) as error:
        load_config(DEMO, overrides_for(name, wrong_kind(name)))
    assert '\n' not in str(error.value) and 'demo.yaml' in str(error.value)
    assert name.split('.')[-1] in str(error.value) or name.split('.')[0] in str(error.value)


@pytest.mark.parametrize('name', sorted(BOUNDS))
def test_an_out_of_range_value_for_any_bounded_key_is_one_config_error(name):
    value = out_of_range(BOUNDS[name])
    with pytest.raises(ConfigError, match=re.escape(f"'{name}' must be")) as error:
        load_config(DEMO, [f'{name}={value}'])
    assert '\n' not in str(error.value)


@pytest.mark.parametrize(
    'override, message',
    [
        ('train.grad_clip=-1', "'train.grad_clip' must be a number > 0, got -1"),
        ('train.max_iters=0', "'train.max_iters' must be a number >= 1, got 0"),
        ('train.ema_decay=1.5', "'train.ema_decay' must be a number < 1"),
        ('data.mean=[1, 2]', 'data.mean has 2 values for data.in_channels 3: give one per band'),
        ('data.std=[1, 0, 1]', "'data.std' must be a list of numbers, each a number > 0"),
        ('eval.stride=[0, 8]', "'eval.stride' must be a list of numbers, each a number >= 1"),
        (
            'data.train.pipeline=[{type: random_resize, scale: [64, 64], ratio_range: [2.0, 0.5]}]',
            "'data.train.pipeline[0].ratio_range' must be an increasing pair",
        ),
        ('data.train.pipeline=[{type: random_flip, prob: 1.5}]', "'data.train.pipeline[0].prob' must be a number <= 1"),
        ('data.train.pipeline=[{type: random_crop}]', "'data.train.pipeline[0]' (RandomCrop) needs 'size'"),
        (
            'data.train.pipeline=[{type: albumentations, transforms: [{type: OneOf, transforms: [{type: Blurr}]}]}]',
            "data.train.pipeline: albumentations has no transform 'Blurr'",
        ),
        (
            'data.train.pipeline=[{type: albumentations, transforms: [{type: GaussNoise, sigma: 3}]}]',
            "albumentations GaussNoise has no argument 'sigma' (accepts: std_range",
        ),
        (
            'data.train.pipeline=[{type: albumentations, transforms: [{type: GaussNoise, p: 2}]}]',
            'albumentations GaussNoise: p: Input should be less than or equal to 1',
        ),
        ('eval.mode=slide', "eval.mode 'slide' needs eval.crop_size and eval.stride"),
        ('data.ignore_index=2', 'data.ignore_index 2 is a class id'),
        ('backbone.variant=b9', "ResNet variant 'b9' unknown"),
        ('head={type: ham, in_index: [1, 2, 5]}', 'head (ham) cannot be built or run with this config'),
        # infinities pass any '> 0' bound: every number must be finite
        ('train.schedule.power=.inf', "'train.schedule.power' must be a finite number, got inf"),
        ('data.std=[.inf, 1, 1]', "'data.std[0]' must be a finite number, got inf"),
        ('train.optimizer.lr=.nan', "'train.optimizer.lr' must be a finite number, got nan"),
        ('train.loss.ce=.inf', "'train.loss.ce' must be a finite number, got inf"),
        ('head.dropout=.inf', "'head.dropout' must be a finite number, got inf"),
        ('train.seed=99999999999999999999', "'train.seed' must be a number < 4294967296"),
        ('aux_head={type: fcn, loss_weight: -0.4}', "'aux_head.loss_weight' must be a number >= 0, got -0.4"),
        ('head.loss_weight=2', "unknown key 'head.loss_weight'"),
    ],
)
def test_bad_values_are_named_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DEMO, [override])


def test_a_backbone_whose_strides_the_head_cannot_take_fails_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r'head \(offseg\) cannot be built or run with this config: FreqFusion'):
        load_config(DEMO, ['backbone={type: resnet, variant: 18, output_stride: 16}', 'head={type: offseg}'])


# --- never lose data -------------------------------------------------------------------------------


def test_a_fresh_run_in_a_work_dir_with_checkpoints_is_refused_and_changes_nothing(trained, capsys):
    config, work = trained
    before = fingerprints(work)
    line = cli_error(train.main, ['--config', str(config), '--work-dir', str(work), '--device', 'cpu'], capsys)
    assert str(work) in line and '--resume auto' in line and '--overwrite' in line
    assert fingerprints(work) == before


def test_overwrite_starts_afresh_removing_only_what_the_run_wrote(trained, tmp_path):
    """--overwrite removes the checkpoints the earlier run named in its manifest; a user's file that
    looks like one (`iter_backup.pth`) stays as it was, and --resume auto never takes it for a checkpoint."""
    config, work = trained
    copy_dir = tmp_path / 'again'
    shutil.copytree(work, copy_dir)
    (copy_dir / 'iter_backup.pth').write_bytes((work / 'best.pth').read_bytes())
    kept = fingerprints(copy_dir)[copy_dir / 'iter_backup.pth']
    run = ['--config', str(config), '--work-dir', str(copy_dir), '--device', 'cpu', *TWO_ITERATIONS]
    train.main([*run, '--overwrite'])
    assert sorted(p.name for p in copy_dir.glob('*.pth')) == [
        'best.pth',
        'iter_000002.pth',
        'iter_backup.pth',
        'last.pth',
    ]
    assert fingerprints(copy_dir)[copy_dir / 'iter_backup.pth'] == kept
    records = (copy_dir / 'metrics.jsonl').read_text().splitlines()  # the new run's alone
    assert sum('"tag": "start"' in record for record in records) == 1
    assert resume_checkpoint('auto', copy_dir)[0] == copy_dir / 'last.pth'
    (copy_dir / 'last.pth').unlink()
    assert resume_checkpoint('auto', copy_dir)[0] == copy_dir / 'iter_000002.pth'


def test_overwrite_refuses_checkpoint_files_no_run_recorded(trained, tmp_path, capsys):
    config, work = trained
    folder = tmp_path / 'copied'
    folder.mkdir()
    (folder / 'best.pth').write_bytes((work / 'best.pth').read_bytes())  # copied by hand: no manifest
    before = fingerprints(folder)
    run = ['--config', str(config), '--work-dir', str(folder), '--device', 'cpu', *TWO_ITERATIONS]
    line = cli_error(train.main, [*run, '--overwrite'], capsys)
    assert 'no run recorded' in line and 'best.pth' in line
    assert {path: fingerprints(folder)[path] for path in before} == before  # (a lock file is added)


def test_resume_auto_with_no_intact_training_checkpoint_stops_and_keeps_the_best(trained, tmp_path, capsys):
    config, work = trained
    folder = tmp_path / 'damaged'
    shutil.copytree(work, folder)
    for path in folder.glob('*.pth'):
        if path.name != 'best.pth':
            path.write_bytes(b'cut short')
    before = fingerprints(folder)
    run = ['--config', str(config), '--work-dir', str(folder), '--device', 'cpu', *TWO_ITERATIONS]
    line = cli_error(train.main, [*run, '--resume', 'auto'], capsys)
    assert 'no intact training checkpoint' in line and 'best.pth' in line and 'nothing was changed' in line
    assert fingerprints(folder) == before


def test_resume_auto_after_a_kill_before_the_first_checkpoint_starts_again(trained, tmp_path):
    """A run killed before it wrote a checkpoint left only its metrics.jsonl: --resume auto runs it from
    the start (there is nothing to lose), and the restarted run's records are the ones read back."""
    config, work = trained
    folder = tmp_path / 'killed_early'
    shutil.copytree(work, folder)
    for path in folder.glob('*.pth'):
        path.unlink()
    run = ['--config', str(config), '--work-dir', str(folder), '--device', 'cpu', *TWO_ITERATIONS]
    train.main([*run, '--resume', 'auto'])
    records = (folder / 'metrics.jsonl').read_text().splitlines()
    assert sum('"tag": "start"' in record for record in records) == 2
    assert validation_curve(folder) == validation_curve(work)
    assert (folder / 'last.pth').is_file()


def test_two_runs_in_one_work_dir_are_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from engine.checkpoint import claim_work_dir
        lock = claim_work_dir(Path({str(tmp_path)!r}), False, False)
        print('locked', flush=True)
        time.sleep(60)"""),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(CheckpointError, match='in use by another training run'):
        claim_work_dir(tmp_path, False, False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    claim_work_dir(tmp_path, False, False).close()  # the kernel released the killed run's lock


def test_a_full_disk_names_the_file_and_keeps_the_earlier_checkpoints(trained, tmp_path, monkeypatch, capsys):
    config, work = trained
    run_dir = tmp_path / 'full'
    run_dir.mkdir()
    (run_dir / 'last.pth').write_bytes((work / 'iter_000002.pth').read_bytes())
    real_save = torch.save

    def fill_disk(state, file):
        real_save(state, file)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(checkpoints.torch, 'save', fill_disk)
    line = cli_error(
        train.main,
        [
            '--config',
            str(config),
            '--work-dir',
            str(run_dir),
            '--device',
            'cpu',
            '--resume',
            'auto',
            '--set',
            'train.max_iters=4',
            'train.val_interval=2',
        ],
        capsys,
    )
    # best.pth or iter_000004.pth, whichever this run writes first at iteration 4
    assert re.search(
        rf"cannot write '{re.escape(str(run_dir))}/(best|iter_000004)\.pth': no space left on device", line
    )
    monkeypatch.setattr(checkpoints.torch, 'save', real_save)
    assert load_checkpoint(run_dir / 'last.pth')['iteration'] == 2
    assert not list(run_dir.glob('.*.pth.*'))  # no half-written file left behind


# --- nothing silent --------------------------------------------------------------------------------


def test_a_run_with_no_valid_label_pixel_says_so_and_names_no_unwritten_checkpoint(tmp_path):
    for split in ('train', 'val'):
        (tmp_path / 'images' / split).mkdir(parents=True)
        (tmp_path / 'annotations' / split).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / 'images' / split / f'{i}.png'), np.full((32, 32, 3), 60 * i, np.uint8))
            cv2.imwrite(str(tmp_path / 'annotations' / split / f'{i}.png'), np.full((32, 32), 255, np.uint8))
    config = tmp_path / 'ignored.yaml'
    config.write_text(
        textwrap.dedent(f"""
        backbone: {{type: resnet, variant: test}}
        head: {{type: aspp, channels: 16, dilations: [1, 2], c1_channels: 8}}
        data: {{type: folder, root: {tmp_path}, num_classes: 3, workers: 0}}
        train: {{max_iters: 1, batch_size: 2}}
        """)
    )
    train.main(['--config', str(config), '--work-dir', str(tmp_path / 'work'), '--device', 'cpu'])
    log = (tmp_path / 'work' / 'train.log').read_text()
    assert 'no valid label pixel in the validation set' in log
    assert 'no best.pth' in log and not (tmp_path / 'work' / 'best.pth').exists()


def demo_run_with_weights(tmp_path, weights, *overrides) -> list:
    """train.py's arguments for the demo config in tmp_path with `backbone.pretrained` set to `weights`."""
    return [
        '--config',
        str(DEMO),
        '--work-dir',
        str(tmp_path / 'w'),
        '--device',
        'cpu',
        '--set',
        f'backbone.pretrained={weights}',
        f'data.root={tmp_path / "demo"}',
        *overrides,
    ]


def test_pretrained_weights_that_match_nothing_are_an_error(tmp_path, capsys):
    weights = tmp_path / 'other.pth'
    torch.save({'encoder.layer.0.weight': torch.zeros(3, 3)}, weights)
    line = cli_error(
        train.main,
        demo_run_with_weights(tmp_path, weights),
        capsys,
    )
    assert str(weights) in line and 'none of its 1 tensors fits' in line


def test_a_partial_pretrained_match_is_listed_in_train_log(tmp_path):
    weights = tmp_path / 'resnet18.pth'
    state = timm.create_model('resnet18').state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith('layer4.')}, weights)
    train.main(demo_run_with_weights(tmp_path, weights, 'train.max_iters=1', 'data.workers=0'))
    log = (tmp_path / 'w' / 'train.log').read_text()
    assert re.search(rf'loaded (\d+)/(?!\1)\d+ tensors from {re.escape(str(weights))}', log)
    assert re.search(r'warning: .*resnet18\.pth: \d+ keys missing from the checkpoint: body\.layer4\.', log)


def test_the_converter_refuses_a_file_that_matches_no_tensor(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / 'tools'))
    import convert_checkpoint

    source = tmp_path / 'segformer.pth'
    torch.save({'state_dict': {'decode_head.unrelated.weight': torch.zeros(2)}}, source)
    line = cli_error(
        convert_checkpoint.main,
        [str(source), str(tmp_path / 'out.pth'), '--config', str(ROOT / 'configs' / 'segnext_t.yaml')],
        capsys,
    )
    assert 'none of its' in line and not (tmp_path / 'out.pth').exists()


def test_resume_of_weights_only_says_load_from(trained, tmp_path, capsys):
    config, work = trained
    line = cli_error(
        train.main,
        [
            '--config',
            str(config),
            '--work-dir',
            str(tmp_path / 'w'),
            '--device',
            'cpu',
            '--resume',
            str(work / 'best.pth'),
        ],
        capsys,
    )
    assert 'weights only' in line and f'--load-from {work / "best.pth"}' in line


def test_resume_takes_a_folder_and_falls_back_from_a_damaged_last(trained, tmp_path, caplog):
    _, work = trained
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'iter_000002.pth').write_bytes((work / 'iter_000002.pth').read_bytes())
    (run_dir / 'last.pth').write_bytes(b'cut short by a crash')
    with caplog.at_level('WARNING'):
        path, checkpoint = resume_checkpoint(str(run_dir), run_dir)
    assert path == run_dir / 'iter_000002.pth' and checkpoint['iteration'] == 2
    assert 'last.pth' in caplog.text and 'trying an older checkpoint' in caplog.text


def test_evaluate_uses_the_given_config_when_the_checkpoint_stores_none(trained, tmp_path, capsys):
    import evaluate

    config, work = trained
    bare = tmp_path / 'bare.pth'
    torch.save({'model': load_checkpoint(work / 'best.pth')['model']}, bare)
    line = cli_error(evaluate.main, ['--checkpoint', str(bare), '--device', 'cpu'], capsys)
    assert 'stores no config' in line and '--config' in line
    evaluate.main(['--checkpoint', str(bare), '--config', str(config), '--device', 'cpu'])
    assert 'mIoU' in capsys.readouterr().out


def test_an_exif_rotated_jpeg_keeps_the_size_of_its_label(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.fromarray(pixels).save(tmp_path / 'rotated.jpg', exif=exif)
    assert read_image(tmp_path / 'rotated.jpg').shape[:2] == (20, 40)


@pytest.mark.parametrize(
    'script, argv, message',
    [
        ('export_onnx', ['--checkpoint', 'x.pth', '--output', 'x.onnx', '--size', '0', '512'], '--size: must be >= 32'),
        ('benchmark', ['--config', 'x.yaml', '--runs', '0'], '--runs: must be >= 1'),
        ('evaluate', ['--checkpoint', 'x.pth', '--scales', '-1'], '--scales: must be >= 0.01'),
    ],
)
def test_numeric_command_line_options_are_range_checked(script, argv, message, capsys):
    sys.path.insert(0, str(ROOT / 'tools'))
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_evaluate_refuses_an_onnx_file_that_is_not_an_export_in_one_line(tmp_path, capsys):
    import evaluate

    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper

    tensor = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 8, 8]) for name in ('x', 'y')]
    graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'other', tensor[:1], tensor[1:])
    path = tmp_path / 'other.onnx'
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=9), str(path))
    assert 'not a graph of tools/export_onnx.py' in cli_error(evaluate.main, ['--onnx', str(path)], capsys)
    (tmp_path / 'broken.onnx').write_bytes(b'not onnx')
    line = cli_error(evaluate.main, ['--onnx', str(tmp_path / 'broken.onnx')], capsys)
    assert 'broken.onnx: ONNX Runtime cannot load it' in line


def write_config(folder, text: str, encoding: str = 'utf-8'):
    path = folder / 'config.yaml'
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    'content, message',
    [
        (
            f'_base_: {DEMO}\ntrain:\n  max_iters: 5\n  max_iters: 6\n',
            "line 4: not valid YAML (key 'max_iters' appears twice",
        ),
        ('_base_: 5\n', "'_base_' must be a file name or a list of them, got 5"),
        ('# caf\xe9 au lait\ntrain: {max_iters: 5}\n'.encode('latin-1'), 'not a UTF-8 text file (byte 5)'),
        (bytes(range(256)), 'not a UTF-8 text file'),
    ],
    ids=['duplicate key', 'base not a file name', 'latin-1', 'binary'],
)
def test_a_config_file_that_is_not_clean_yaml_is_one_line(content, message, tmp_path, capsys):
    path = tmp_path / 'config.yaml'
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = cli_error(train.main, ['--config', str(path), '--work-dir', str(tmp_path / 'work')], capsys)
    assert str(path) in line and message in line


def test_mask2former_refuses_per_pixel_loss_settings_it_would_ignore():
    with pytest.raises(ConfigError, match=re.escape('train.loss.dice set, but the mask2former head trains')):
        load_config(ROOT / 'configs' / 'mask2former_camvid.yaml', ['train.loss.dice=1.0'])


def test_export_refuses_to_write_over_the_checkpoint_or_a_users_file(trained, tmp_path, capsys):
    from tools import export_onnx

    _, work = trained
    before = fingerprints(work)
    line = cli_error(
        export_onnx.main, ['--checkpoint', str(work / 'best.pth'), '--output', str(work / 'best.pth')], capsys
    )
    assert f"--output '{work / 'best.pth'}' is already there and is not a graph of tools/export_onnx.py" in line
    notes = tmp_path / 'notes.onnx'
    notes.write_text('my notes')
    line = cli_error(export_onnx.main, ['--checkpoint', str(work / 'best.pth'), '--output', str(notes)], capsys)
    assert 'not a graph of tools/export_onnx.py' in line and notes.read_text() == 'my notes'
    assert fingerprints(work) == before and sorted(p.name for p in tmp_path.iterdir()) == ['notes.onnx']


def test_evaluate_show_dir_never_replaces_a_users_picture(trained, tmp_path, capsys):
    import evaluate

    _, work = trained
    show = tmp_path / 'show'
    show.mkdir()
    argv = ['--checkpoint', str(work / 'best.pth'), '--device', 'cpu', '--work-dir', str(tmp_path), '--show-limit', '1']
    evaluate.main([*argv, '--show-dir', str(show)])
    (picture,) = [p for p in show.iterdir() if p.suffix == '.png']
    evaluate.main([*argv, '--show-dir', str(show)])  # its own earlier picture: written again
    theirs = tmp_path / 'theirs'
    theirs.mkdir()
    (theirs / picture.name).write_bytes(b'a picture of mine')
    line = cli_error(evaluate.main, [*argv, '--show-dir', str(theirs)], capsys)
    assert f"'{theirs / picture.name}' is already there and was not written by this command" in line
    assert (theirs / picture.name).read_bytes() == b'a picture of mine'


@pytest.mark.parametrize('inputs', ['empty', 'unreadable', 'video'])
def test_infer_with_no_image_to_predict_is_an_error(inputs, trained, tmp_path, capsys):
    import infer

    _, work = trained
    folder = tmp_path / 'in'
    folder.mkdir()
    if inputs == 'unreadable':
        (folder / 'a.jpg').write_bytes(b'not a jpeg')
    if inputs == 'video':
        (folder / 'clip.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42')
    argv = ['--checkpoint', str(work / 'best.pth'), '--input', str(folder), '--output', str(tmp_path / 'out')]
    line = cli_error(infer.main, [*argv, '--device', 'cpu'], capsys)
    assert f"--input '{folder}'" in line and ('no image files' in line or 'none of its 1 image files' in line)


def test_infer_follows_a_linked_sub_folder(trained, tmp_path):
    import infer

    _, work = trained
    real = tmp_path / 'elsewhere'
    real.mkdir()
    cv2.imwrite(str(real / 'a.png'), np.zeros((32, 32, 3), np.uint8))
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'linked').symlink_to(real)
    (tmp_path / 'in' / 'loop').symlink_to(tmp_path / 'in')  # a cycle is searched once
    infer.main(
        [
            '--checkpoint',
            str(work / 'best.pth'),
            '--input',
            str(tmp_path / 'in'),
            '--output',
            str(tmp_path / 'out'),
            '--device',
            'cpu',
        ]
    )
    assert (tmp_path / 'out' / 'linked' / 'a.png').is_file()


def test_the_converter_refuses_a_file_that_does_not_fit_the_config_and_writes_nothing(tmp_path, capsys):
    """Published SegFormer-B0 weights offered to the +OL config: its classifier does not fit. Refused
    without --partial; with it, written and the misfits listed."""
    from conftest import load_vector
    from tools import convert_checkpoint

    source, target = tmp_path / 'segformer_b0_mmseg.pth', tmp_path / 'converted.pth'
    torch.save({'state_dict': load_vector('segformer_b0')['state_dict']}, source)
    argv = [str(source), str(target), '--config', str(ROOT / 'configs' / 'segformer_b0_ol.yaml')]
    line = cli_error(convert_checkpoint.main, [*argv, '--set', 'backbone.pretrained=null'], capsys)
    assert 'does not fit' in line and 'nothing written' in line and '--partial' in line
    assert not target.exists()
    convert_checkpoint.main([*argv, '--partial'])
    assert 'note: ' in capsys.readouterr().out and target.is_file()


def test_cuda_asked_for_on_a_machine_without_it_is_one_line(trained, capsys):
    import evaluate

    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    _, work = trained
    line = cli_error(evaluate.main, ['--checkpoint', str(work / 'best.pth'), '--device', 'cuda'], capsys)
    assert '--device cuda: CUDA is not available' in line


@pytest.mark.parametrize('kind', ['a file', 'read-only'])
def test_a_work_dir_that_cannot_be_written_is_one_line(kind, trained, tmp_path, capsys):
    config, _ = trained
    if kind == 'a file':
        work = tmp_path / 'taken'
        work.write_text('a file where the work dir would be')
        target = work / 'run'
    else:
        work = tmp_path / 'locked'
        work.mkdir()
        work.chmod(0o500)
        target = work / 'run'
        if os.access(work, os.W_OK):  # root writes anywhere
            pytest.skip('this user can write to read-only folders')
    line = cli_error(train.main, ['--config', str(config), '--work-dir', str(target), '--device', 'cpu'], capsys)
    assert f'cannot use {target} as the work dir' in line


def test_a_disk_filling_up_during_training_is_one_line_and_keeps_what_was_there(trained, tmp_path, capsys):
    """A real full disk (a 2 MB tmpfs): torch.save fails inside its zip writer, and the run still ends
    with one line naming the checkpoint, no half-written file, and the TensorBoard flush error does
    not replace it."""
    config, _ = trained
    mount_point = tmp_path / 'small'
    mount_point.mkdir()
    if subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        work = mount_point / 'work'
        line = cli_error(
            train.main, ['--config', str(config), '--work-dir', str(work), '--device', 'cpu', *TWO_ITERATIONS], capsys
        )
        assert re.search(
            rf"cannot write '{re.escape(str(work))}/(best|iter_000002)\.pth': no space left on device", line
        )
        assert not list(work.glob('.*.pth.*'))
    finally:
        subprocess.run(['umount', str(mount_point)], check=True)


def test_a_warm_up_longer_than_the_run_is_a_warning_in_train_log():
    """It runs (a smoke test of a published recipe for a few iterations is legitimate), but says so."""
    (warning,) = training_warnings(load_config(DEMO, ['train.max_iters=20']))
    assert 'train.schedule.warmup_iters (50) is not below train.max_iters (20)' in warning
    assert training_warnings(load_config(DEMO)) == []


def test_deeplab_dilations_meant_for_another_output_stride_are_a_warning():
    """The demo's DeepLabV3+ (output stride 16, dilations up to 18) put on an undilated ResNet."""
    (warning,) = training_warnings(load_config(DEMO, ['backbone.output_stride=32']))
    assert 'head.dilations [1, 6, 12, 18] at output stride 32 reach 576 input pixels' in warning
    scaled = ['backbone.output_stride=32', 'head.dilations=[1,3,6,9]']
    assert training_warnings(load_config(DEMO, scaled)) == []


def test_evaluate_refuses_a_graph_whose_classes_are_not_the_configs(trained, tmp_path, capsys):
    import evaluate
    from tools import export_onnx

    pytest.importorskip('onnxruntime')
    _, work = trained
    graph = tmp_path / 'tiny.onnx'
    export_onnx.main(['--checkpoint', str(work / 'best.pth'), '--output', str(graph), '--size', '64', '64'])
    line = cli_error(evaluate.main, ['--onnx', str(graph), '--set', 'data.num_classes=3'], capsys)
    assert f'{graph} scores 5 classes, the config 3 (data.num_classes)' in line


def test_batchnorm_with_one_image_per_process_is_refused_before_training(trained, tmp_path, capsys):
    """ASPP's image pooling normalises a 1x1 map: one image per process cannot train it (here batch 1;
    under torchrun, batch 8 over 8 processes)."""
    config, _ = trained
    argv = ['--config', str(config), '--work-dir', str(tmp_path / 'work'), '--device', 'cpu']
    line = cli_error(train.main, [*argv, '--set', 'train.batch_size=1'], capsys)
    assert 'BatchNorm over a 1x1 map cannot train on 1 image(s) per process' in line
    assert not (tmp_path / 'work').exists()


def test_benchmark_results_replace_their_own_files_and_refuse_a_users(tmp_path):
    from engine.outputs import OutputError, write_results

    write_results(tmp_path, {'table.md': 'first\n'})
    write_results(tmp_path, {'table.md': 'second\n'})
    assert (tmp_path / 'table.md').read_text() == 'second\n'
    (tmp_path / 'notes.md').write_text('mine')
    with pytest.raises(OutputError, match=r"notes\.md' is already there and was not written by this command"):
        write_results(tmp_path, {'table.md': 'third\n', 'notes.md': 'theirs'})
    assert (tmp_path / 'notes.md').read_text() == 'mine' and (tmp_path / 'table.md').read_text() == 'second\n'


def test_a_library_warning_under_a_script_is_one_line(capsys):
    def main():
        warnings.warn('a library has something to say', UserWarning, stacklevel=1)

    run_cli(main)
    assert capsys.readouterr().err == 'warning: a library has something to say\n'


def test_written_files_get_the_mode_of_any_new_file_not_mkstemps_private_one(tmp_path):
    from engine.outputs import write_text

    write_text(tmp_path / 'result.json', '{}')
    (tmp_path / 'plain.txt').write_text('{}')
    assert (tmp_path / 'result.json').stat().st_mode == (tmp_path / 'plain.txt').stat().st_mode
