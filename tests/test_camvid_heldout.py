"""benchmarks/camvid_heldout.py: each fold's splits and each seed reach both runs, and the summary is the
mean ± std over seeds of what the pairs wrote (their training: test_peer_smp_camvid.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from engine.config import ConfigError
from engine.rules import load_config

sys.path.insert(0, str(ROOT / 'benchmarks'))
import camvid_heldout  # noqa: E402


def test_every_seed_trains_each_fold_on_the_other_sequences(monkeypatch, tmp_path):
    calls = []

    def pair(argv):  # peer_smp_camvid.py: trains, then writes what it measured
        calls.append(argv)
        write_pair(Path(argv[argv.index('--out') + 1]), peer=[30.0], ours=[33.0], **settings(argv))

    monkeypatch.setattr(camvid_heldout.peer_smp_camvid, 'main', pair)
    argv = ['--folds', '0006R0', '0001TP', '--seeds', '0', '1', '--out', str(tmp_path)]
    camvid_heldout.main(argv)
    assert [(argv[argv.index('--out') + 1], argv[argv.index('--seed') + 1]) for argv in calls] == [
        (str(tmp_path / fold / f'seed{seed}'), str(seed)) for seed in (0, 1) for fold in ('0006R0', '0001TP')
    ]
    overrides = calls[1][calls[1].index('--set') + 1 : calls[1].index('--seed')]
    assert 'train.seed=0' in overrides
    cfg = load_config(ROOT / 'configs' / 'camvid.yaml', [o for o in overrides if o.startswith('data.')])
    assert cfg['data']['val']['split'] == 'datasets/splits/camvid_hold_out_0001TP_val.txt'
    assert cfg['data']['train']['split'] == 'datasets/splits/camvid_hold_out_0001TP_train.txt'

    # Pairs that finished with these settings are read back; one of other settings is trained again.
    changed = tmp_path / '0001TP' / 'seed1' / 'peer_smp_camvid.json'
    changed.write_text(json.dumps({**json.loads(changed.read_text()), 'set': []}))
    calls.clear()
    camvid_heldout.main(argv)
    assert [argv[argv.index('--out') + 1] for argv in calls] == [str(changed.parent)]


def test_a_study_with_no_finished_pair_says_so(tmp_path):
    with pytest.raises(ConfigError, match='no finished pair'):
        camvid_heldout.main(['--out', str(tmp_path), '--report-only'])


def settings(argv: list) -> dict:
    """The settings peer_smp_camvid.py records with a pair, from its command line."""
    return {'config': argv[argv.index('--config') + 1], 'set': argv[argv.index('--set') + 1 : argv.index('--seed')]}


def write_pair(folder: Path, peer: list, ours: list, **record) -> None:
    """What peer_smp_camvid.py writes at the end of a pair: its settings (by default, the study's defaults
    for the fold and seed of `folder`) and rows (iteration, peer, ours, ours − peer, ratio)."""
    fold, seed = folder.parent.name, int(folder.name.removeprefix('seed'))
    record = record or {
        'config': 'configs/camvid.yaml',
        'set': [*camvid_heldout.fold_overrides(fold), f'train.seed={seed}'],
    }
    folder.mkdir(parents=True, exist_ok=True)
    rows = [[600 * (i + 1), p, o, o - p, o / p] for i, (p, o) in enumerate(zip(peer, ours))]
    (folder / 'peer_smp_camvid.json').write_text(json.dumps({**record, 'rows': rows}))


def test_the_summary_is_the_mean_and_std_over_the_finished_seeds(tmp_path, capsys):
    write_pair(tmp_path / 'out' / '0006R0' / 'seed0', peer=[30.0, 34.0], ours=[33.0, 38.0])
    write_pair(tmp_path / 'out' / '0006R0' / 'seed2', peer=[32.0, 35.0], ours=[34.0, 40.0])
    write_pair(tmp_path / 'out' / '0001TP' / 'seed1', peer=[20.0, 25.0], ours=[21.0, 24.0])
    other = {'config': 'configs/camvid_deeplabv3plus.yaml', 'set': []}  # another study's pair: left out
    write_pair(tmp_path / 'out' / '0001TP' / 'seed2', peer=[10.0, 15.0], ours=[11.0, 14.0], **other)
    argv = ['--folds', '0006R0', '0001TP', '--seeds', '0', '1', '2', '--out', str(tmp_path / 'out'), '--report-only']
    rows = camvid_heldout.main([*argv, '--results', str(tmp_path / 'results')])
    assert rows == [
        ['0006R0', 600, [0, 2], [30.0, 32.0], [33.0, 34.0], [3.0, 2.0]],
        ['0006R0', 1200, [0, 2], [34.0, 35.0], [38.0, 40.0], [4.0, 5.0]],
        ['0001TP', 600, [1], [20.0], [21.0], [1.0]],
        ['0001TP', 1200, [1], [25.0], [24.0], [-1.0]],
    ]
    lines = capsys.readouterr().out.splitlines()
    assert '| 0006R0 | 1200 | 0 2 | 34.50 ± 0.71 | 39.00 ± 1.41 | +4.50 ± 0.71 |' in lines
    assert '| 0001TP | 1200 | 1 | 25.00 | 24.00 | -1.00 |' in lines  # one seed: no spread to show
    [path] = (tmp_path / 'results').glob('camvid_heldout-cpu*-torch*.json')  # what the docs render
    assert json.loads(path.read_text())['rows'] == rows


def test_the_pairs_of_the_result_file_count_as_finished_in_a_fresh_checkout(monkeypatch, tmp_path):
    trained = []

    def pair(argv):
        trained.append(argv[argv.index('--out') + 1])
        write_pair(Path(trained[-1]), peer=[20.0, 25.0], ours=[24.0, 28.0], **settings(argv))

    monkeypatch.setattr(camvid_heldout.peer_smp_camvid, 'main', pair)
    results = ['--results', str(tmp_path / 'results'), '--seeds', '0']
    camvid_heldout.main(['--folds', '0006R0', '--out', str(tmp_path / 'first'), *results])
    # Another machine's fresh checkout: no run folders, the result file; one more fold.
    rows = camvid_heldout.main(['--folds', '0006R0', '0001TP', '--out', str(tmp_path / 'second'), *results])
    assert trained == [str(tmp_path / 'first' / '0006R0' / 'seed0'), str(tmp_path / 'second' / '0001TP' / 'seed0')]
    assert [row[:2] for row in rows] == [['0006R0', 600], ['0006R0', 1200], ['0001TP', 600], ['0001TP', 1200]]
    # Other overrides are another study: the recorded pairs are not theirs.
    camvid_heldout.main(['--folds', '0006R0', '--out', str(tmp_path / 'third'), *results, '--set', 'train.lr=0.001'])
    assert trained[-1] == str(tmp_path / 'third' / '0006R0' / 'seed0')


def fake_run(work_dir: Path, curve: dict, tag: str) -> None:
    """What a finished train.py run leaves that the study reads: last.pth's iteration and metrics.jsonl."""
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save({'model': {}, 'iteration': 1800}, work_dir / 'last.pth')
    records = [{'iteration': 0, 'time': 0.0, 'tag': 'start'}]  # then a validation every 10 minutes
    records += [{'iteration': i, 'time': i, 'tag': tag, 'mIoU': score} for i, score in curve.items()]
    (work_dir / 'metrics.jsonl').write_text(''.join(json.dumps(record) + '\n' for record in records))


