"""Two ways to train one config, side by side in one run: training memory and step time of each arm.

What `frozen_backbone.py` and `activation_checkpointing.py` share. Each arm is a fresh process, so
that its peak resident memory is its own: it builds the config's model with random weights and the
arm's overrides, then runs training steps as train.py does (tools/measure.py `train_call`: forward,
loss, backward, optimizer step, moving average) on a random batch of the config's training size. "training MB" is
what training adds to the built model: the optimizer state, the gradients and the activations kept
for backward (CPU: the rise of the peak RSS; CUDA: of torch.cuda.max_memory_allocated). The arms
alternate for --rounds rounds; the table gives the median step and the largest memory of each arm.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.fast import time_calls  # noqa: E402
from engine.rules import input_size  # noqa: E402
from tools.measure import build_model, peak_memory, random_weights_config, train_call, write_result_table  # noqa: E402


def step_arm(config: str, overrides: list, args) -> dict:
    """One arm in this process: {seconds: [...], trainable, training_mb}."""
    device = torch.device(args.device)
    cfg = random_weights_config(ROOT / f'configs/{config}.yaml', overrides)
    model = build_model(cfg, device).train()
    images = torch.randn(args.batch, 3, *input_size(cfg), device=device)
    with peak_memory(device) as memory:
        step = train_call(model, cfg, images, args.amp)
        seconds = time_calls({'step': step}, args.runs, args.warmup, device)['step']
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {'seconds': seconds, 'trainable': trainable, 'training_mb': memory['added_memory_mb']}


def run_arm(config: str, overrides: list, args) -> dict:
    command = [sys.executable, __file__, '--arm', config, json.dumps(overrides), '--batch', str(args.batch)]
    command += ['--runs', str(args.runs), '--warmup', str(args.warmup), '--threads', str(args.threads)]
    command += ['--device', args.device] + (['--amp', args.amp] if args.amp else [])
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def measure(config: str, arms: dict, args) -> dict:
    """{arm: {ms, trainable, training_mb}} over --rounds alternations of the arms ({name: overrides})."""
    runs = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm, overrides in arms.items():
            runs[arm].append(run_arm(config, overrides, args))
    return {
        arm: {
            'ms': 1e3 * statistics.median(s for run in results for s in run['seconds']),
            'trainable': results[0]['trainable'],
            'training_mb': max(run['training_mb'] for run in results),
        }
        for arm, results in runs.items()
    }


def parser(doc: str, configs: list) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=configs, metavar='NAME')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=2, help='alternations of the two arms')
    parser.add_argument('--runs', type=int, default=3, help='timed steps per arm and round')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', choices=['bf16', 'fp16'])
    parser.add_argument('--results', type=Path, metavar='DIR', help='also write the table as a result file there')
    return parser


def compare(arms: dict, study: str, args) -> list:
    """Print (and with --results write) the table of every config's arms; returns its rows."""
    torch.set_num_threads(args.threads)
    protocol = (
        f"training steps on {args.device}, batch {args.batch} at the config's training size, amp {args.amp or 'off'}, "
        f'{args.threads} thread(s), medians of {args.rounds} x {args.runs} steps per arm, arms alternating'
    )
    print(protocol)
    print('| config | arm | trainable params (M) | ms/step | training MB |')
    print('|---|---|---|---|---|')
    table = []
    for config in args.configs:
        for arm, row in measure(config, arms, args).items():
            print(
                f'| {config} | {arm} | {row["trainable"] / 1e6:.3f} | {row["ms"]:.0f} | {row["training_mb"]:.0f} |',
                flush=True,
            )
            table.append([config, arm, row['trainable'], row['ms'], row['training_mb']])
    if args.results:
        columns = ['config', 'arm', 'trainable params', 'ms/step', 'training MB']
        print('results:', write_result_table(args.results, study, columns, table, args.device, [protocol]))
    return table


if __name__ == '__main__':  # one arm, in its own process (run_arm)
    arm_parser = parser(__doc__, [])
    arm_parser.add_argument('--arm', nargs=2, metavar=('CONFIG', 'OVERRIDES'), required=True)
    arm_args = arm_parser.parse_args()
    torch.set_num_threads(arm_args.threads)
    print(json.dumps(step_arm(arm_args.arm[0], json.loads(arm_args.arm[1]), arm_args)))
