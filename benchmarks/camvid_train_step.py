"""The CamVid recipe's training step against segmentation_models_pytorch's, and against the machine's GEMM rate.

    pip install -r benchmarks/requirements.txt
    python benchmarks/camvid_train_step.py [--threads 1 2] [--rounds 5] [--results benchmarks/results]

Arms, each its own loss and optimizer on the same random batch (--batch crops of the config's crop size):
  peer            SMP's FPN('resnet18') with the CamVid example's Dice and Adam (peer_smp_camvid.py), NCHW
  ours, NCHW      --config with train.channels_last off
  ours            --config as shipped (configs/camvid.yaml: channels_last)
  ours, compiled  --config as shipped, its model under torch.compile (inductor; needs a C++ compiler)
  ours, bf16      --config with train.amp=bf16 (only where the CPU computes bfloat16 in hardware)
The two models have the same parameters; one step is zero grads, forward, loss, backward, the
optimizer step and, for ours, the recipe's moving average of the weights (tools/measure.py
`train_call`). For each thread count the arms and a large square matmul in each arm's dtype (the
machine's GEMM rate) run in turn within every round, after warm-up rounds; medians. GMAC/s is the
step's multiply-accumulates (forward and backward, counted by FlopCounterMode) over its median time,
and "of GEMM" its share of the matmul's rate.
"""

import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from peer_smp_camvid import crop_size, peer_training  # noqa: E402

from engine.cli import AMP_DTYPES, ArgumentParser, cpu_computes, number, run_cli  # noqa: E402
from engine.fast import time_calls  # noqa: E402
from tools.measure import build_model, random_weights_config, train_call, write_result_table  # noqa: E402

DEFAULT_CONFIG = 'configs/camvid.yaml'
GEMM_SIDE = 4096
COMPILED = 'ours, compiled'
OURS = {'ours, NCHW': ['train.channels_last=false'], 'ours': [], COMPILED: [], 'ours, bf16': ['train.amp=bf16']}
"""arm: its overrides of --config (COMPILED: the shipped config, its model under torch.compile)"""
COLUMNS = ['threads', 'arm', 'ms/step', 'images/s', 'vs peer', 'GMAC/s', 'of GEMM']


def our_step(config: str, overrides: list, compiled: bool, images: torch.Tensor):
    """(step, dtype) of the config's model, loss and optimizer, in the config's memory order and AMP dtype;
    `compiled`: the model under torch.compile (compiled at the first step)."""
    cfg = random_weights_config(config, overrides)
    model = build_model(cfg, images.device).train()
    if cfg['train']['channels_last']:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if compiled:
        model = torch.compile(model)
    amp = cfg['train']['amp'] or None
    return train_call(model, cfg, images, amp), AMP_DTYPES.get(amp, torch.float32)


def peer_step(cfg: dict, images: torch.Tensor):
    model, dice, optimizer = peer_training(cfg['data']['num_classes'], cfg['data']['ignore_index'], images.device)
    labels = torch.randint(0, cfg['data']['num_classes'], (images.shape[0], *images.shape[2:]))

    def step():
        loss = dice(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def gemm(dtype: torch.dtype):
    a, b = torch.randn(GEMM_SIDE, GEMM_SIDE, dtype=dtype), torch.randn(GEMM_SIDE, GEMM_SIDE, dtype=dtype)
    return lambda: a @ b


def step_macs(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 2


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--config', default=DEFAULT_CONFIG, help=f'(default: {DEFAULT_CONFIG})')
    parser.add_argument('--threads', nargs='+', type=number(int, 1), default=[1, 2])
    parser.add_argument('--batch', type=number(int, 1), default=8, help="(default: 8, the recipe's batch)")
    parser.add_argument('--rounds', type=number(int, 1), default=5)
    parser.add_argument('--warmup', type=number(int, 0), default=2)
    parser.add_argument('--results', type=Path, help='write the table as a result file into this folder')
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    cfg = random_weights_config(args.config)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, *crop_size(cfg))
    steps, dtypes = {'peer': peer_step(cfg, images)}, {'peer': torch.float32}
    for arm, overrides in OURS.items():
        if arm.endswith('bf16') and not cpu_computes(torch.bfloat16):
            print(f'{arm}: skipped, this CPU has no bfloat16 arithmetic')
        elif arm == COMPILED and not shutil.which(os.environ.get('CXX', 'g++')):
            print(f'{arm}: skipped, torch.compile needs a C++ compiler (g++, or $CXX)')
        else:
            steps[arm], dtypes[arm] = our_step(args.config, overrides, arm == COMPILED, images)
    macs = {arm: step_macs(step) for arm, step in steps.items() if arm != COMPILED}
    if COMPILED in steps:
        macs[COMPILED] = macs['ours']  # the shipped step; FlopCounterMode does not see into compiled code
    gemms = {f'GEMM {dtype}': gemm(dtype) for dtype in set(dtypes.values())}

    rows, initial_threads = [], torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        seconds = time_calls({**steps, **gemms}, args.rounds, args.warmup, torch.device('cpu'))
        median = {name: statistics.median(times) for name, times in seconds.items()}
        for arm in steps:
            gemm_rate = GEMM_SIDE**3 / median[f'GEMM {dtypes[arm]}']
            rate = macs[arm] / median[arm]
            speed = args.batch / median[arm]
            vs_peer = median['peer'] / median[arm]
            rows.append([threads, arm, 1e3 * median[arm], speed, vs_peer, rate / 1e9, rate / gemm_rate])
    torch.set_num_threads(initial_threads)
    print(
        f'training step of {args.config} against SMP FPN-ResNet18, batch {args.batch} of '
        f'{"x".join(map(str, images.shape[2:]))}, medians of {args.rounds} rounds after {args.warmup} warm-up'
    )
    print(f'{COLUMNS[0]:>8}{COLUMNS[1]:>16}' + ''.join(f'{c:>12}' for c in COLUMNS[2:]))
    for row in rows:
        print(f'{row[0]:>8}{row[1]:>16}' + ''.join(f'{value:>12.2f}' for value in row[2:]))
    if args.results:
        notes = [
            f'{args.batch} crops of {"x".join(map(str, images.shape[2:]))}; each arm its own loss and optimizer '
            "(ours: the config's; the peer: its example's Dice and Adam); arms and the GEMMs interleaved",
            f'step GMACs (forward and backward): {"; ".join(f"{arm}: {m / 1e9:.1f}" for arm, m in macs.items())}',
            'threads: each row its own (the environment above records the count the process started with)',
            f"GEMM: one {GEMM_SIDE}x{GEMM_SIDE} matmul in the arm's dtype, timed in the same rounds",
        ]
        print(f'wrote {write_result_table(args.results, "camvid_train_step", COLUMNS, rows, "cpu", notes)}')
    return rows


if __name__ == '__main__':
    run_cli(main)
