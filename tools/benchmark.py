"""Parameters, GMACs, latency, images/s and peak memory of the model of a config, measured by code.

    python tools/benchmark.py --config configs/offseg_t.yaml --threads 1
    python tools/benchmark.py --all configs/ --macs-only --csv work_dirs/macs.csv
    python tools/benchmark.py --config configs/segformer_b0.yaml --mode train --batch 2
    python tools/benchmark.py --config configs/offseg_t.yaml --threads 1 --breakdown
    python tools/benchmark.py --config configs/segformer_b0.yaml --set head.type=segformer_mlp --compare hf
    python tools/benchmark.py --config configs/offseg_t.yaml --onnx

What the numbers are:
  params   every parameter of the model as built, auxiliary head included (as mmcv counts them).
  GMACs    multiply-accumulates (FLOPs / 2), which is what the papers call "GFLOPs": torch's
           FlopCounterMode over one image of --size, in eval mode, on the meta device. Every
           convolution and every matmul (mm, bmm, addmm, baddbmm, attention) is counted; norms,
           activations, resizes and elementwise ops are not (mmcv and torchprofile count a few of
           those, 0-4% more).
  paper    OffSeg only: the count of the OffSeg paper, which leaves out the matmuls of the
           EfficientFormerV2 attention and of Offset Learning (their convolutions stay in). The
           SegFormer and SegNeXt papers count everything, as GMACs does.
  latency  one call on a random batch. infer: the forward of the model in eval mode under
           torch.inference_mode (logits at the head's stride, no resize), through
           engine.fast.prepare_for_inference (BN folded unless --no-fold-bn; channels_last as
           --channels-last says, by default where it times faster; --compile), the input in the
           model's memory order. train: forward, the config's loss, backward, the config's optimizer
           step and moving average, in the config's memory order (train.channels_last) unless
           --channels-last on/off says otherwise. Median and 90th percentile of --runs calls after
           --warmup calls; on CUDA each call is synchronised before and after.
  memory   CUDA: torch.cuda.max_memory_allocated over warm-up and runs (statistics reset before).
           CPU: the peak RSS of the process over them (its high-water mark reset through
           /proc/self/clear_refs; Linux only). "+runs" is the peak minus the memory before the
           calls: what running needs beyond the model itself.

Models get random weights (backbone.pretrained=null unless --set says otherwise): speed and size
do not depend on the values.
"""

import argparse
import copy
import csv
import glob
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import fast  # noqa: E402
from engine.cli import AMP_DTYPES, ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.fast import time_calls  # noqa: E402
from engine.inference import padded_size  # noqa: E402
from engine.onnx_runtime import output_tensors  # noqa: E402
from engine.outputs import write_bytes  # noqa: E402
from models.backbones.mit import LAYER_NORM_EPS, MiT  # noqa: E402
from models.heads.classifier import PixelClassifier  # noqa: E402
from models.heads.segformer import SegFormerMLPHead  # noqa: E402
from models.weights import convert_model_state  # noqa: E402
from tools.measure import (  # noqa: E402
    OFFSET_LEARNING,
    build_model,
    describe,
    flatten,
    image_macs,
    inference_call,
    latency_ms,
    meta_model,
    module_macs,
    peak_memory,
    random_weights_config,
    size_figures,
    top_operators,
    train_call,
    train_phases,
    write_result_table,
)


def prepare(model, args):
    """The inference fast paths of engine/fast.py; a plain eager model when none is asked for."""
    if not (args.fold_bn or args.channels_last is not False or args.compile):
        return model
    return fast.prepare_for_inference(
        model, args.channels_last, args.fold_bn, args.compile, amp_dtype=AMP_DTYPES.get(args.amp)
    )


# ----------------------------------------------------------------------------------- comparisons


