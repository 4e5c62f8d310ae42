"""benchmarks/camvid_recipes.py: every row resolves against the shipped recipe; two rows run on the demo scenes."""

import json
import sys
import textwrap

import yaml

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / 'benchmarks'))
import camvid_recipes  # noqa: E402


def test_every_row_is_one_change_of_the_camvid_recipe_that_resolves():
    args = camvid_recipes.parse_args([])
    base = camvid_recipes.load_config(args.config, camvid_recipes.row_overrides('base', args))
    assert base['train']['max_iters'] == 600 and base['train']['val_interval'] == 200
    for row in camvid_recipes.ROWS:
        camvid_recipes.load_config(args.config, camvid_recipes.row_overrides(row, args))


def test_rows_train_and_report_against_the_base(tmp_path, capsys):
    config = tmp_path / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=tmp_path / 'demo')))
    out = tmp_path / 'out'
    argv = ['--config', str(config), '--rows', 'base', 'fpn', '--iters', '3', '--out', str(out), '--device', 'cpu']
    rows = camvid_recipes.main(argv)
    assert [r['row'] for r in rows] == ['base', 'fpn'] and rows[0]['difference'] == 0
    assert all(r['miou'][3] is not None and r['miou'][1] is not None and r['minutes'] >= 0 for r in rows)
    assert yaml.safe_load((out / 'fpn' / 'config.yaml').read_text())['head']['type'] == 'fpn'
    printed = capsys.readouterr().out
    assert '| `fpn` | decoder: FPN head' in printed
    assert json.loads((out / 'recipes.json').read_text())['iters'] == 3
    assert camvid_recipes.main(argv) == rows  # a rerun skips the finished rows
    assert capsys.readouterr().out.count('finished, skipped') == 2
