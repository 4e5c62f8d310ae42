"""The CamVid recipe against SMP's example on street sequences held out of training, over seeds.

    pip install -r benchmarks/requirements.txt
    OMP_NUM_THREADS=1 nice python benchmarks/camvid_heldout.py [--config configs/camvid.yaml] \\
        [--folds 0006R0 0001TP] [--seeds 0 1 2] [--results benchmarks/results]

CamVid's val split is 101 frames of sequence 0016E5, whose other 204 frames are in train: a recipe chosen
there is chosen on near-duplicates of frames it trained on. Each fold here trains on the other sequences
and validates on one held out whole (datasets/splits/camvid_hold_out_<fold>_{train,val}.txt, also the
configs/_base_/datasets/camvid_hold_out_<fold>.yaml overlays). For each seed, then each fold,
benchmarks/peer_smp_camvid.py trains the peer and ours with that seed into <out>/<fold>/seed<seed>:
finished pairs are read back, a stopped one continues where it stopped (run this command again). With
--results, the pairs that result file already holds for this setting count as finished too: the study
goes on from a fresh checkout whose run folders are gone.

Printed, and written to <out>/heldout.json (and with --results, as the result file the docs render):
per fold and validation point, the mean ± std over the finished seeds of the peer, of ours (the
weights the recipe delivers: the moving average where it keeps one) and of their paired difference.

With --rows, the recipe study under this protocol: each row of benchmarks/camvid_recipes.py (one change
of --config) is trained on every fold and seed after its pair, into <out>/<fold>/seed<seed>/<row>
(train.py processes, --jobs at a time, each row on every fold before the next row), and compared with
the peer and with ours of the same fold and seed (the result file <study>_recipes):

    OMP_NUM_THREADS=1 nice python benchmarks/camvid_heldout.py --seeds 0 --jobs 2 \
        --rows aug_strong ce_dice_smp lovasz aug_smp lr_2e-3 no_ema os16 aspp lr_5e-4 poly dice \
        --results benchmarks/results
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import camvid_recipes  # noqa: E402
import peer_smp_camvid  # noqa: E402
from ablation import is_finished, resumable_run, run_processes, say  # noqa: E402

from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.outputs import write_results  # noqa: E402
from engine.rules import load_config  # noqa: E402
from tools.measure import recorded_rows, write_result_table  # noqa: E402
from tools.results_tables import heldout_cells, heldout_row_table, table  # noqa: E402

FOLDS = ('0006R0', '0001TP', '0016E5')
"""The training sequences of CamVid; 0016E5 held out leaves 163 training frames."""


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--config', default=peer_smp_camvid.DEFAULT_CONFIG, help='ours (default: %(default)s)')
    parser.add_overrides('overrides of --config, for both runs of every fold and seed')
    parser.add_argument('--folds', nargs='+', choices=FOLDS, default=list(FOLDS[:2]), help='(default: %(default)s)')
    parser.add_argument('--seeds', nargs='+', type=number(int, 0), default=[0, 1, 2], help='(default: %(default)s)')
    parser.add_argument('--out', type=Path, default=Path('work_dirs/camvid_heldout'), help='(default: %(default)s)')
    parser.add_argument(
        '--results', type=Path, metavar='DIR', help='also write the table as a result file there (what the docs render)'
    )
    parser.add_argument('--study', default='camvid_heldout', help='the result file name (default: %(default)s)')
    parser.add_argument(
        '--side-by-side', action='store_true', help="train each pair's two runs at once (peer_smp_camvid.py's option)"
    )
    parser.add_argument(
        '--rows',
        nargs='+',
        default=[],
        type=camvid_recipes.row_name,
        help="also train these rows of benchmarks/camvid_recipes.py (changes of --config; '+' joins rows)",
    )
    parser.add_argument('--jobs', type=number(int, 1), default=1, help='row runs at a time (default: 1)')
    parser.add_argument('--report-only', action='store_true', help='train nothing: summarise the finished runs')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    return parser.parse_args(argv)


def fold_overrides(fold: str) -> list:
    """Train on the sequences other than `fold`, validate on `fold`'s frames."""
    return [f'data.{part}.split=datasets/splits/camvid_hold_out_{fold}_{part}.txt' for part in ('train', 'val')]


def pair_dir(args, fold: str, seed: int) -> Path:
    return args.out / fold / f'seed{seed}'


def pair_overrides(args, fold: str, seed: int) -> list:
    return [*fold_overrides(fold), f'train.seed={seed}', *args.set]


def finished_pair(args, fold: str, seed: int):
    """What peer_smp_camvid.py wrote for this fold and seed, if the pair finished with these settings."""
    path = pair_dir(args, fold, seed) / 'peer_smp_camvid.json'
    record = json.loads(path.read_text()) if path.is_file() else {}
    return record if record.get('config') == args.config and record['set'] == pair_overrides(args, fold, seed) else None