def check_hf_comparable(model, cfg: dict, source: str) -> None:
    """transformers' SegformerForSemanticSegmentation is MiT + the official All-MLP head + a 1x1 classifier."""
    if not (
        isinstance(model.backbone, MiT)
        and type(model.head) is SegFormerMLPHead
        and isinstance(model.head.classifier, PixelClassifier)
    ):
        raise ConfigError(
            f'{source}: --compare hf needs backbone.type=mit with head.type=segformer_mlp (the official '
            f"All-MLP head, without Offset Learning), which is what transformers' SegformerForSemanticSegmentation "
            f"implements; this config has {describe(model, cfg)}. mmseg's head (head.type=segformer) differs from "
            f'it: add --set head.type=segformer_mlp'
        )


def hf_segformer(model):
    """transformers' SegformerForSemanticSegmentation holding `model`'s weights, built offline.

    Our MiT is transformers' SegformerModel, so its config is reused with the head's width and class
    count. Weights go across through the repo's own HF -> ours converter, applied to each HF key
    alone: that gives the key map in the other direction, and every key must be matched one to one.
    """
    from transformers import SegformerForSemanticSegmentation

    config = copy.deepcopy(model.backbone.segformer.config)
    config.decoder_hidden_size = model.head.linear_fuse.conv.out_channels
    config.num_labels = model.head.classifier.conv.out_channels
    hf = SegformerForSemanticSegmentation(config).eval()
    for module in hf.segformer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = LAYER_NORM_EPS
    ours = model.state_dict()
    hf_to_ours = {}
    for key, value in hf.state_dict().items():
        converted, _ = convert_model_state(model, {key: value})
        hf_to_ours[key] = next(iter(converted), None)
    missing = set(ours) ^ set(hf_to_ours.values())
    if missing:
        raise RuntimeError(f'HF SegFormer and ours do not map one to one: {sorted(map(str, missing))[:5]}')
    hf.load_state_dict({key: ours[ours_key] for key, ours_key in hf_to_ours.items()})
    return hf.to(next(model.parameters()).device)


def compare_hf(model, images: torch.Tensor, runs: int, warmup: int) -> dict:
    """Logit difference and interleaved latencies of our model and transformers' on the same weights."""
    hf = hf_segformer(model)
    with torch.inference_mode():
        diff = (model(images) - hf(pixel_values=images).logits).abs().max().item()
        times = time_calls(
            {'ours': lambda: model(images), 'hf': lambda: hf(pixel_values=images)}, runs, warmup, images.device
        )
    ours_ms, hf_ms = latency_ms(times['ours'])['median'], latency_ms(times['hf'])['median']
    return {'max_abs_diff': diff, 'ours_ms': ours_ms, 'hf_ms': hf_ms, 'hf_over_ours': hf_ms / ours_ms}


def onnx_session(model, size, device: torch.device):
    """An ONNX Runtime session of `model`, exported by tools/export_onnx.py to a temporary file."""
    try:
        import onnxruntime

        from tools.export_onnx import export
    except ImportError as error:
        raise SystemExit(f'error: --onnx needs onnx, onnxruntime and tools/export_onnx.py ({error})')
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    providers = ['CUDAExecutionProvider'] if device.type == 'cuda' else ['CPUExecutionProvider']
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, Path(tmp) / 'model.onnx', size=tuple(size))
        return onnxruntime.InferenceSession(str(path), options, providers=providers)


def compare_onnx(session, model, images: torch.Tensor, amp, runs: int, warmup: int) -> dict:
    """Output difference and interleaved latencies of eager PyTorch and ONNX Runtime (inputs from the
    host, outputs back to it, as a deployed runtime is called). SegNeXt's NMF draws random bases on
    every forward, so its outputs differ from call to call in either runtime."""
    name = session.get_inputs()[0].name
    array = images.float().cpu().numpy()
    eager = inference_call(model, images, amp)
    expected = output_tensors(eager()).values()
    diff = max(
        (reference.float().cpu() - torch.from_numpy(result)).abs().max().item()
        for reference, result in zip(expected, session.run(None, {name: array}))
    )
    times = time_calls(
        {'eager': eager, 'onnxruntime': lambda: session.run(None, {name: array})}, runs, warmup, images.device
    )
    eager_ms, onnx_ms = latency_ms(times['eager'])['median'], latency_ms(times['onnxruntime'])['median']
    return {
        'max_abs_diff': diff,
        'eager_ms': eager_ms,
        'onnxruntime_ms': onnx_ms,
        'onnx_over_eager': onnx_ms / eager_ms,
    }


