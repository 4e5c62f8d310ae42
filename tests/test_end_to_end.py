"""The product path on a tiny run: train.py -> checkpoints -> evaluate.py -> infer.py."""

import json
import re
import shutil
import textwrap

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import evaluate
import infer
import train
from conftest import ROOT, TINY
from datasets.base import DatasetError
from datasets.sampler import TrainSampler
from engine import cli
from engine.checkpoint import load_checkpoint, remove_partial_writes, save_iteration_checkpoint
from engine.cli import config_for_checkpoint, cpu_computes
from engine.config import ConfigError, resolve
from engine.data import build_dataset
from engine.inference import eval_pipeline, normalize
from engine.logger import read_metrics, validation_curve
from engine.losses import build_criterion
from engine.optim import build_optimizer
from engine.outputs import OutputError
from engine.rules import load_config
from engine.training import per_process_batch
from engine.visualize import ROW
from models import Segmentor
from models.weights import CheckpointError, load_model_weights, load_weights_from
from tools import browse_dataset, export_onnx, label_stats, plot_logs, print_config
from tools.measure import build_model, random_weights_config, train_call


def train_tiny(folder, config_template: str):
    """Train `config_template` (with {root}: the demo data under `folder`) as folder/tiny.yaml into folder/work."""
    config = folder / 'tiny.yaml'
    config.write_text(textwrap.dedent(config_template.format(root=folder / 'demo')))
    train.main(['--config', str(config), '--work-dir', str(folder / 'work'), '--device', 'cpu'])
    return folder


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Train the tiny config once; the tests below inspect what it left behind (iter_000003.pth is the
    resume test's starting point)."""
    return train_tiny(tmp_path_factory.mktemp('run'), TINY)


def test_training_writes_checkpoints_logs_and_config(run, capsys):
    work = run / 'work'
    for name in ('iter_000003.pth', 'iter_000006.pth', 'last.pth', 'best.pth', 'config.yaml', 'train.log'):
        assert (work / name).is_file(), name
    assert (work / 'last.pth').samefile(work / 'iter_000006.pth')
    assert list((work / 'tensorboard').glob('events.out.tfevents.*'))
    checkpoint = load_checkpoint(work / 'last.pth')  # torch.load(..., weights_only=True)
    assert checkpoint['iteration'] == 6
    assert {'model', 'ema', 'config', 'optimizer', 'scheduler', 'scaler', 'rng', 'best'} <= checkpoint.keys()
    assert checkpoint['config']['data']['class_names'] == ['ground', 'disc', 'box', 'triangle', 'ring']
    log = (work / 'train.log').read_text()
    assert 'iter 3: mIoU' in log and 'iter 6: mIoU' in log and 'iter 2/6: loss ' in log
    assert re.search(
        r'\n\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  iter 2/6: .* images/s  data [\d.]+ s/iter  memory \d+ MiB', log
    )
    assert f'done: best mIoU {checkpoint["best"]["model"]["miou"]:.2f}' in log and 'best.pth' in log
    shares = re.search(
        r'time in the loop: [\d.]+ min; steps ([\d.]+)% \(waiting for data ([\d.]+)%\), validation and '
        r'checkpoints ([\d.]+)%, logging ([\d.]+)%, the rest (-?[\d.]+)%\n',
        log,
    )
    parts = [float(share) for share in shares.groups()]
    assert parts[1] <= parts[0] and parts[2] > 0 and sum(parts) - parts[1] == pytest.approx(100, abs=0.3)
    [seconds] = [record for record in read_metrics(work) if record['tag'] == 'time']  # the same, in seconds
    assert seconds['steps (s)'] + seconds['validation and checkpoints (s)'] <= seconds['total (s)']


def test_training_records_every_logged_number_in_metrics_jsonl(run):
    """What scripts read instead of train.log: the start, the loss terms every log_interval (2), each
    validation's scores with their per-class values, and where the time went; the best mIoU is the
    checkpoint's."""
    records = read_metrics(run / 'work')
    tags = [(r['iteration'], r['tag']) for r in records]
    assert tags == [(0, 'start'), (2, 'train'), (3, 'val'), (4, 'train'), (6, 'train'), (6, 'val'), (6, 'time')]
    train_record = next(r for r in records if r['tag'] == 'train')
    assert {'loss', 'ce', 'lr', 'images_per_s', 'data_s_per_iter', 'memory/peak_rss_mib'} <= train_record.keys()
    assert train_record['loss'] > 0
    # poly (power 1) over 6 iterations from the default lr: the 6th step took lr x 1/6, not the 0 after it
    assert [r['lr'] for r in records if r['tag'] == 'train'] == pytest.approx([6e-5 * 5 / 6, 6e-5 * 3 / 6, 6e-5 / 6])
    scores = validation_curve(run / 'work')
    assert max(scores.values()) == pytest.approx(load_checkpoint(run / 'work' / 'best.pth')['miou'])
    val = next(r for r in records if r['tag'] == 'val')
    assert {'mIoU', 'mAcc', 'aAcc'} <= val.keys() and len(val['IoU']) == len(val['Acc']) == 5


def test_checkpoint_round_trip_rebuilds_the_same_model(run):
    model, cfg = train.load_trained(run / 'work' / 'best.pth')
    assert not model.training
    again = train.create_model(cfg).eval()
    again.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), again(images))