def test_rows_train_on_every_fold_after_the_pairs_and_compare_with_them_by_seed(monkeypatch, tmp_path, capsys):
    def pair(argv):
        write_pair(Path(argv[argv.index('--out') + 1]), peer=[30.0, 34.0], ours=[33.0, 38.0], **settings(argv))

    trained = []

    def train(todo, jobs, after_each):  # benchmarks/ablation.py: train.py processes, `jobs` at a time
        assert jobs == 2
        for work_dir, arguments in todo:
            trained.append((work_dir, arguments))
            no_ema = 'train.ema_decay=null' in arguments
            fake_run(work_dir, {600: 35.0, 1200: 41.0 if no_ema else 40.0}, 'val' if no_ema else 'val_ema')
            after_each()

    monkeypatch.setattr(camvid_heldout.peer_smp_camvid, 'main', pair)
    monkeypatch.setattr(camvid_heldout, 'run_processes', train)
    argv = ['--folds', '0006R0', '0001TP', '--seeds', '0', '--rows', 'aug_strong', 'no_ema', '--jobs', '2']
    argv += ['--results', str(tmp_path / 'results')]
    camvid_heldout.main([*argv, '--out', str(tmp_path / 'out')])
    assert [(work_dir.parent.parent.name, work_dir.name) for work_dir, _ in trained] == [
        ('0006R0', 'aug_strong'),
        ('0001TP', 'aug_strong'),
        ('0006R0', 'no_ema'),
        ('0001TP', 'no_ema'),
    ]
    arguments = trained[3][1]
    assert arguments[arguments.index('--resume') + 1] == 'auto' and 'train.seed=0' in arguments
    assert 'data.val.split=datasets/splits/camvid_hold_out_0001TP_val.txt' in arguments
    [path] = (tmp_path / 'results').glob('camvid_heldout_recipes-cpu*-torch*.json')
    rows = json.loads(path.read_text())['rows']
    change = camvid_heldout.camvid_recipes.ROWS['no_ema'][0]
    assert rows[-1] == ['no_ema', change, '0001TP', 1200, [0], [41.0], [41.0 - 34.0], [41.0 - 38.0], [20.0]]
    assert rows[0][2:] == ['0006R0', 600, [0], [35.0], [5.0], [2.0], [20.0]] and rows[0][0] == 'aug_strong'
    assert (
        f'| `no_ema` | {change} | 0006R0 | 0 | 35.00 (+5.00) | 41.00 (+7.00) | +3.00 | 20 |' in capsys.readouterr().out
    )

    # A fresh checkout: the rows of the result file count as finished, nothing trains.
    trained.clear()
    again = camvid_heldout.main([*argv, '--out', str(tmp_path / 'fresh')])
    assert trained == [] and json.loads(path.read_text())['rows'] == rows and again[0][:2] == ['0006R0', 600]
    with pytest.raises(ConfigError, match="'base'"):
        camvid_heldout.main(['--rows', 'base', '--out', str(tmp_path / 'out'), '--report-only'])
