"""benchmarks/peer_smp_camvid.py end to end on the demo scenes: both recipes, two validation points."""

import json
import os
import signal
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY

pytest.importorskip('segmentation_models_pytorch')
pytest.importorskip('albumentations')
sys.path.insert(0, str(ROOT / 'benchmarks'))
import peer_smp_camvid  # noqa: E402

from engine.rules import load_config  # noqa: E402

CPU = torch.device('cpu')


@pytest.mark.parametrize('side_by_side', [[], ['--side-by-side']], ids=['one after the other', 'side by side'])
def test_peer_and_ours_are_scored_at_the_same_validation_points(tmp_path, capsys, demo_root, side_by_side):
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)))
    budget = ['train.max_iters=2', 'train.val_interval=1', 'train.log_interval=1', 'train.ema_decay=0.5']
    out, results = ['--out', str(tmp_path / 'out')], ['--results', str(tmp_path / 'results')]
    result = peer_smp_camvid.main(
        ['--config', str(config), *out, *results, '--device', 'cpu', '--set', *budget, *side_by_side]
    )
    assert [i for i, _ in result['peer']] == [1, 2] and [i for i, _ in result['ours']] == [1, 2]
    # The run kept a moving average of its weights: that is what the recipe delivers and what is compared.
    ours_log = (tmp_path / 'out' / 'ours' / 'train.log').read_text()
    assert result['ours_scored'] == 'moving average of the weights'
    assert all(f'iter {i} (EMA): mIoU {miou:.2f}' in ours_log for i, miou in result['ours'])
    for iteration, peer, ours, difference, ratio in result['rows']:
        assert 0 <= peer <= 100 and 0 <= ours <= 100 and difference == pytest.approx(ours - peer)
    printed = capsys.readouterr().out
    assert 'peer iter 2: mIoU' in printed and '| 2 |' in printed and 'wall time: peer' in printed
    saved = json.loads((tmp_path / 'out' / 'peer_smp_camvid.json').read_text())
    assert saved['ours_dir'] == str(tmp_path / 'out' / 'ours') and len(saved['rows']) == 2
    assert saved['seconds']['ours'] > 0
    # Side by side, ours ran as its own train.py process, its console kept in its folder.
    assert (tmp_path / 'out' / 'ours' / 'console.txt').is_file() == bool(side_by_side)
    # The result file the docs render: the peer, ours' moving average and its raw weights, with how they ran.
    [path] = (tmp_path / 'results').glob('camvid_peer-cpu*-torch*.json')
    record = json.loads(path.read_text())
    assert record['columns'] == ['run', 'weights', 'iter 1', 'iter 2', 'wall time (min)']
    ours_run = f'{config} {" ".join(budget)}'
    assert [row[:2] for row in record['rows']] == [["SMP's example", 'raw'], [ours_run, 'average'], [ours_run, 'raw']]
    assert [row[2:4] for row in record['rows'][:2]] == [[m for _, m in result['peer']], [m for _, m in result['ours']]]
    assert ('Side by side' if side_by_side else 'one after the other') in ' '.join(record['notes'])
    assert 'budget (2 iterations x 4 crops of 64x64' in record['notes'][0]


def test_a_config_without_a_random_crop_is_refused():
    with pytest.raises(peer_smp_camvid.ConfigError, match='random_crop'):
        peer_smp_camvid.crop_size({'data': {'train': {'pipeline': [{'type': 'random_flip'}]}}})


def test_the_peer_crops_as_an_albumentations_pipeline_does():
    cfg = load_config(ROOT / 'configs' / 'camvid_fpn_smp_aug.yaml')
    assert cfg['data']['train']['pipeline'][0]['type'] == 'albumentations'
    assert peer_smp_camvid.crop_size(cfg) == (256, 256)


def test_the_peer_curve_is_reused_only_for_the_same_setting(tmp_path, monkeypatch):
    trained = []
    fake_training = lambda cfg, seed, device, log, state: trained.append(seed) or ([(1, 5.0)], 1.0)  # noqa: E731
    monkeypatch.setattr(peer_smp_camvid, 'train_peer', fake_training)
    cfg = {'data': {'type': 'demo', 'workers': 2, 'train': {'pipeline': [{'type': 'random_crop', 'size': [8, 8]}]}},
           'train': {'max_iters': 1, 'batch_size': 2, 'val_interval': 1}, 'eval': {'mode': 'whole'}}  # fmt: skip
    cache = tmp_path / 'peer.json'
    for seed in (0, 0, 1):
        curve, _ = peer_smp_camvid.peer_curve(cfg, seed, 'cpu', cache)
        assert curve == [(1, 5.0)]
    assert trained == [0, 1]


