"""Training-step throughput and memory per config, with ratios against a reference config.

One step is what train.py does per iteration: zero gradients, forward, the config's loss, backward,
the config's optimizer step and moving average (tools/measure.py `train_call`), on a random batch
and random labels. All models are built first and stepped in turn within each round (after warm-up rounds),
so that load from other processes falls on all of them alike; the ratios come from the same run.

"step MB" is what one more step, after the timed rounds, adds to the memory in use before it
(activations, gradients, temporaries; the optimizer state already exists): on CPU the rise of the
process's peak RSS, on CUDA of torch.cuda.max_memory_allocated.

    python benchmarks/train_step.py [--configs configs/segformer_b0.yaml configs/segnext_t.yaml ...]
                                    [--reference segformer_b0] [--size 512 512] [--batch 2] [--runs 5]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.fast import time_calls  # noqa: E402
from tools.measure import build_model, latency_ms, peak_memory, random_weights_config, train_call  # noqa: E402

CONFIGS = ['configs/segformer_b0.yaml', 'configs/segnext_t.yaml', 'configs/offseg_t.yaml']


def step_memory(call, device: torch.device) -> float:
    """MB that one more step adds to the memory in use before it (run after the timed rounds, so the
    optimizer state already exists and the timing does not pay for the measurement)."""
    with peak_memory(device) as memory:
        call()
    return memory['added_memory_mb']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=CONFIGS)
    parser.add_argument('--reference', help='config name (file stem) the ratios are relative to (default: the first)')
    parser.add_argument('--size', nargs=2, type=int, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', choices=['bf16', 'fp16'])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [Path(path).stem for path in args.configs]
    reference = args.reference or names[0]
    if reference not in names:
        parser.error(f"--reference '{reference}' is not one of the configs: {', '.join(names)}")

    calls = {}
    images = torch.randn(args.batch, 3, *args.size, device=device)
    for name, path in zip(names, args.configs):
        cfg = random_weights_config(path)
        calls[name] = train_call(build_model(cfg, device).train(), cfg, images, args.amp)
    times = time_calls(calls, args.runs, args.warmup, device)
    medians = {name: latency_ms(seconds)['median'] for name, seconds in times.items()}
    peaks = {name: step_memory(call, device) for name, call in calls.items()}

    print(
        f'training step on {device}, batch {args.batch} of {args.size[0]}x{args.size[1]}, {args.threads} '
        f'thread(s), amp {args.amp or "off"}, median of {args.runs} rounds after {args.warmup} warm-up '
        f'(torch {torch.__version__})'
    )
    print(f'{"config":<28}{"ms/step":>10}{"images/s":>10}{"vs ref":>8}{"step MB":>9}{"vs ref":>8}')
    for name in names:
        speed = 1e3 * args.batch / medians[name]
        ref_speed = 1e3 * args.batch / medians[reference]
        print(
            f'{name:<28}{medians[name]:>10.1f}{speed:>10.2f}{speed / ref_speed:>8.2f}'
            f'{peaks[name]:>9.0f}{peaks[name] / peaks[reference]:>8.2f}'
        )


if __name__ == '__main__':
    main()
