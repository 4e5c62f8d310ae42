"""OffSeg-T's eager speed-ups, each against the code it replaced, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/offseg_speed.py [--sizes 256 512 1024] [--runs 7] [--threads 1]

Each change is timed on what it touches, before (the replaced code, kept below and patched in with
unittest.mock) and after (the repo's code), the two calls interleaved within each round
(engine/fast.time_calls) so that load from other processes falls on both alike; the outputs are
compared (max |after - before| / max |before|):

- attention bias: EfficientFormerV2's attention biases gathered and resized bicubically on every
  call, against skipping the resize at the tables' own size and keeping the bias per size in eval
  (models/backbones/efficientformer_v2.py, BiasCache). Timed on the S1 backbone.
- attention logits: (q·k)·scale + bias as a product and two passes over the logits, against one
  baddbmm (`attention_logits`). Timed on the S1 backbone, the bias change in both.
- attention in query blocks: the whole (B, heads, Nq, Nk) logits at once, against blocks of query rows
  whose logits stay in cache through the softmax (`attend`). Timed on the S1 backbone.
- attention channel-major: values and output token-major (B, heads, N, c), transposed from and back
  to NCHW around the products, against v · attnᵀ on the maps as they are, in blocks (`attend`);
  undoing it undoes the blocks too. Timed on the S1 backbone.
- upsampling channels_last: the stride-2 attention's output upsampled and projected in NCHW, against
  channels_last (`Attention4D.upsample_and_project`). Timed on the S1 backbone.
- stem channels_last: EfficientFormerV2 in NCHW throughout, against its stem and conv-only stages
  channels_last outside autograd, with GELU on the NHWC view (`CHANNELS_LAST_LAYERS`, `GELU`). Timed
  on the S1 backbone.
- similarity norm: FreqFusion's per-pixel channel norms by torch.linalg.vector_norm, against a
  product and a sum (`freqfusion.channel_norm`). Timed on OffSeg-T's last FreqFusion (32 channels
  at stride 4, 224 at stride 8).
- CARAFE in channel blocks: CARAFE's k² passes over the whole output, against blocks of channels
  of CARAFE_BLOCK_BYTES, each interleaved into the output while in cache (`freqfusion.carafe`). Timed
  on the same FreqFusion.
- Offset Learning: scores pixel-major (HW, K) with a LayerNorm over the last dim, against
  class-major (K, HW) with the LayerNorm's mean removed before the products (models/offset_learning.py).
  Timed on the stride-4 map of each size (256 channels), at ADE20K's 150 classes and CamVid's 11.
- OffSeg-T: the whole model (BN folded, as evaluate.py runs it) with every change undone, against
  the repo's, and SegFormer-B0 beside them: the last column is SegFormer-B0's time over OffSeg-T's
  (> 1: OffSeg-T faster), and ms/GMAC shows how latency scales with the multiply-adds.

prepare_for_inference also makes the process keep the memory it frees, for every row alike:
benchmarks/freed_memory.py times that change, which cannot be undone inside a process.
"""

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.fast import prepare_for_inference, time_calls  # noqa: E402
from engine.rules import load_config  # noqa: E402
from models.backbones import efficientformer_v2  # noqa: E402
from models.backbones.efficientformer_v2 import EfficientFormerV2  # noqa: E402
from models.heads import freqfusion  # noqa: E402
from models.heads.freqfusion import FreqFusion  # noqa: E402
from models.offset_learning import OffsetLearning  # noqa: E402
from tools.measure import image_macs, meta_model, write_result_table  # noqa: E402
from train import create_model  # noqa: E402

# ------------------------------------------------------------------------------- the replaced code


def uncached_bias(cache, table, index, size):
    """Before: the bias gathered and resized on every call, even where the resize is the identity."""
    return F.interpolate(table[:, index].unsqueeze(0), size=size, mode='bicubic', align_corners=False)


def three_pass_logits(q, k, scale, bias):
    """Before: the product, then the scaling and the bias add as two more passes over the logits."""
    return (q @ k) * scale + bias