def run_pair(args, fold: str, seed: int) -> None:
    """Train (or continue) the peer and ours of one fold and seed, unless they finished with these settings."""
    overrides, out = pair_overrides(args, fold, seed), pair_dir(args, fold, seed)
    if finished_pair(args, fold, seed):
        print(f'{out}: finished, read back', flush=True)
        return
    arguments = ['--config', args.config, '--set', *overrides, '--seed', str(seed), '--out', str(out)]
    peer_smp_camvid.main([*arguments, '--device', args.device, *(['--side-by-side'] if args.side_by_side else [])])


def finished_pairs(args) -> dict:
    """{(fold, seed): what peer_smp_camvid.py wrote} of the pairs that finished in --out with these settings."""
    pairs = {(fold, seed): finished_pair(args, fold, seed) for fold in args.folds for seed in args.seeds}
    return {key: pair for key, pair in pairs.items() if pair}


def recorded_pairs(args) -> dict:
    """{(fold, seed): {'rows': [[iteration, peer, ours], ...]}} of the pairs the --results file holds for
    this config and overrides (its notes say which), whatever --folds and --seeds are now."""
    pairs = {}
    for row in recorded_rows(args.results, args.study, args.device, result_notes(args)):
        for seed, peer, ours in zip(row['seeds'], row['peer'], row['ours']):
            pairs.setdefault((row['held out'], seed), {'rows': []})['rows'].append([row['iteration'], peer, ours])
    return pairs


def result_notes(args) -> list:
    return [
        'val mIoU (%) on the frames of the held-out sequence, whole images, per seed (in the order listed); '
        'the peer and ours trained with the same seed; ours: the weights the recipe delivers (its moving average)',
        f'ours: {args.config}, overrides {args.set}; the peer: benchmarks/peer_smp_camvid.py',
    ]


COLUMNS = ['held out', 'iteration', 'seeds', 'peer', 'ours', 'ours − peer']


def summary(pairs: dict) -> list:
    """Rows [fold, iteration, seeds, peer, ours, ours − peer] from {(fold, seed): pair result}, each
    score a list over the seeds."""
    rows = []
    for fold in dict.fromkeys(fold for fold, _ in pairs):
        results = [result for (f, _), result in pairs.items() if f == fold]
        seeds = [seed for (f, seed) in pairs if f == fold]
        for point, *_ in results[0]['rows']:
            peer = [next(p for i, p, *_ in r['rows'] if i == point) for r in results]
            ours = [next(o for i, _, o, *_ in r['rows'] if i == point) for r in results]
            rows.append([fold, point, seeds, peer, ours, [o - p for o, p in zip(ours, peer)]])
    return rows


ROW_COLUMNS = ['row', 'change', 'held out', 'iteration', 'seeds', 'score', 'row − peer', 'row − recipe', 'minutes']


def row_plan(args) -> list:
    """[((row, fold, seed), work dir, overrides, iterations)] of --rows, each row on every fold before the
    next row; every run's config is checked here, before anything trains."""
    if 'base' in args.rows:
        raise ConfigError("--rows: 'base' is --config itself, trained as 'ours' of every pair")
    plan = []
    for seed in args.seeds:
        for row in args.rows:
            for fold in args.folds:
                overrides = [*fold_overrides(fold), f'train.seed={seed}', *camvid_recipes.row_change(row)[1], *args.set]
                iterations = load_config(args.config, overrides)['train']['max_iters']
                plan.append(((row, fold, seed), pair_dir(args, fold, seed) / row, overrides, iterations))
    return plan


def train_rows(args, plan: list) -> None:
    """Train the row runs not finished yet (in --out, or in the --results file), --jobs at a time, the
    tables and result files written again as each one finishes."""
    recorded, todo = recorded_row_runs(args), []
    for key, work_dir, overrides, iterations in plan:
        if is_finished(work_dir, iterations):
            say(f'{work_dir}: finished, skipped')
        elif key in recorded:
            say(f'{work_dir}: finished, read back from {args.results}')
        else:
            todo.append((work_dir, resumable_run(args.config, work_dir, args.device, overrides)))
    run_processes(todo, args.jobs, after_each=lambda: report(args, plan))


def finished_row_runs(plan: list) -> dict:
    """{(row, fold, seed): ({iteration: val mIoU}, minutes)} of the row runs that finished in --out: the
    weights each delivers (its moving average where it keeps one), and the run's wall time."""
    return {
        key: (dict(peer_smp_camvid.our_curve(work_dir)[0]), camvid_recipes.minutes(work_dir))
        for key, work_dir, _, iterations in plan
        if is_finished(work_dir, iterations)
    }


