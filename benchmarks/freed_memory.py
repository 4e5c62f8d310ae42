"""Eager forwards on CPU with glibc's default malloc against `engine.fast.keep_freed_memory`, in one run.

    OMP_NUM_THREADS=1 python benchmarks/freed_memory.py [--configs offseg_t segformer_b0] [--sizes 512 1024]

glibc's defaults cannot be restored inside a process once changed (its mmap threshold adapts as the
process runs; setting it fixes it), so each arm is a fresh process (`--arm`) that builds the model
as evaluate.py does (BN folded), warms up and times --runs forwards; the arms alternate for
--rounds rounds, so that load from other processes falls on both alike. Prints per config and size the
median ms of each arm, the speed-up, and the peak resident memory of each process (the cost: kept
memory stays resident). The outputs are the same by construction: only the allocator changes.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine import fast  # noqa: E402
from engine.fast import time_calls  # noqa: E402
from engine.rules import load_config  # noqa: E402
from tools.measure import inference_call, rss_mb, write_result_table  # noqa: E402
from train import create_model  # noqa: E402

ARMS = ('glibc defaults', 'freed memory kept')


def time_arm(config: str, side: int, kept: bool, runs: int, warmup: int) -> dict:
    """One arm in this process: {seconds: [...], peak_mb}."""
    model = create_model(load_config(ROOT / f'configs/{config}.yaml', ['backbone.pretrained=null']))
    skipped = contextlib.nullcontext() if kept else mock.patch.object(fast, 'keep_freed_memory', lambda: False)
    with skipped:
        model = fast.prepare_for_inference(model)
    call = inference_call(model, torch.randn(1, 3, side, side), None)
    seconds = time_calls({'forward': call}, runs, warmup, torch.device('cpu'))['forward']
    return {'seconds': seconds, 'peak_mb': rss_mb('VmHWM')}


def run_arm(config: str, side: int, kept: bool, args) -> dict:
    command = [sys.executable, __file__, '--arm', config, str(side), str(int(kept))]
    command += ['--runs', str(args.runs), '--warmup', str(args.warmup), '--threads', str(args.threads)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def measure(config: str, side: int, args) -> dict:
    seconds, peaks = {arm: [] for arm in ARMS}, {arm: 0.0 for arm in ARMS}
    for _ in range(args.rounds):
        for arm in ARMS:
            result = run_arm(config, side, arm == ARMS[1], args)
            seconds[arm] += result['seconds']
            peaks[arm] = max(peaks[arm], result['peak_mb'] or 0.0)
    ms = {arm: 1e3 * statistics.median(values) for arm, values in seconds.items()}
    return {'config': config, 'side': side, 'ms': ms, 'peak_mb': peaks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=['offseg_t', 'segformer_b0'], metavar='NAME')
    parser.add_argument('--sizes', nargs='+', type=int, default=[512, 1024], metavar='SIDE')
    parser.add_argument('--rounds', type=int, default=3, help='alternations of the two arms')
    parser.add_argument('--runs', type=int, default=5, help='timed forwards per arm and round')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--results', type=Path, metavar='DIR', help='also write the table as a result file there')
    parser.add_argument('--arm', nargs=3, metavar=('CONFIG', 'SIDE', 'KEPT'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.arm:
        config, side, kept = args.arm
        print(json.dumps(time_arm(config, int(side), bool(int(kept)), args.runs, args.warmup)))
        return
    protocol = f'{args.threads} thread(s), medians of {args.rounds} x {args.runs} forwards per arm, arms alternating'
    print(protocol)
    table = []
    print('| model | input | glibc defaults (ms) | freed memory kept (ms) | speed-up | peak RSS (MB) |')
    print('|---|---|---|---|---|---|')
    for config in args.configs:
        for side in args.sizes:
            row = measure(config, side, args)
            before, after = (row['ms'][arm] for arm in ARMS)
            peaks = ' / '.join(f'{row["peak_mb"][arm]:.0f}' for arm in ARMS)
            print(f'| {config} | {side}² | {before:.1f} | {after:.1f} | {before / after:.2f} | {peaks} |', flush=True)
            table.append([config, side, before, after, *(row['peak_mb'][arm] for arm in ARMS)])
    if args.results:
        columns = ['model', 'side', 'glibc defaults (ms)', 'freed memory kept (ms)', 'peak MB, glibc', 'peak MB, kept']
        print('results:', write_result_table(args.results, 'freed_memory', columns, table, 'cpu', [protocol]))


if __name__ == '__main__':
    main()