def test_mismatched_checkpoint_is_refused(run):
    checkpoint = load_checkpoint(run / 'work' / 'best.pth')
    cfg = resolve(checkpoint['config'], ['head.channels=32'])
    with pytest.raises(Exception, match='shapes do not match'):
        load_model_weights(train.create_model(cfg), checkpoint, 'best.pth')


def test_evaluate_reproduces_the_best_miou(run, capsys):
    checkpoint = load_checkpoint(run / 'work' / 'best.pth')
    evaluate.main(['--checkpoint', str(run / 'work' / 'best.pth'), '--device', 'cpu'])
    results = json.loads((run / 'work' / 'eval_val_whole_best.json').read_text())
    assert results['mIoU'] == pytest.approx(checkpoint['miou'], abs=1e-6)
    assert len(results['IoU']) == 5 and results['classes'][1] == 'disc' and results['seconds'] > 0
    printed = capsys.readouterr().out
    assert 'mIoU' in printed and re.search(r'\d+ images in [\d.]+ s', printed)


def test_evaluate_scores_the_split_the_run_validated_on_unless_told_otherwise(run, tmp_path, capsys):
    """A run validated on a list file (a held-out fold) is scored on it, not on the dataset's val folder."""
    names = sorted(path.stem for path in (run / 'demo' / 'images' / 'val').iterdir())[:2]
    fold = tmp_path / 'fold_val.txt'
    fold.write_text(''.join(f'val/{name}\n' for name in names))
    checkpoint = load_checkpoint(run / 'work' / 'best.pth')
    checkpoint['config']['data']['val']['split'] = str(fold)
    torch.save(checkpoint, tmp_path / 'fold.pth')
    evaluate.main(['--checkpoint', str(tmp_path / 'fold.pth'), '--device', 'cpu'])
    assert json.loads((tmp_path / 'eval_fold_val_whole_fold.json').read_text())['split'] == str(fold)
    assert '2 images in' in capsys.readouterr().out
    evaluate.main(['--checkpoint', str(tmp_path / 'fold.pth'), '--device', 'cpu', '--split', 'val'])
    assert json.loads((tmp_path / 'eval_val_whole_fold.json').read_text())['split'] == 'val'
    assert re.search(r'(\d+) images in', capsys.readouterr().out)[1] == str(
        len(list((run / 'demo' / 'images' / 'val').iterdir()))
    )


def test_evaluate_tta_is_mmsegs_scales_and_flip_of_the_loaded_images(run):
    """--tta sets mmseg's six scales and flip, for which the val set serves the loaded images."""
    args = evaluate.parse_args(['--checkpoint', str(run / 'work' / 'best.pth'), '--tta'])
    cfg = config_for_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint, None, evaluate.cli_overrides(args))
    assert cfg['eval']['scales'] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg['eval']['flip'] is True
    cfg['data']['val']['pipeline'] = [{'type': 'resize', 'scale': [32, 32]}]
    assert eval_pipeline(cfg) == []
    assert build_dataset(cfg, 'val')[0][0].shape[-2:] == build_dataset(cfg, 'val').load(0)[0].shape[:2]


