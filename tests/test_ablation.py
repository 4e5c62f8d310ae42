"""benchmarks/ablation.py end to end on the demo scenes: two tiny pairs, two seeds, two iterations a run."""

import json
import shutil
import statistics
import sys
import textwrap

import pytest

from conftest import ROOT, TINY
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError
from tools.measure import flatten

sys.path.insert(0, str(ROOT / 'benchmarks'))
import ablation  # noqa: E402

SEEDS = [0, 1]
SEGFORMER_HEAD = """
    backbone: {type: resnet, variant: test}
    head: {type: segformer, channels: 16}
"""
"""A second pair: the SegFormer head, whose OL arm also max-pools before the classifier."""


def command(folder, results: bool = True) -> list:
    """The ablation's command line; `results`: with a result file (whose runs count as finished)."""
    tiny = str(folder / 'tiny.yaml')
    return [
        '--config',
        tiny,
        '--pairs',
        tiny,
        str(folder / 'segformer.yaml'),
        '--seeds',
        *map(str, SEEDS),
        '--iters',
        '2',
        '--out',
        str(folder / 'out'),
        *(['--results', str(folder / 'results')] if results else []),
        '--device',
        'cpu',
    ]


@pytest.fixture(scope='module')
def ablation_run(tmp_path_factory):
    """The ablation run once; (folder, its results, the mtime of every run's last.pth)."""
    folder = tmp_path_factory.mktemp('ablation')
    (folder / 'tiny.yaml').write_text(textwrap.dedent(TINY.format(root=folder / 'demo')))
    (folder / 'segformer.yaml').write_text(textwrap.dedent(SEGFORMER_HEAD))
    results = ablation.main(command(folder))
    return folder, results, checkpoint_times(folder / 'out')


def checkpoint_times(out) -> dict:
    return {str(path.relative_to(out)): path.stat().st_mtime_ns for path in sorted(out.glob('*/*/seed*/last.pth'))}


def test_table_has_both_arms_every_seed_and_the_paired_differences(ablation_run):
    folder, results, _ = ablation_run
    assert [r['pair'] for r in results] == ['tiny', 'segformer']
    for result in results:
        plain, ol = result['arms']['plain'], result['arms']['OL']
        for arm in (plain, ol):
            assert len(arm['miou']) == len(SEEDS) and all(0 <= m <= 100 for m in arm['miou'])
            assert arm['mean'] == pytest.approx(statistics.mean(arm['miou']))
            assert arm['std'] == pytest.approx(statistics.stdev(arm['miou']))
            assert arm['params_m'] > 0 and arm['gmacs'] > 0
        difference = result['difference']
        assert difference['miou'] == pytest.approx([b - a for a, b in zip(plain['miou'], ol['miou'])])
        assert difference['mean'] == pytest.approx(statistics.mean(difference['miou']))
        assert difference['params_m'] == pytest.approx(ol['params_m'] - plain['params_m'])
    saved = json.loads((folder / 'out' / 'ablation.json').read_text())
    assert saved['command'].startswith('python benchmarks/ablation.py --config ')
    assert saved['seeds'] == SEEDS and [p['pair'] for p in saved['pairs']] == ['tiny', 'segformer']
    rows = [line for line in (folder / 'out' / 'ablation.md').read_text().splitlines() if line.startswith('| ')]
    assert rows[0].split(' | ')[-3:] == ['seed 0', 'seed 1', 'mean ± std |']
    assert [row.split(' | ')[1] for row in rows[1:]] == ['plain', 'OL', 'OL − plain'] * 2
    assert all('–' not in row for row in rows[1:])  # every cell measured
    [path] = (folder / 'results').glob('ablation-cpu*-torch*.json')  # what the docs render
    table = json.loads(path.read_text())
    assert table['columns'] == ['model', 'arm', 'params (M)', 'GMACs', 'seed 0', 'seed 1']
    assert [row[1] for row in table['rows']] == ['plain', 'OL'] * 2
    assert table['rows'][1][4:] == results[0]['arms']['OL']['miou']


