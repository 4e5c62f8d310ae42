"""benchmarks/camvid_recipes.py: every row resolves against the shipped recipe, rows compose, the shipped
recipe is the full-budget study's winning row, and two rows run on the demo scenes."""

import json
import sys
import textwrap

import pytest
import yaml

from conftest import ROOT, TINY
from engine.config import read_config

sys.path.insert(0, str(ROOT / 'benchmarks'))
import camvid_recipes  # noqa: E402

BASES = (camvid_recipes.DEFAULT_CONFIG, 'configs/camvid_fpn_smp_aug.yaml', 'configs/camvid.yaml')


def test_every_row_is_one_change_of_a_study_base_that_resolves():
    args = camvid_recipes.parse_args([])
    base = camvid_recipes.load_config(args.config, camvid_recipes.row_overrides('base', args))
    assert base['train']['max_iters'] == 600 and base['train']['val_interval'] == 200
    for row in camvid_recipes.ROWS:  # a decoder's own option (ASPP dilations, FPN norm) fits one base only
        resolved = []
        for config in BASES:
            try:
                resolved.append(camvid_recipes.load_config(config, camvid_recipes.row_overrides(row, args)))
            except camvid_recipes.ConfigError:
                pass
        assert resolved, row


def test_a_loss_row_sets_the_same_loss_on_every_base():
    """The shipped recipe has no cross-entropy, the DeepLabV3+ one no Dice: 'Lovász only' must drop both."""
    args = camvid_recipes.parse_args([])
    for row in ('ce', 'ce_dice', 'dice', 'dice_smp', 'lovasz', 'ohem', 'ce_unweighted'):
        losses = [read_config(config, camvid_recipes.row_overrides(row, args))['train']['loss'] for config in BASES]
        assert losses[0] == losses[1] == losses[2], row
    lovasz = read_config('configs/camvid.yaml', camvid_recipes.row_overrides('lovasz', args))['train']['loss']
    assert (lovasz['ce'], lovasz['dice'], lovasz['lovasz']) == (0, 0, 1.0)


def test_rows_joined_by_plus_apply_every_change_in_order():
    args = camvid_recipes.parse_args(['--rows', 'base', 'dice_smp+peer_optim'])
    cfg = camvid_recipes.load_config(args.config, camvid_recipes.row_overrides('dice_smp+peer_optim', args))
    assert cfg['train']['loss']['ce'] == 0 and cfg['train']['loss']['dice_style'] == 'smp'
    assert cfg['train']['optimizer']['lr'] == 0.0002 and cfg['train']['schedule']['type'] == 'cosine'
    change, _ = camvid_recipes.row_change('dice_smp+peer_optim')
    assert change == f'{camvid_recipes.ROWS["dice_smp"][0]}; {camvid_recipes.ROWS["peer_optim"][0]}'
    with pytest.raises(SystemExit):
        camvid_recipes.parse_args(['--rows', 'base', 'dice_smp+nope'])


def test_the_shipped_recipe_is_the_winning_row_of_the_full_budget_study():
    study = ['--config', 'configs/camvid_fpn_smp_aug.yaml', '--iters', '1800', '--set', 'train.ema_decay=0.995']
    args = camvid_recipes.parse_args(study)
    winner = camvid_recipes.load_config(args.config, camvid_recipes.row_overrides('dice_smp+aug_mmseg+cosine', args))
    shipped = camvid_recipes.load_config(ROOT / 'configs' / 'camvid.yaml')
    for cfg in (winner, shipped):  # the same run: they differ only in what this recipe does not read
        cfg['output']['work_dir'] = None
        assert cfg['train']['loss']['ce'] == 0 and cfg['train']['schedule']['type'] == 'cosine'
        cfg['train']['loss']['class_weight'] = None  # weights of the cross-entropy, which is off
        cfg['train']['schedule']['power'] = None  # the exponent of poly decay
    assert winner == shipped


def test_rows_train_and_report_against_the_base(tmp_path, capsys, demo_root):
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=demo_root)))
    out = tmp_path / 'out'
    argv = ['--config', str(config), '--rows', 'base', 'fpn', '--iters', '3', '--out', str(out), '--device', 'cpu']
    argv += ['--results', str(tmp_path / 'results')]
    rows = camvid_recipes.main(argv)
    assert [r['row'] for r in rows] == ['base', 'fpn'] and rows[0]['difference'] == 0
    assert all(r['miou'][3] is not None and r['miou'][1] is not None and r['minutes'] >= 0 for r in rows)
    assert yaml.safe_load((out / 'fpn' / 'config.yaml').read_text())['head']['type'] == 'fpn'
    printed = capsys.readouterr().out
    assert '| `fpn` | decoder: FPN head' in printed
    assert printed.count('results: ') == 3  # after each row, so that a long study keeps what it finished
    assert json.loads((out / 'recipes.json').read_text())['iters'] == 3
    [path] = (tmp_path / 'results').glob('camvid_recipes-cpu*-torch*.json')  # what the docs render
    table = json.loads(path.read_text())
    assert table['columns'] == ['row', 'change', 'iter 1', 'iter 2', 'iter 3']
    assert [row[0] for row in table['rows']] == ['base', 'fpn'] and table['rows'][1][4] == rows[1]['miou'][3]
    assert camvid_recipes.main(argv) == rows  # a rerun skips the finished rows
    assert capsys.readouterr().out.count('finished, skipped') == 2
    # A fresh checkout, the run folders gone: the rows of the result file count as finished.
    fresh = [*argv[: argv.index('--out') + 1], str(tmp_path / 'fresh'), *argv[argv.index('--out') + 2 :]]
    again = camvid_recipes.main(fresh)
    assert capsys.readouterr().out.count('finished, read back from') == 2 and not (tmp_path / 'fresh' / 'fpn').exists()
    assert [(r['miou'], r['difference']) for r in again] == [(r['miou'], r['difference']) for r in rows]