def test_evaluate_scores_the_float_and_int8_onnx_exports(run):
    """evaluate.py --onnx: the float graph scores what the checkpoint scores; the int8 one, calibrated
    on training images, is scored on the same val set (results beside the graph, named after it)."""
    import onnx

    best = run / 'work' / 'best.pth'
    scores = {'checkpoint': load_checkpoint(best)['miou']}  # what evaluate.py reproduces (test above)
    export = ['--checkpoint', str(best), '--size', '64', '64']
    calibration = ['--int8', '--calibration', str(run / 'demo' / 'images' / 'train'), '--calibration-images', '4']
    for name, extra in (('float', []), ('int8', calibration)):
        path = run / 'onnx' / f'{name}.onnx'
        export_onnx.main([*export, '--output', str(path), *extra])
        evaluate.main(['--onnx', str(path)])
        results = json.loads((run / 'onnx' / f'eval_val_whole_{name}.json').read_text())
        assert results['onnx'] == str(path) and len(results['IoU']) == 5
        scores[name] = results['mIoU']
    graph = onnx.load(str(run / 'onnx' / 'int8.onnx'))
    assert sum(node.op_type == 'QuantizeLinear' for node in graph.graph.node) > 10
    metadata = {p.key: json.loads(p.value) for p in graph.metadata_props if p.key in ('int8_calibration', 'config')}
    assert metadata['int8_calibration']['images'] == 4 and metadata['config']['data']['num_classes'] == 5
    assert scores['float'] == pytest.approx(scores['checkpoint'], abs=1e-3), scores
    assert abs(scores['int8'] - scores['float']) < 5, scores


def test_infer_writes_ids_colours_and_overlays_and_survives_bad_files(run, tmp_path, capsys):
    inputs = tmp_path / 'in'
    (inputs / 'nested').mkdir(parents=True)
    image = cv2.imread(str(run / 'demo' / 'images' / 'val' / '0000.jpg'))
    cv2.imwrite(str(inputs / 'a.jpg'), image)
    cv2.imwrite(str(inputs / 'nested' / 'b.png'), cv2.resize(image, (96, 80)))
    (inputs / 'notes.txt').write_text('not an image')
    (inputs / 'broken.jpg').write_bytes(b'not a jpeg')
    output = tmp_path / 'out'
    infer.main(
        [
            '--checkpoint',
            str(run / 'work' / 'best.pth'),
            '--input',
            str(inputs),
            '--output',
            str(output),
            '--device',
            'cpu',
        ]
    )
    ids = np.asarray(Image.open(output / 'nested' / 'b.png'))  # a palette PNG: its indices are the ids
    assert ids.shape == (80, 96) and ids.max() < 5
    assert cv2.imread(str(output / 'a.png')).shape == (128, 128, 3)  # which viewers show in colour
    overlay = cv2.imread(str(output / 'a_overlay.jpg'))  # above a legend of the classes it shows
    assert overlay.shape[1:] == (128, 3) and overlay.shape[0] > 128 and (overlay[-5:] > 200).mean() > 0.5
    assert not list(output.glob('broken*'))
    captured = capsys.readouterr()
    assert 'notes.txt (not an image file)' in captured.err and "broken.jpg' (missing, corrupt" in captured.err
    assert '2 images predicted' in captured.out and '1 unreadable' in captured.out
    with pytest.raises(DatasetError, match='no file matches'):
        infer.main(
            [
                '--checkpoint',
                str(run / 'work' / 'best.pth'),
                '--input',
                str(tmp_path / 'none*.jpg'),
                '--output',
                str(output),
            ]
        )


def test_the_stored_config_holds_every_constructor_default_the_model_used(run):
    stored = yaml.safe_load((run / 'work' / 'config.yaml').read_text())
    assert stored['backbone']['output_stride'] == 32 and stored['backbone']['zero_init_last'] is True
    assert stored['head']['dilations'] == [1, 2] and stored['head']['offset_learning'] is False


def test_plot_logs_draws_each_key_of_each_run_and_keeps_to_its_own_files(run, tmp_path):
    out = plot_logs.main(
        [str(run / 'work'), str(run / 'work'), '--keys', 'loss', 'mIoU', '--out', str(tmp_path / 'c.png')]
    )
    assert cv2.imread(str(out)).shape == (2 * 240, 650, 3)
    with pytest.raises(ConfigError, match='no run recorded dice'):
        plot_logs.main([str(run / 'work'), '--keys', 'dice'])
    (tmp_path / 'mine.png').write_bytes(b'a user file')
    with pytest.raises(OutputError, match='was not written by this command'):
        plot_logs.main([str(run / 'work'), '--out', str(tmp_path / 'mine.png')])