def recorded_row_runs(args) -> dict:
    """{(row, fold, seed): ({iteration: val mIoU}, minutes)} of the row runs the --results file holds for
    this config and overrides, whatever --rows, --folds and --seeds are now."""
    runs = {}
    for row in recorded_rows(args.results, f'{args.study}_recipes', args.device, row_notes(args)):
        for seed, score, minutes in zip(row['seeds'], row['score'], row['minutes']):
            runs.setdefault((row['row'], row['held out'], seed), ({}, minutes))[0][row['iteration']] = score
    return runs


def row_notes(args) -> list:
    return [
        'val mIoU (%) on the frames of the held-out sequence, whole images, per seed (in the order listed), of '
        'the weights each row delivers (its moving average where it keeps one)',
        f'rows: changes of {args.config} (benchmarks/camvid_recipes.py), overrides {args.set}; − peer and − '
        "recipe: paired by seed with the peer and ours of benchmarks/camvid_heldout.py's pair of that fold",
        "minutes: each run's wall time from its start to its last record (a pause counts), with --jobs runs at a "
        'time (the command says how many)',
    ]


def row_summary(pairs: dict, runs: dict) -> list:
    """Rows of ROW_COLUMNS from the pairs {(fold, seed): pair result} and the row runs {(row, fold, seed):
    ({iteration: score}, minutes)}, each value a list over the seeds that have both; rows in the order
    first run, folds in FOLDS' order."""
    at = {key: {i: (peer, ours) for i, peer, ours, *_ in pair['rows']} for key, pair in pairs.items()}
    trained = {(row, fold) for row, fold, _ in runs}
    keys = [(row, fold) for row in dict.fromkeys(r for r, _, _ in runs) for fold in FOLDS if (row, fold) in trained]
    rows = []
    for row, fold in keys:
        seeds = sorted(seed for r, f, seed in runs if (r, f) == (row, fold) and (fold, seed) in at)
        for point in sorted(runs[row, fold, seeds[0]][0]) if seeds else []:
            scores = [runs[row, fold, seed][0][point] for seed in seeds]
            peer, ours = zip(*(at[fold, seed][point] for seed in seeds))
            rows.append(
                [
                    row,
                    camvid_recipes.row_change(row)[0],
                    fold,
                    point,
                    seeds,
                    scores,
                    [s - p for s, p in zip(scores, peer)],
                    [s - o for s, o in zip(scores, ours)],
                    [runs[row, fold, seed][1] for seed in seeds],
                ]
            )
    return rows


def report(args, plan: list) -> list:
    """Print and write the tables of the runs finished so far; the pairs' rows."""
    pairs = {**recorded_pairs(args), **finished_pairs(args)}
    if not pairs:
        raise ConfigError(f'{args.out}: no finished pair of --folds {args.folds} and --seeds {args.seeds} yet')
    rows = summary(dict(sorted(pairs.items(), key=lambda pair: (FOLDS.index(pair[0][0]), pair[0][1]))))
    print(f'val mIoU (%) on the held-out sequence, mean ± std over seeds; ours: {args.config} {" ".join(args.set)}')
    print(table(COLUMNS, [heldout_cells(*row) for row in rows]), flush=True)
    record = {'config': args.config, 'set': args.set, 'columns': COLUMNS, 'rows': rows}
    texts = {'heldout.json': json.dumps(record, indent=2) + '\n'}
    runs = {**recorded_row_runs(args), **finished_row_runs(plan)}
    recipe_rows = row_summary(pairs, runs)
    if recipe_rows:
        print(f'the rows: changes of {args.config}; each point: mIoU (row − peer), mean ± std over seeds')
        print(heldout_row_table([dict(zip(ROW_COLUMNS, row)) for row in recipe_rows]), flush=True)
        texts['heldout_recipes.json'] = (
            json.dumps({**record, 'columns': ROW_COLUMNS, 'rows': recipe_rows}, indent=2) + '\n'
        )
    write_results(args.out, texts)
    if args.results:
        print('results:', write_result_table(args.results, args.study, COLUMNS, rows, args.device, result_notes(args)))
        if recipe_rows:
            study, notes = f'{args.study}_recipes', row_notes(args)
            print('results:', write_result_table(args.results, study, ROW_COLUMNS, recipe_rows, args.device, notes))
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    plan = row_plan(args)
    if not args.report_only:
        recorded = recorded_pairs(args)
        for seed in args.seeds:
            for fold in args.folds:
                if (fold, seed) in recorded:
                    print(f'{fold} seed {seed}: finished, read back from {args.results}', flush=True)
                else:
                    run_pair(args, fold, seed)
                    report(args, plan)  # after every pair: the tables (and result files) follow the study
        train_rows(args, plan)
    return report(args, plan)


if __name__ == '__main__':
    run_cli(main)