def pixel_major_forward(self, x):
    """Before: Offset Learning's reassociated products with pixel-major scores and nn.LayerNorm."""
    b, c, h, w = x.shape
    feats = x.flatten(2)
    classes = self.cls_repr.expand(b, -1, -1)
    attn = classes @ feats
    prototypes = classes + self.cls_offset_proj(attn.softmax(dim=-1) @ feats.transpose(1, 2))
    mixing = F.linear(self.cls_repr, self.feat_offset_proj.weight) @ prototypes.transpose(1, 2)
    masks = torch.baddbmm(
        attn.softmax(dim=1).transpose(1, 2) @ mixing, feats.transpose(1, 2), prototypes.transpose(1, 2)
    )
    return self.mask_norm(masks).transpose(1, 2).reshape(b, -1, h, w)


def row_major_attention(q, k, v, scale, bias, normalize):
    """Before: values and output token-major (B, heads, N, c_v), transposed from and back to NCHW."""
    logits = efficientformer_v2.attention_logits(q, k, scale, bias)
    return (normalize(logits) @ v.transpose(2, 3)).transpose(2, 3)


def vector_norm(x):
    """Before: FreqFusion's channel norms by torch.linalg.vector_norm."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)


def nchw_upsample_and_project(self, out):
    """Before: the stride-2 attention's output upsampled and projected in NCHW."""
    return self.proj(F.interpolate(out, scale_factor=2, mode='bilinear', align_corners=False))


BIAS = (efficientformer_v2.BiasCache, 'get', uncached_bias)
LOGITS = (efficientformer_v2, 'attention_logits', three_pass_logits)
BLOCKS = (efficientformer_v2, 'LOGITS_PER_CHUNK', 2**62)  # before: all query rows in one block
CHANNEL_MAJOR = (efficientformer_v2, 'attend', row_major_attention)
UPSAMPLE = (efficientformer_v2.Attention4D, 'upsample_and_project', nchw_upsample_and_project)
STEM = (efficientformer_v2, 'CHANNELS_LAST_LAYERS', 0)  # before: NCHW throughout
NORM = (freqfusion, 'channel_norm', vector_norm)
CARAFE_BLOCKS = (freqfusion, 'CARAFE_BLOCK_BYTES', 2**62)  # before: one block
OFFSET_LEARNING = (OffsetLearning, 'forward', pixel_major_forward)
"""Each change as (where, name, the replaced code)."""
CONFIGS = ('offseg_t', 'segformer_b0')


def undone(*changes) -> contextlib.ExitStack:
    """A context in which the given changes are undone."""
    stack = contextlib.ExitStack()
    for change in changes:
        stack.enter_context(mock.patch.object(*change))
    return stack


# ----------------------------------------------------------------------------------- measurements


