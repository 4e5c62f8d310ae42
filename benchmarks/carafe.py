"""CARAFE as OffSeg calls it: this repo's tap loop against a materialised formulation, same run.

Records every `carafe` call of one OffSeg head forward (EfficientFormerV2 widths, random features of
an image of --size, 150 classes), then replays those calls through three implementations, in turn
within each round so that load from other processes falls on all of them alike:

- materialised: the usual pure-PyTorch CARAFE (unfold the k x k neighbourhoods, repeat them to the
  output size, weight and sum): it builds a k²·C·sH·sW tensor per call;
- interleaved taps: k² multiply-adds accumulated straight into the (sH, sW) output (this repo's
  previous carafe): no large tensor, but every multiply-add runs along rows of stride s;
- models.heads.freqfusion.carafe: the same taps accumulated per sub-pixel plane, then interleaved.

For each call and in total: median time and peak memory (the largest amount of tensor memory the
call holds at once beyond its inputs: profiler memory events on CPU, max_memory_allocated on CUDA),
and the ratios of the references to this repo's carafe. Outputs are checked against each other.

    python benchmarks/carafe.py [--variant s1] [--size 512 512] [--runs 10] [--warmup 2] [--device cpu]
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.fast import time_calls  # noqa: E402
from models.backbones.efficientformer_v2 import EfficientFormerV2  # noqa: E402
from models.heads import freqfusion  # noqa: E402
from models.heads.offseg import OffSegHead  # noqa: E402
from tools.measure import latency_ms  # noqa: E402

NEW_CHANNELS = {'s0': (32, 32, 64, 128), 's1': (32, 32, 64, 128), 's2': (32, 64, 128, 256), 'l': (32, 64, 128, 256)}
"""OffSegHead widths per backbone variant, as in configs/offseg_{t,b,l}.yaml."""


def materialised_carafe(features, masks, kernel_size: int, group_size: int, scale_factor: int):
    """Unfold the k x k neighbourhoods (N, C·k², H, W), repeat them to (sH, sW), weight, sum over k²."""
    n, c, h, w = features.shape
    k, s, g = kernel_size, scale_factor, group_size
    unfolded = F.unfold(features, k, padding=k // 2).view(n, c * k * k, h, w)
    unfolded = F.interpolate(unfolded, scale_factor=s, mode='nearest').view(n, g, c // g, k * k, h * s, w * s)
    return (unfolded * masks.view(n, g, 1, k * k, h * s, w * s)).sum(dim=3).view(n, c, h * s, w * s)


def interleaved_carafe(features, masks, kernel_size: int, group_size: int, scale_factor: int):
    """k² multiply-adds into the output viewed as (N, G, C/G, H, s, W, s): innermost stride s."""
    n, c, h, w = features.shape
    k, s, g = kernel_size, scale_factor, group_size
    pad = k // 2
    padded = F.pad(features, (pad, pad, pad, pad)).reshape(n, g, c // g, h + 2 * pad, 1, w + 2 * pad, 1)
    masks = masks.reshape(n, g, k * k, h, s, w, s)
    out = features.new_zeros(n, g, c // g, h, s, w, s)
    for i in range(k):
        for j in range(k):
            out.addcmul_(padded[:, :, :, i : i + h, :, j : j + w], masks[:, :, i * k + j : i * k + j + 1])
    return out.reshape(n, c, h * s, w * s)


IMPLEMENTATIONS = {
    'materialised': materialised_carafe,
    'interleaved taps': interleaved_carafe,
    'this repo': freqfusion.carafe,
}


def recorded_calls(variant: str, size: tuple, device: torch.device) -> list:
    """(features, masks, k, groups, scale) of every carafe call in one OffSeg head forward."""
    torch.manual_seed(0)
    with torch.device('meta'):
        channels = EfficientFormerV2(variant).out_channels
    head = OffSegHead(channels, 150, NEW_CHANNELS[variant]).to(device).eval()
    features = [torch.randn(1, c, size[0] // s, size[1] // s, device=device) for c, s in zip(channels, (4, 8, 16, 32))]
    calls, original = [], freqfusion.carafe

    def record(*args):
        calls.append(args)
        return original(*args)

    freqfusion.carafe = record
    try:
        head(features)
    finally:
        freqfusion.carafe = original
    return calls


def peak_bytes(fn, args, device: torch.device) -> int:
    """Most tensor bytes held at once during fn(*args), beyond what existed before the call."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn(*args)
    live = peak = 0
    for event in sorted(profile.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def describe(args) -> str:
    features, _, k, _, s = args
    _, c, h, w = features.shape
    return f'C={c:<3} {h}x{w} k={k} s={s}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variant', default='s1', choices=list(NEW_CHANNELS), help='backbone (s1: OffSeg-T)')
    parser.add_argument('--size', nargs=2, type=int, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with torch.inference_mode():
        calls = recorded_calls(args.variant, tuple(args.size), device)
        reference = [freqfusion.carafe(*call) for call in calls]
        for name, fn in IMPLEMENTATIONS.items():
            diff = max((fn(*call) - ref).abs().max().item() for call, ref in zip(calls, reference))
            print(f'{name}: max abs diff to this repo {diff:.2e}')
        times = time_calls(
            {
                (name, i): functools.partial(fn, *call)
                for i, call in enumerate(calls)
                for name, fn in IMPLEMENTATIONS.items()
            },
            args.runs,
            args.warmup,
            device,
        )
        peaks = {name: [peak_bytes(fn, call, device) for call in calls] for name, fn in IMPLEMENTATIONS.items()}

    medians = {name: [latency_ms(times[name, i])['median'] for i in range(len(calls))] for name in IMPLEMENTATIONS}
    print(
        f'\n{len(calls)} carafe calls of one OffSeg head forward ({args.variant}, {args.size[0]}x{args.size[1]} '
        f'image, batch 1) on {args.device}, {args.threads} thread(s), median of {args.runs} runs after '
        f'{args.warmup} warm-up rounds (torch {torch.__version__})'
    )
    names = list(IMPLEMENTATIONS)
    print(f'{"call":24}' + ''.join(f'{n + " ms":>20}{n + " MiB":>22}' for n in names))
    rows = [
        (describe(call), [medians[n][i] for n in names], [peaks[n][i] / 2**20 for n in names])
        for i, call in enumerate(calls)
    ]
    rows.append(('total time / max peak', [sum(medians[n]) for n in names], [max(peaks[n]) / 2**20 for n in names]))
    for label, ms, mib in rows:
        print(f'{label:24}' + ''.join(f'{t:>20.2f}{m:>22.1f}' for t, m in zip(ms, mib)))
    ours_ms, ours_mib = rows[-1][1][-1], rows[-1][2][-1]
    for name, ms, mib in zip(names[:-1], rows[-1][1], rows[-1][2]):
        print(f'{name} / this repo: time {ms / ours_ms:.2f}x, peak memory {mib / ours_mib:.2f}x')


if __name__ == '__main__':
    main()
