"""Regenerate every generated part of the docs: from the code (ARCHITECTURES.md's model tables,
configs/README.md's option tables) and from the result files in benchmarks/results/ (README.md's
model and results tables, the tables of docs/).

    python tools/make_docs.py            # rewrite the parts that are stale
    python tools/make_docs.py --check    # name them and exit 1 (the test suite runs this)

A generated part sits between `<!-- generated: NAME -->` and `<!-- end of generated: NAME -->`.
The text around it is written by hand and quotes no measured number: numbers come from the result
files, which the scripts that measured them wrote (tests/test_generated_docs.py and
tests/test_docs.py check both).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import ArgumentParser, run_cli  # noqa: E402
from engine.outputs import write_text  # noqa: E402
from tools import config_tables, model_table, results_tables  # noqa: E402

PAGES = {
    'README.md': {'models': results_tables.readme_models, 'results': results_tables.readme_results},
    'ARCHITECTURES.md': {'model_table': model_table.tables},
    'configs/README.md': {'losses': config_tables.losses, 'metrics': config_tables.metrics},
    'docs/model_zoo.md': {'model_zoo': results_tables.model_zoo},
    'docs/camvid.md': {
        'camvid_runs': results_tables.camvid_runs,
        'camvid_peer': results_tables.camvid_peer,
        'camvid_seeds': results_tables.camvid_seeds,
        'camvid_heldout': results_tables.camvid_heldout,
        'camvid_heldout_recipes': results_tables.camvid_heldout_recipes,
        'camvid_recipes': results_tables.camvid_recipes,
        'camvid_recipes_early': results_tables.camvid_recipes_early,
        'camvid_recipes_short': results_tables.camvid_recipes_short,
    },
    'docs/offset_learning.md': {'ablation': results_tables.ablation},
    'docs/speed.md': {
        'speed_models': results_tables.speed_models,
        'eomt_speed': results_tables.eomt_speed,
        'size_sweep': results_tables.size_sweep,
        'compare_hf': results_tables.compare_hf,
        'offseg_speed': results_tables.offseg_speed,
        'freed_memory': results_tables.freed_memory,
        'onnx_runtime': results_tables.onnx_runtime,
        'camvid_train_step': results_tables.camvid_train_step,
    },
    'docs/deploy.md': {'onnx_int8': results_tables.onnx_int8},
    'docs/training.md': {
        'frozen_backbone': results_tables.frozen_backbone,
        'activation_checkpointing': results_tables.activation_checkpointing,
    },
}
"""Page -> {block name: function of the page's path that returns the block's Markdown}."""


def markers(name: str) -> tuple:
    return f'<!-- generated: {name} -->', f'<!-- end of generated: {name} -->'


def generated(page: str) -> str:
    """The page with each of its generated parts as the code and the result files give it now."""
    path = ROOT / page
    document = path.read_text()
    for name, render in PAGES[page].items():
        begin, end = markers(name)
        if document.count(begin) != 1 or document.count(end) != 1:
            raise SystemExit(f'error: {page} must hold {begin} ... {end} once')
        start, stop = document.index(begin) + len(begin), document.index(end)
        document = f'{document[:start]}\n{render(path).strip()}\n{document[stop:]}'
    return document


def stale_pages() -> list:
    return [page for page in PAGES if generated(page) != (ROOT / page).read_text()]


def main(argv=None) -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument('--check', action='store_true', help='rewrite nothing: name the stale pages, exit 1 if any')
    args = parser.parse_args(argv)
    stale = stale_pages()
    if args.check:
        if stale:
            raise SystemExit(f'stale: {", ".join(stale)}; run python tools/make_docs.py')
        print('every generated part is up to date')
        return
    for page in stale:
        write_text(ROOT / page, generated(page))
        print(f'rewrote {page}')


if __name__ == '__main__':
    run_cli(main)