@contextlib.contextmanager
def denormals_flushed():
    """Subnormal floats flushed to zero. Unit-scale classes make the softmax over pixels underflow to
    subnormals, which x86 computes about 4x slower (both layouts alike): the row would time
    that, not the arithmetic. Trained weights barely produce them (OffSeg-T's published weights:
    3-5% faster flushed)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def compare(name: str, size: str, module, inputs: tuple, changes: tuple, args, beside: dict = None) -> dict:
    """Time module(*inputs) with `changes` undone (before) and as it is (after), and the `beside` calls
    ({name: call}) in the same rounds; compare the outputs."""

    def before():
        with torch.inference_mode(), undone(*changes):
            return module(*inputs)

    def after():
        with torch.inference_mode():
            return module(*inputs)

    reference, output = before(), after()
    reference, output = (
        torch.cat([t.flatten() for t in o]) if isinstance(o, (list, tuple)) else o for o in (reference, output)
    )
    calls = {'before': before, 'after': after, **(beside or {})}
    times = time_calls(calls, args.runs, args.warmup, torch.device('cpu'))
    ms = {key: statistics.median(seconds) * 1e3 for key, seconds in times.items()}
    return {
        'change': name,
        'size': size,
        **ms,
        'ratio': ms['before'] / ms['after'],
        'diff': ((output - reference).abs().max() / reference.abs().max()).item(),
    }


def offseg_against_segformer(side: int, args) -> dict:
    """OffSeg-T before and after, and SegFormer-B0 as the reference in the same rounds, at side x side."""
    configs = {name: load_config(ROOT / f'configs/{name}.yaml', ['backbone.pretrained=null']) for name in CONFIGS}
    offseg, segformer = (prepare_for_inference(create_model(cfg)) for cfg in configs.values())
    images = torch.randn(1, 3, side, side)

    def segformer_b0():
        with torch.inference_mode():
            return segformer(images)

    changes = (BIAS, LOGITS, CHANNEL_MAJOR, UPSAMPLE, STEM, NORM, CARAFE_BLOCKS, OFFSET_LEARNING)
    row = compare('OffSeg-T', f'{side}²', offseg, (images,), changes, args, {'segformer_b0': segformer_b0})
    gmacs = sum(image_macs(meta_model(configs['offseg_t']), (side, side))[''].values()) / 1e9
    row['ms_per_gmac'] = row['after'] / gmacs
    return row


def rows(args):
    torch.manual_seed(0)
    backbone = EfficientFormerV2('s1').eval()
    fusion = FreqFusion(32, 224, (32 + 224) // 4).eval()
    for side in args.sizes:
        images = torch.randn(1, 3, side, side)
        yield compare('attention bias', f'{side}²', backbone, (images,), (BIAS,), args)
        yield compare('attention logits', f'{side}²', backbone, (images,), (LOGITS,), args)
        yield compare('attention in query blocks', f'{side}²', backbone, (images,), (BLOCKS,), args)
        yield compare('attention channel-major', f'{side}²', backbone, (images,), (CHANNEL_MAJOR,), args)
        yield compare('upsampling channels_last', f'{side}²', backbone, (images,), (UPSAMPLE,), args)
        yield compare('stem channels_last', f'{side}²', backbone, (images,), (STEM,), args)
        maps = (torch.randn(1, 32, side // 4, side // 4), torch.randn(1, 224, side // 8, side // 8))
        yield compare('similarity norm', f'{side}²', fusion, maps, (NORM,), args)
        yield compare('CARAFE in channel blocks', f'{side}²', fusion, maps, (CARAFE_BLOCKS,), args)
        for classes in (150, 11):
            head = OffsetLearning(classes, 256).eval()
            with torch.no_grad():
                head.cls_repr.normal_()  # unit-scale classes: the LayerNorm then compares at float precision
            features = torch.randn(1, 256, side // 4, side // 4)
            with denormals_flushed():
                row = compare(
                    f'Offset Learning, K={classes}', f'{side // 4}² map', head, (features,), (OFFSET_LEARNING,), args
                )
            yield row
        yield offseg_against_segformer(side, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+', type=int, default=[256, 512, 1024], metavar='SIDE')
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--results', type=Path, metavar='DIR', help='also write the table as a result file there')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = f'{torch.get_num_threads()} thread(s), medians of {args.runs} interleaved calls, eval, inference_mode'
    print(protocol)
    columns = ['change', 'input', 'before (ms)', 'after (ms)', 'speed-up', 'max rel. diff']
    columns += ['SegFormer-B0 (ms)', 'B0 / OffSeg-T', 'ms/GMAC']
    print('| ' + ' | '.join(columns) + ' |\n' + '|---' * len(columns) + '|')
    results = []
    for row in rows(args):
        results.append(row)
        extra = (
            f'{row["segformer_b0"]:.1f} | {row["segformer_b0"] / row["after"]:.2f} | {row["ms_per_gmac"]:.1f}'
            if 'segformer_b0' in row
            else ' | | '
        )
        print(
            f'| {row["change"]} | {row["size"]} | {row["before"]:.1f} | {row["after"]:.1f} | '
            f'{row["ratio"]:.2f} | {row["diff"]:.1e} | {extra} |',
            flush=True,
        )
    if args.results:
        keys = ['change', 'size', 'before', 'after', 'ratio', 'diff', 'segformer_b0', 'ms_per_gmac']
        table = [[row.get(key) for key in keys] for row in results]
        print('results:', write_result_table(args.results, 'offseg_speed', keys, table, 'cpu', [protocol]))
    return results


if __name__ == '__main__':
    main()