def breakdown(model, images: torch.Tensor, counts: dict, runs: int, warmup: int) -> dict:
    """Latency share and MAC share of the backbone, the head and Offset Learning (inside the head).

    Method: one forward records the inputs of each part (forward pre-hooks); then each part is timed
    on its own on those inputs, in the same rounds as the whole model (`time_calls`), and its share
    is its median over the whole model's median. Timing parts separately keeps hooks and
    synchronisation out of the measured forward, where they would fall on small parts unevenly.
    Backbone + head shares add up to about 1; the rest is the call overhead between them. MAC
    shares come from FlopCounterMode's per-module count of the same architecture.
    """
    parts = {'backbone': 'backbone', 'head': 'head'}
    parts.update(
        {
            f'offset learning ({name})': name
            for name, module in model.named_modules()
            if isinstance(module, OFFSET_LEARNING)
        }
    )
    inputs, hooks = {}, []
    for label, path in parts.items():

        def record(module, args, kwargs, label=label):
            inputs[label] = (args, kwargs)

        hooks.append(model.get_submodule(path).register_forward_pre_hook(record, with_kwargs=True))
    with torch.inference_mode():
        model(images)
        for hook in hooks:
            hook.remove()
        calls = {'model': lambda: model(images)}
        calls.update(
            {
                label: (lambda m=model.get_submodule(parts[label]), a=args, k=kwargs: m(*a, **k))
                for label, (args, kwargs) in inputs.items()
            }
        )
        times = time_calls(calls, runs, warmup, images.device)
    whole_ms, total_macs = latency_ms(times['model'])['median'], module_macs(counts, '')
    result = {}
    for label in inputs:
        part_ms = latency_ms(times[label])['median']
        mac_share = module_macs(counts, parts[label]) / total_macs
        result[label] = {
            'latency_ms': part_ms,
            'latency_share': part_ms / whole_ms,
            'mac_share': mac_share,
            'latency_over_mac_share': part_ms / whole_ms / mac_share if mac_share else None,
        }
    return result


# ------------------------------------------------------------------------------------------- run


def benchmark(path: Path, args) -> dict:
    """Every figure asked for by `args` for one config."""
    cfg = random_weights_config(path, args.set)
    if args.compare:
        check_hf_comparable(meta_model(cfg), cfg, path)
    size = padded_size(args.size, cfg['eval']['size_divisor'])  # as evaluate.py pads (a ViT's patch grid)
    result = {'config': str(path), **size_figures(cfg, size), 'size': list(size)}
    if args.macs_only:
        return result
    device = torch.device(args.device)
    batch = args.batch or (2 if args.mode == 'train' else 1)
    model = build_model(cfg, device)
    if args.mode == 'train':
        nhwc = cfg['train']['channels_last'] if args.channels_last is None else args.channels_last  # auto: as trained
        model = model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    else:
        model = model.eval() if args.compare else prepare(model.eval(), args)
    channels_last = fast.uses_channels_last(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=memory_format)
    result.update(
        device=str(device),
        mode=args.mode,
        batch=batch,
        threads=torch.get_num_threads(),
        runs=args.runs,
        warmup=args.warmup,
        amp=args.amp,
        channels_last=channels_last,
    )
    if args.mode == 'train':
        call = train_call(model.train(), cfg, images, args.amp)
    else:
        result.update(fold_bn=args.fold_bn and not args.compare, compile=args.compile)
        call = inference_call(model, images, args.amp)
    with peak_memory(device) as memory:
        seconds = time_calls({'model': call}, args.runs, args.warmup, device)['model']
    latency = latency_ms(seconds)
    result.update(
        latency_ms_median=latency['median'],
        latency_ms_p90=latency['p90'],
        images_per_s=1e3 * batch / latency['median'],
        ms_per_gmac=latency['median'] / (batch * result['gmacs']),
        **memory,
    )
    if args.profile:
        result['profile'] = top_operators(call, device)
        if args.mode == 'train':
            phases = train_phases(model, cfg, images, args.amp)
            times = time_calls(phases, args.runs, args.warmup, device)
            result['phases_ms'] = {phase: latency_ms(seconds)['median'] for phase, seconds in times.items()}
    if args.compare:
        result['compare_hf'] = compare_hf(model, images, args.runs, args.warmup)
    if args.onnx:  # exported from a fresh build: the timed model may be folded or compiled
        session = onnx_session(build_model(cfg, device).eval(), size, device)
        result['onnx'] = compare_onnx(session, model, images, args.amp, args.runs, args.warmup)
    if args.breakdown:
        counts = image_macs(meta_model(cfg), size)
        result['breakdown'] = breakdown(model, images, counts, args.runs, args.warmup)
    return result