def test_print_config_marks_what_differs_from_the_defaults(run, capsys):
    text = print_config.main([str(run / 'tiny.yaml'), '--set', 'train.optimizer.lr=0.01'])
    lines = text.splitlines()
    assert '    lr: 0.01  # default: 6.0e-05' in lines and '  dilations: [1, 2]  # default: [1, 12, 24, 36]' in lines
    assert '  output_stride: 32' in lines and '  max_iters: 6  # required' in lines


def test_label_stats_counts_pixels_and_images_per_class(run, capsys):
    rows = label_stats.main(['--config', str(run / 'tiny.yaml'), '--set', f'output.work_dir={run / "stats"}'])
    dataset = build_dataset(load_config(run / 'tiny.yaml'), 'train', run / 'stats')
    assert [row[1] for row in rows] == dataset.class_pixels.tolist() and rows[0][3] == len(dataset)
    assert sum(row[2] for row in rows) == pytest.approx(100)
    assert 'ignored (data.ignore_index 255)' in capsys.readouterr().out


def test_browse_dataset_draws_the_first_training_samples_as_the_run_draws_them(run, tmp_path):
    paths = browse_dataset.main(['--config', str(run / 'tiny.yaml'), '--out', str(tmp_path), '-n', '2'])
    cfg = load_config(run / 'tiny.yaml')
    dataset = build_dataset(cfg, 'train', tmp_path / 'cache')
    first = next(iter(TrainSampler(len(dataset), cfg['train']['seed'])))
    picture = cv2.cvtColor(cv2.imread(str(paths[0])), cv2.COLOR_BGR2RGB)
    image = dataset[first][0].permute(1, 2, 0).numpy()
    assert len(paths) == 2 and np.array_equal(picture[ROW : ROW + 64, :64], image)  # the crop the run trains on


def losses_on_a_tiny_batch(run, steps: int, lr: float) -> list:
    """The loss before each of `steps` AdamW steps (at `lr`) of a fresh model of the run's config on 4
    validation images."""
    cfg = config_for_checkpoint(load_checkpoint(run / 'work' / 'last.pth'), 'last.pth')
    dataset = build_dataset(cfg, 'val')
    images, labels = map(torch.stack, zip(*(dataset[i] for i in range(4))))
    images = normalize(images, cfg['data']['mean'], cfg['data']['std'])
    torch.manual_seed(0)
    model = train.create_model(cfg).train()
    optimizer, _ = build_optimizer(model, {**cfg['train']['optimizer'], 'lr': lr}, {})
    criterion = build_criterion(cfg)
    losses = []
    for _ in range(steps):
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_few_steps_lower_the_loss_on_a_tiny_batch(run):
    losses = losses_on_a_tiny_batch(run, steps=12, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0], losses


def assert_resume_continues_exactly(run) -> None:
    """Resume the run's iteration-3 checkpoint: the weights and best scores at iteration 6 equal the
    uninterrupted run's."""
    resumed = run / 'resumed'
    resumed.mkdir()
    shutil.copy(run / 'work' / 'iter_000003.pth', resumed / 'last.pth')
    train.main(['--config', str(run / 'tiny.yaml'), '--work-dir', str(resumed), '--device', 'cpu', '--resume', 'auto'])
    expected, actual = load_checkpoint(run / 'work' / 'last.pth'), load_checkpoint(resumed / 'last.pth')
    assert actual['iteration'] == 6
    for key, value in expected['model'].items():
        assert torch.allclose(actual['model'][key].float(), value.float(), rtol=1e-5, atol=1e-6), key
    assert actual['best'] == expected['best']


def test_resuming_continues_exactly(run):
    assert_resume_continues_exactly(run)


