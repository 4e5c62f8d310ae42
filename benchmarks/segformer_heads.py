"""CPU latency of the SegFormer heads on MiT-B0 features of one 512x512 image, single thread.

The heads are timed in turn within each round (after warm-up rounds), so that load from other
processes falls on all of them alike; the median per head and its ratio to the full head come from
the same run. MACs count convolutions and matmuls only (torch FlopCounterMode / 2).

    python benchmarks/segformer_heads.py [--runs 30] [--warmup 3] [--size 512] [--classes 150]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.fast import time_calls  # noqa: E402
from models.backbones.mit import MiT  # noqa: E402
from models.heads.segformer import (
    ExtremelyFastSegFormerHead,
    SegFormerHead,
    SegFormerMLPHead,  # noqa: E402
    UltraFastSegFormerHead,
)
from tools.measure import count_macs, latency_ms, module_macs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--classes', type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    backbone = MiT('b0').eval()
    heads = {
        'SegFormerHead (full, mmseg)': SegFormerHead,
        'UltraFastSegFormerHead': UltraFastSegFormerHead,
        'ExtremelyFastSegFormerHead': ExtremelyFastSegFormerHead,
        'SegFormerMLPHead (official, E=256)': SegFormerMLPHead,
    }
    heads = {name: head(backbone.out_channels, args.classes).eval() for name, head in heads.items()}
    with torch.inference_mode():
        features = backbone(torch.randn(1, 3, args.size, args.size))
        calls = {name: (lambda head=head: head(features)) for name, head in heads.items()}
        times = time_calls(calls, args.runs, args.warmup, torch.device('cpu'))
        counted = {name: module_macs(count_macs(head, features), '') for name, head in heads.items()}

    print(
        f'MiT-B0 features of a {args.size}x{args.size} image, batch 1, {args.classes} classes, '
        f'1 thread, median of {args.runs} runs after {args.warmup} warm-up rounds (torch {torch.__version__})'
    )
    print(f'{"head":36} {"params":>9} {"GMACs":>7} {"median ms":>10} {"vs full":>8}')
    full = latency_ms(times['SegFormerHead (full, mmseg)'])['median']
    for name, head in heads.items():
        median = latency_ms(times[name])['median']
        params = sum(p.numel() for p in head.parameters())
        print(f'{name:36} {params:>9,} {counted[name] / 1e9:>7.3f} {median:>10.2f} {median / full:>8.3f}')


if __name__ == '__main__':
    main()