def config_paths(items: list) -> list:
    """Config files from paths, folders (their *.yaml) and glob patterns, in the order given."""
    paths = []
    for item in items:
        if Path(item).is_dir():
            found = sorted(Path(item).glob('*.yaml'))
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item))
        else:
            found = [Path(item)]
        if not found:
            raise ConfigError(f"--all '{item}': no config files there")
        paths.extend(found)
    return paths


# ---------------------------------------------------------------------------------------- output


def cell(value, fmt: str) -> str:
    return '-' if value is None else format(value, fmt)


def table(results: list) -> str:
    columns = [
        ('config', 'config', '', 36),
        ('model', 'model', '', 36),
        ('params (M)', 'params_m', '.3f', 10),
        ('GMACs', 'gmacs', '.2f', 8),
        ('paper GMACs', 'gmacs_paper_convention', '.2f', 11),
    ]
    if 'latency_ms_median' in results[0]:
        columns += [
            ('median ms', 'latency_ms_median', '.2f', 10),
            ('p90 ms', 'latency_ms_p90', '.2f', 9),
            ('images/s', 'images_per_s', '.2f', 9),
            ('ms/GMAC', 'ms_per_gmac', '.2f', 8),
            ('peak MB', 'peak_memory_mb', '.0f', 8),
            ('+runs MB', 'added_memory_mb', '.0f', 8),
        ]
    if len({tuple(result['size']) for result in results}) > 1:
        columns.insert(1, ('size', 'size_text', '', 10))
    lines = ['  '.join(f'{title:<{width}}' if not fmt else f'{title:>{width}}' for title, _, fmt, width in columns)]
    for result in results:
        values = {**result, 'config': Path(result['config']).stem, 'size_text': 'x'.join(map(str, result['size']))}
        lines.append(
            '  '.join(
                f'{values[key]:<{width}}' if not fmt else f'{cell(values[key], fmt):>{width}}'
                for _, key, fmt, width in columns
            )
        )
    return '\n'.join(lines)


def header(results: list) -> str:
    first = results[0]
    size = ', '.join(dict.fromkeys('x'.join(map(str, result['size'])) for result in results))
    lines = [
        f"{size} input (--size, padded to the config's eval.size_divisor as evaluate.py pads it); "
        'GMACs = multiply-accumulates (FLOPs / 2) per image, every convolution and matmul '
        'counted (torch FlopCounterMode); paper GMACs: OffSeg paper convention, without the attention and '
        'Offset Learning matmuls'
    ]
    if 'mode' in first:
        options = [name for name in ('fold_bn', 'compile') if first.get(name)]
        nhwc = list(dict.fromkeys(Path(result['config']).stem for result in results if result.get('channels_last')))
        if nhwc:  # chosen per model where --channels-last is auto
            everywhere = len(nhwc) == len({result['config'] for result in results})
            options.append('channels_last' if everywhere else f'channels_last for {", ".join(nhwc)}')
        options = ', '.join(options)
        lines.append(
            f'{first["mode"]} on {first["device"]}, batch {first["batch"]}, {first["threads"]} thread(s), '
            f'median of {first["runs"]} runs after {first["warmup"]} warm-up, amp {first["amp"] or "off"}, '
            f'fast paths: {options or "none"} (torch {torch.__version__})'
        )
    return '\n'.join(lines)


