"""Activation checkpointing (`backbone.with_cp`) against keeping the activations: training memory and
step time, in one run.

    OMP_NUM_THREADS=1 python benchmarks/activation_checkpointing.py [--configs camvid segformer_b0 ...]
                                                                    [--batch 2] [--results benchmarks/results]

The arms differ only in `backbone.with_cp`; how they are run and measured: benchmarks/arms.py. The
backbone's blocks recompute their activations in the backward pass, so training keeps less and each
step runs the backbone's forward twice.
"""

from arms import compare, parser

ARMS = {'plain': ['backbone.with_cp=false'], 'with_cp': ['backbone.with_cp=true']}

if __name__ == '__main__':
    configs = ['camvid', 'segformer_b0', 'dinov3_vits16_upernet']
    compare(ARMS, 'activation_checkpointing', parser(__doc__, configs).parse_args())