def test_arms_differ_only_in_the_classifier(ablation_run):
    folder, results, _ = ablation_run
    for result in results:
        assert result['check']['valid'] and result['check']['config_keys'] == ['head.offset_learning']
        for seed in SEEDS:
            plain, ol = (
                load_checkpoint(folder / 'out' / result['pair'] / arm / f'seed{seed}' / 'last.pth')
                for arm in ('plain', 'OL')
            )
            configs = [flatten(c['config']) for c in (plain, ol)]
            assert {k for k in configs[0] if configs[0][k] != configs[1][k]} == {
                'head.offset_learning',
                'output.work_dir',
            }
            assert configs[0]['train.seed'] == seed
            assert configs[0]['train.val_interval'] == configs[0]['train.max_iters'] == 2
            keys = plain['model'].keys() ^ ol['model'].keys()
            assert keys and all(k.startswith('head.classifier.') for k in keys)


def test_rerun_skips_finished_runs_and_retrains_a_missing_one_identically(ablation_run, capsys):
    """The retrained run is a train.py process (--jobs 2): the same result as the in-process run."""
    folder, results, times = ablation_run
    out = folder / 'out'
    assert len(times) == 2 * 2 * len(SEEDS)
    shutil.rmtree(out / 'tiny' / 'OL' / 'seed1')
    again = ablation.main([*command(folder, results=False), '--jobs', '2'])
    printed = capsys.readouterr().out
    assert printed.count('finished, skipped') == len(times) - 1
    assert 'tiny/OL/seed1: done' in printed
    retrained = 'tiny/OL/seed1/last.pth'
    assert {k: v for k, v in checkpoint_times(out).items() if k != retrained} == {
        k: v for k, v in times.items() if k != retrained
    }
    assert again[0]['arms']['OL']['miou'] == pytest.approx(results[0]['arms']['OL']['miou'])


def test_the_runs_of_the_result_file_count_as_finished_in_a_fresh_checkout(ablation_run, capsys):
    folder, results, times = ablation_run
    fresh = command(folder)
    fresh[fresh.index('--out') + 1] = str(folder / 'fresh_out')  # no run folders; the result file
    again = ablation.main(fresh)
    assert capsys.readouterr().out.count('finished, read back from') == len(times)
    assert not (folder / 'fresh_out' / 'tiny').exists()
    assert [r['arms'] for r in again] == [r['arms'] for r in results]
    # Another budget is another protocol: its runs are not the recorded ones.
    other = [*fresh[: fresh.index('--iters') + 1], '1', *fresh[fresh.index('--iters') + 2 :], '--report-only']
    assert ablation.main(other)[0]['arms']['plain']['miou'] == [None, None]


def test_model_from_config_ablates_its_own_model_without_training(ablation_run):
    folder, _, _ = ablation_run
    results = ablation.main(
        [
            '--config',
            str(folder / 'tiny.yaml'),
            '--model-from-config',
            '--iters',
            '2',
            '--out',
            str(folder / 'report'),
            '--report-only',
        ]
    )
    assert [r['pair'] for r in results] == ['tiny'] and results[0]['check']['valid']
    assert results[0]['arms']['plain']['miou'] == [None, None, None]
    assert results[0]['arms']['plain']['mean'] is None


def test_pairs_sharing_a_run_folder_are_refused(tmp_path):
    (tmp_path / 'tiny.yaml').write_text(textwrap.dedent(TINY.format(root=tmp_path / 'demo')))
    with pytest.raises(ConfigError, match='share a run folder'):
        ablation.main(
            [
                '--config',
                str(tmp_path / 'tiny.yaml'),
                '--pairs',
                str(tmp_path / 'tiny.yaml'),
                str(tmp_path / 'tiny.yaml'),
                '--out',
                str(tmp_path / 'out'),
                '--report-only',
            ]
        )