def extras(result: dict) -> str:
    """The comparison and breakdown sections of one result, if any."""
    name, lines = f'{Path(result["config"]).stem} at {"x".join(map(str, result["size"]))}', []
    if 'compare_hf' in result:
        r = result['compare_hf']
        lines.append(
            f'{name} vs transformers SegformerForSemanticSegmentation, same weights, plain eager fp32: '
            f'max |logits diff| {r["max_abs_diff"]:.2e}; ours {r["ours_ms"]:.2f} ms, HF {r["hf_ms"]:.2f} ms, '
            f'HF / ours {r["hf_over_ours"]:.3f} (interleaved)'
        )
    if 'onnx' in result:
        r = result['onnx']
        lines.append(
            f'{name} eager vs ONNX Runtime: max |output diff| {r["max_abs_diff"]:.2e}; eager '
            f'{r["eager_ms"]:.2f} ms, ONNX Runtime {r["onnxruntime_ms"]:.2f} ms, ONNX / eager '
            f'{r["onnx_over_eager"]:.3f} (interleaved)'
        )
    if 'phases_ms' in result:
        total = sum(result['phases_ms'].values())
        lines.append(f"{name}, a training step by phase (medians; data loading: train.log's data time):")
        lines.append(f'  {"phase":<40}{"ms":>10}{"share":>8}')
        for phase, ms in result['phases_ms'].items():
            lines.append(f'  {phase:<40}{ms:>10.2f}{ms / total:>8.3f}')
    if 'profile' in result:
        step = 'training step' if result['mode'] == 'train' else 'forward'
        lines.append(f'{name}, top operators of one {step} by self time:')
        lines.append(f'  {"operator":<40}{"self ms":>10}{"share":>8}{"calls":>7}')
        for r in result['profile']:
            lines.append(f'  {r["op"]:<40}{r["self_ms"]:>10.2f}{r["share"]:>8.3f}{r["calls"]:>7}')
    if 'breakdown' in result:
        lines.append(f'{name} breakdown (each part timed alone on its recorded inputs, interleaved with the model):')
        lines.append(f'  {"part":<36}{"ms":>9}{"latency share":>15}{"MAC share":>11}{"ratio":>8}')
        for part, r in result['breakdown'].items():
            lines.append(
                f'  {part:<36}{r["latency_ms"]:>9.2f}{r["latency_share"]:>15.3f}{r["mac_share"]:>11.3f}'
                f'{cell(r["latency_over_mac_share"], ".2f"):>8}'
            )
    return '\n'.join(lines)


def columns_and_rows(results: list) -> tuple:
    """The results as one table: dotted column names (the union over results) and one row each."""
    rows = [flatten(result) for result in results]
    return list(dict.fromkeys(key for row in rows for key in row)), rows


def write_csv(results: list, path: Path) -> None:
    columns, rows = columns_and_rows(results)
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode())


