"""Training on a frozen foundation backbone against fine-tuning it: memory and step time, in one run.

    OMP_NUM_THREADS=1 python benchmarks/frozen_backbone.py [--configs dinov3_vits16_upernet dinov2_vits14_linear]
                                                           [--batch 2] [--rounds 2] [--results benchmarks/results]

The arms differ only in `backbone.frozen`; how they are run and measured: benchmarks/arms.py.
"""

from arms import compare, parser

ARMS = {'fine-tuned': ['backbone.frozen=false'], 'frozen': ['backbone.frozen=true']}

if __name__ == '__main__':
    compare(ARMS, 'frozen_backbone', parser(__doc__, ['dinov3_vits16_upernet', 'dinov2_vits14_linear']).parse_args())