def test_fine_tuning_with_load_from_an_ema_and_early_stopping(run, tmp_path, capsys):
    """--load-from takes the weights only (a fresh schedule from iteration 0); the EMA is validated and
    saved beside the model; keep_checkpoints=1 leaves one iteration file. Early stopping watches the
    EMA: with min_delta 100 mIoU points the first validation sets its best and the second cannot beat
    it, so the run ends at iteration 2 of 20, and a resumed run stays stopped."""
    work = tmp_path / 'finetune'
    command = ['--config', str(run / 'tiny.yaml'), '--work-dir', str(work), '--device', 'cpu']
    overrides = ['train.max_iters=20', 'train.val_interval=1', 'train.ema_decay=0.5', 'train.keep_checkpoints=1']
    overrides += ['train.early_stop={patience: 1, min_delta: 100}']
    train.main([*command, '--load-from', str(run / 'work' / 'best.pth'), '--set', *overrides])
    assert 'stopped early at iteration 2: 1 validation without an mIoU above' in capsys.readouterr().out
    assert load_checkpoint(work / 'last.pth')['early_stop']['waited'] == 1
    train.main([*command, '--resume', 'auto', '--set', *overrides])
    resumed = capsys.readouterr().out
    assert 'stopped early at iteration 2' in resumed and 'time in the loop' not in resumed  # it took no step
    log = (work / 'train.log').read_text()
    assert re.search(rf'loaded (\d+)/\1 tensors from {re.escape(str(run / "work" / "best.pth"))}', log)
    assert 'keys' not in log  # everything fitted
    assert 'iter 2 (EMA): mIoU' in log
    averaged = re.search(r'moving average of the weights: best mIoU ([\d.]+) at iteration (\d+); checkpoint (\S+)', log)
    assert averaged and averaged[3] == str(work / 'best_ema.pth')
    assert float(averaged[1]) == pytest.approx(load_checkpoint(work / 'best_ema.pth')['miou'], abs=0.005)
    assert sorted(p.name for p in work.glob('*.pth')) == ['best.pth', 'best_ema.pth', 'iter_000002.pth', 'last.pth']
    checkpoint = load_checkpoint(work / 'last.pth')
    ema = load_checkpoint(work / 'best_ema.pth')['model']
    assert checkpoint['ema']['n_averaged'] == 2
    assert any(not torch.equal(ema[k], v) for k, v in checkpoint['model'].items() if v.is_floating_point())


def test_validating_the_moving_average_alone(run, tmp_path, capsys):
    """train.validate_raw_weights off: each validation scores the moving average only; no best.pth."""
    work = tmp_path / 'averaged'
    overrides = ['train.max_iters=2', 'train.val_interval=2', 'train.ema_decay=0.5', 'train.validate_raw_weights=false']
    train.main(['--config', str(run / 'tiny.yaml'), '--work-dir', str(work), '--device', 'cpu', '--set', *overrides])
    assert [record['tag'] for record in read_metrics(work) if record['tag'].startswith('val')] == ['val_ema']
    assert sorted(p.name for p in work.glob('*.pth')) == ['best_ema.pth', 'iter_000002.pth', 'last.pth']
    out = capsys.readouterr().out
    assert re.search(r'done: moving average of the weights: best mIoU [\d.]+ at iteration 2; checkpoint \S+_ema', out)


def test_load_from_reports_what_does_not_fit(run):
    """Fine-tuning on a dataset with other classes: the classifier is skipped and named, the rest loads."""
    reference = load_checkpoint(run / 'work' / 'best.pth')
    model = train.create_model(config_for_checkpoint(reference, 'best.pth', overrides=['data.num_classes=3']))
    report = load_weights_from(model, run / 'work' / 'best.pth')
    assert (
        'skipped, shapes differ from the model: head.classifier.conv.bias, head.classifier.conv.weight'
        in report.problems()[0]
    )
    reference = reference['model']
    loaded = {k: v for k, v in model.state_dict().items() if 'classifier.conv.' not in k}
    assert all(torch.equal(v, reference[k]) for k, v in loaded.items())
    segformer = train.create_model(
        resolve(
            {
                'backbone': {'type': 'mit'},
                'head': {'type': 'segformer'},
                'data': {'root': '.', 'num_classes': 5},
                'train': {'max_iters': 1, 'batch_size': 1},
            }
        )
    )
    with pytest.raises(CheckpointError, match='none of its backbone weights fit'):
        load_weights_from(segformer, run / 'work' / 'best.pth')


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(run, tmp_path):
    class TurnsNaN:
        calls = 0

        def __init__(self, cfg):
            self.criterion = build_criterion(cfg)

        def terms(self, outputs, labels):
            terms = self.criterion.terms(outputs, labels)
            TurnsNaN.calls += 1
            return {**terms, 'loss': terms['loss'] * float('nan')} if TurnsNaN.calls >= 5 else terms

    work = tmp_path / 'nan'
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, 'build_criterion', TurnsNaN)
        with pytest.raises(FloatingPointError, match='NaN/Inf at iteration 5'):
            train.main(
                [
                    '--config',
                    str(run / 'tiny.yaml'),
                    '--work-dir',
                    str(work),
                    '--device',
                    'cpu',
                    '--set',
                    'train.max_iters=8',
                    'train.val_interval=3',
                    'train.log_interval=4',
                ]
            )
    assert sorted(p.name for p in work.glob('iter_*.pth')) == ['iter_000003.pth']  # not iteration 6