def write_table(results: list, args) -> None:
    columns, rows = columns_and_rows(results)
    table = [[row.get(column) for column in columns] for row in rows]
    notes = header(results).splitlines()
    path = write_result_table(args.results, args.study, columns, table, torch.device(args.device), notes)
    print(f'results: {path}')


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument('--config', help='YAML file of the model')
    which.add_argument(
        '--all', nargs='+', metavar='CFG', help='configs, folders of configs or glob patterns, measured into one table'
    )
    parser.add_overrides('override config values (applied to every config)')
    parser.add_argument('--size', nargs=2, type=number(int, 32), default=[512, 512], metavar=('H', 'W'))
    parser.add_argument(
        '--batch',
        type=number(int, 1),
        help='images per call (default: 1 for infer, 2 for train, as '
        'BatchNorm needs more than one value per channel in training)',
    )
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--mode', default='infer', choices=['infer', 'train'])
    parser.add_argument('--threads', type=number(int, 1), help="torch CPU threads (default: torch's choice)")
    parser.add_argument('--runs', type=number(int, 1), default=20, help='timed calls (default: 20)')
    parser.add_argument('--warmup', type=number(int, 0), default=3, help='untimed calls first (default: 3)')
    parser.add_argument('--macs-only', action='store_true', help='parameters and GMACs only (meta device, no timing)')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES), help='autocast dtype (default: float32)')
    fast.add_arguments(parser)  # --channels-last (model and input), --compile, --no-fold-bn: as evaluate.py
    parser.add_argument(
        '--breakdown', action='store_true', help='latency and MAC shares of backbone, head and Offset Learning (infer)'
    )
    parser.add_argument('--compare', choices=['hf'], help="time transformers' SegFormer on the same weights (infer)")
    parser.add_argument('--onnx', action='store_true', help='time the ONNX Runtime export beside eager (infer)')
    parser.add_argument(
        '--sizes',
        nargs='+',
        type=number(int, 32),
        metavar='SIDE',
        help='a sweep over square inputs of these sides, e.g. 256 512 768 1024: ms, GMACs and ms/GMAC per size',
    )
    parser.add_argument(
        '--profile',
        action='store_true',
        help='the top operators of one call by self time (torch.profiler); in train mode also the time of each '
        'phase of the step (forward, loss, backward, optimizer, moving average)',
    )
    parser.add_argument('--json', type=Path, help='write the results as JSON')
    parser.add_argument('--csv', type=Path, help='write the results as CSV')
    parser.add_argument(
        '--results',
        type=Path,
        metavar='DIR',
        help='write the results as a result table, DIR/<--study>-<machine>-torch<version>.json (what the docs render)',
    )
    parser.add_argument('--study', default='benchmark', help="the result table's name (default: benchmark)")
    args = parser.parse_args(argv)
    check_options(parser, args)
    return args


def check_options(parser, args) -> None:
    """Combinations that cannot be measured as asked stop here, before anything is built."""
    infer_only = [
        flag
        for flag, on in (
            ('--breakdown', args.breakdown),
            ('--compare', args.compare),
            ('--onnx', args.onnx),
            ('--compile', args.compile),
        )
        if on
    ]
    if args.mode == 'train' and infer_only:
        parser.error(f'{", ".join(infer_only)}: inference only (--mode infer)')
    if args.macs_only and (infer_only or args.profile or args.amp or args.channels_last):
        parser.error('--macs-only measures no time: drop the timing options')
    if args.compare and (args.channels_last or args.compile or args.amp):
        parser.error('--compare hf runs both models in plain eager float32: drop --channels-last, --compile, --amp')
    if args.breakdown and args.compile:
        parser.error('--breakdown times the parts one by one, uncompiled: drop --compile')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device available')


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = config_paths(args.all) if args.all else [Path(args.config)]
    sizes = [[side, side] for side in args.sizes] if args.sizes else [args.size]
    results = [benchmark(path, argparse.Namespace(**{**vars(args), 'size': size})) for path in paths for size in sizes]
    print(header(results))
    print(table(results))
    for section in filter(None, map(extras, results)):
        print(section)
    if args.json:
        write_bytes(args.json, (json.dumps(results, indent=2) + '\n').encode())
    if args.csv:
        write_csv(results, args.csv)
    if args.results:
        write_table(results, args)
    return results


if __name__ == '__main__':
    run_cli(main)
