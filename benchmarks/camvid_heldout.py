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
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import peer_smp_camvid  # noqa: E402

from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.outputs import write_results  # noqa: E402
from tools.measure import recorded_rows, write_result_table  # noqa: E402
from tools.results_tables import heldout_cells, table  # noqa: E402

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
    parser.add_argument('--report-only', action='store_true', help='train nothing: summarise the finished pairs')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    return parser.parse_args(argv)


def fold_overrides(fold: str) -> list:
    """Train on the sequences other than `fold`, validate on `fold`'s frames."""
    return [f'data.{part}.split=datasets/splits/camvid_hold_out_{fold}_{part}.txt' for part in ('train', 'val')]


def pair_dir(args, fold: str, seed: int) -> Path:
    return args.out / fold / f'seed{seed}'


def run_pair(args, fold: str, seed: int) -> None:
    """Train (or continue) the peer and ours of one fold and seed, unless they finished with these settings."""
    overrides, out = [*fold_overrides(fold), f'train.seed={seed}', *args.set], pair_dir(args, fold, seed)
    if (out / 'peer_smp_camvid.json').is_file():
        record = json.loads((out / 'peer_smp_camvid.json').read_text())
        if record['config'] == args.config and record['set'] == overrides:
            print(f'{out}: finished, read back', flush=True)
            return
    arguments = ['--config', args.config, '--set', *overrides, '--seed', str(seed), '--out', str(out)]
    peer_smp_camvid.main([*arguments, '--device', args.device, *(['--side-by-side'] if args.side_by_side else [])])


def finished_pairs(args) -> dict:
    """{(fold, seed): what peer_smp_camvid.py wrote} of the pairs that finished in --out."""
    pairs = {}
    for fold in args.folds:
        for seed in args.seeds:
            path = pair_dir(args, fold, seed) / 'peer_smp_camvid.json'
            if path.is_file():
                pairs[fold, seed] = json.loads(path.read_text())
    return pairs


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


def report(args) -> list:
    """Print and write the table of the pairs finished so far; its rows."""
    pairs = {**recorded_pairs(args), **finished_pairs(args)}
    if not pairs:
        raise ConfigError(f'{args.out}: no finished pair of --folds {args.folds} and --seeds {args.seeds} yet')
    rows = summary(dict(sorted(pairs.items(), key=lambda pair: (FOLDS.index(pair[0][0]), pair[0][1]))))
    print(f'val mIoU (%) on the held-out sequence, mean ± std over seeds; ours: {args.config} {" ".join(args.set)}')
    print(table(COLUMNS, [heldout_cells(*row) for row in rows]), flush=True)
    record = {'config': args.config, 'set': args.set, 'columns': COLUMNS, 'rows': rows}
    write_results(args.out, {'heldout.json': json.dumps(record, indent=2) + '\n'})
    if args.results:
        path = write_result_table(args.results, args.study, COLUMNS, rows, args.device, result_notes(args))
        print('results:', path)
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.report_only:
        return report(args)
    recorded, rows = recorded_pairs(args), None
    for seed in args.seeds:
        for fold in args.folds:
            if (fold, seed) in recorded:
                print(f'{fold} seed {seed}: finished, read back from {args.results}', flush=True)
            else:
                run_pair(args, fold, seed)
                rows = report(args)  # after every pair: the table (and result file) follows the study
    return report(args) if rows is None else rows


if __name__ == '__main__':
    run_cli(main)