class Stop(Exception):
    pass


def test_a_stopped_peer_run_continues_from_its_last_log_line_as_if_never_stopped(tmp_path, demo_root):
    """Stopped at iteration 4's log line, the run's last state is iteration 3's, between validations: the
    resumed run draws stretch 2's first batch again, drops it, and ends as the uninterrupted run."""
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)))
    budget = ['train.max_iters=4', 'train.val_interval=2', 'train.log_interval=1', 'data.workers=0']
    cfg = load_config(config, budget)
    uninterrupted, _ = peer_smp_camvid.train_peer(cfg, 0, CPU, lambda line: None, tmp_path / 'whole.pth')

    def stop_at_the_last_iteration(line):
        if line.startswith('peer iter 4/4'):
            raise Stop

    state, lines = tmp_path / 'stopped.pth', []
    with pytest.raises(Stop):
        peer_smp_camvid.train_peer(cfg, 0, CPU, stop_at_the_last_iteration, state)
    resumed, _ = peer_smp_camvid.train_peer(cfg, 0, CPU, lines.append, state)
    assert lines[0].startswith('peer: continuing from iteration 3')
    assert [line.split(':')[0] for line in lines[1:]] == ['peer iter 4/4', 'peer iter 4']  # 1 to 3 not again
    assert resumed == uninterrupted and [i for i, _ in resumed] == [2, 4]


def test_a_given_run_is_timed_and_scored_from_its_metrics(tmp_path):
    """A run that was stopped and resumed: its pause counts, its repeated validation counts once."""
    records = [
        {'iteration': 0, 'time': 1000.0, 'tag': 'start'},
        {'iteration': 600, 'time': 3000.0, 'tag': 'val', 'mIoU': 45.0},
        {'iteration': 500, 'time': 4000.0, 'tag': 'start'},
        {'iteration': 600, 'time': 5000.0, 'tag': 'val', 'mIoU': 45.5},
        {'iteration': 1200, 'time': 6520.0, 'tag': 'val', 'mIoU': 50.0},
    ]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(record) + '\n' for record in records))
    assert peer_smp_camvid.run_seconds(tmp_path) == 92 * 60
    assert peer_smp_camvid.our_curve(tmp_path) == ([(600, 45.5), (1200, 50.0)], 'weights')


@pytest.mark.parametrize(
    'trigger, log_interval, stopped_at',
    [('peer iter 2: mIoU', 4, 2), ('peer iter 3/4', 1, 3)],
    ids=['during a validation', 'between validations'],
)
def test_a_stop_signal_saves_the_peer_and_it_continues_as_if_never_stopped(
    trigger, log_interval, stopped_at, tmp_path, demo_root
):
    """SIGTERM (sent when the log line `trigger` is written): the run ends after the current step or
    validation with 143, its state saved there, and resumed it ends as the uninterrupted run."""
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)))
    budget = ['train.max_iters=4', 'train.val_interval=2', f'train.log_interval={log_interval}', 'data.workers=1']
    cfg = load_config(config, budget)
    uninterrupted, _ = peer_smp_camvid.train_peer(cfg, 0, CPU, lambda line: None, tmp_path / 'whole.pth')

    def terminate(line):
        lines.append(line)
        if line.startswith(trigger):
            os.kill(os.getpid(), signal.SIGTERM)

    state, lines = tmp_path / 'stopped.pth', []
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        peer_smp_camvid.train_peer(cfg, 0, CPU, terminate, state)
    assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is handler
    assert lines[-1] == f'peer: stopped by SIGTERM at iteration {stopped_at}; the state is in {state}'
    lines.clear()
    resumed, _ = peer_smp_camvid.train_peer(cfg, 0, CPU, lines.append, state)
    assert lines[0].startswith(f'peer: continuing from iteration {stopped_at}')
    assert resumed == uninterrupted