def test_slow_training_speeds_read_as_seconds_per_image():
    assert train.format_speed(2) == '2.0 images/s' and train.format_speed(0.05) == '20.0 s/image'


def test_checkpoints_rotate_and_last_follows_the_newest(tmp_path):
    for iteration in range(1, 6):
        save_iteration_checkpoint({'iteration': iteration, 'model': {}, 'config': {}}, tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_000004.pth', 'iter_000005.pth', 'last.pth']
    assert load_checkpoint(tmp_path / 'last.pth')['iteration'] == 5
    (tmp_path / '.iter_000006.pth.abc123').write_bytes(b'half a checkpoint')  # a write cut short by a kill
    remove_partial_writes(tmp_path)
    assert not list(tmp_path.glob('.*'))


def test_the_global_batch_must_divide_over_processes_and_accumulation_steps():
    with pytest.raises(ConfigError, match=r'x.yaml: train.batch_size 8 \(global\) does not divide into 2 process'):
        per_process_batch({'batch_size': 8, 'accum_steps': 3}, 2, 'x.yaml')
    assert per_process_batch({'batch_size': 12, 'accum_steps': 3}, 2, 'x.yaml') == 2


@pytest.mark.skipif(not cpu_computes(torch.bfloat16), reason='this CPU has no bfloat16 arithmetic')
def test_bf16_amp_trains_and_validates_under_autocast_on_a_cpu(tmp_path, demo_root, monkeypatch):
    """train.amp reaches the CPU where it computes the dtype in hardware (AMX, AVX512-BF16)."""
    seen = set()
    real_forward = Segmentor.forward

    def recording_forward(model, images):
        seen.add((model.training, torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None))
        return real_forward(model, images)

    monkeypatch.setattr(Segmentor, 'forward', recording_forward)
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)))
    overrides = ['train.amp=bf16', 'train.max_iters=2', 'train.val_interval=2']
    train.main(['--config', str(config), '--work-dir', str(tmp_path / 'work'), '--device', 'cpu', '--set', *overrides])
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}  # the steps and the validation
    assert load_checkpoint(tmp_path / 'work' / 'last.pth')['iteration'] == 2


def test_amp_on_a_cpu_without_the_dtype_falls_back_to_float32_in_one_warning(monkeypatch):
    cfg = {'train': {'amp': 'bf16'}}
    monkeypatch.setattr(cli, 'cpu_computes', lambda dtype: False)
    with pytest.warns(UserWarning, match=r'train.amp bf16: this CPU has no torch.bfloat16 arithmetic; running in fl'):
        assert cli.amp_dtype_for(cfg, torch.device('cpu')) is None
    assert cli.amp_dtype_for(cfg, torch.device('cuda')) is torch.bfloat16
    monkeypatch.setattr(cli, 'cpu_computes', lambda dtype: True)
    assert cli.amp_dtype_for({'train': {'amp': 'fp16'}}, torch.device('cpu')) is torch.float16


def test_channels_last_training_takes_the_steps_of_nchw_up_to_float_rounding():
    """train.channels_last changes the memory order of the convolutions, not what they compute: three
    steps of the CamVid model and loss (BatchNorm, GroupNorm, Dice) from the same
    weights end at the same weights. With SGD: Adam divides by the root of each gradient's second
    moment, so that a rounding difference in a near-zero gradient can become a whole step."""
    cfg = random_weights_config(ROOT / 'configs' / 'camvid.yaml', ['train.optimizer={type: sgd, lr: 0.01}'])
    images = torch.randn(2, 3, 64, 64)
    models = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)  # the same random labels in both
        model = build_model(cfg, torch.device('cpu')).to(memory_format=memory_format).train()
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        step = train_call(model, cfg, images.contiguous(memory_format=memory_format), None)
        for _ in range(3):
            step()
        models.append(model.state_dict())
    nchw, nhwc = models
    moved = [key for key, value in nchw.items() if value.is_floating_point() and not torch.equal(value, initial[key])]
    assert len(moved) > 100 and max((nchw[key] - initial[key]).abs().max() for key in moved) > 1e-3
    for key in moved:
        torch.testing.assert_close(nhwc[key], nchw[key], rtol=1e-4, atol=1e-6, msg=key)
