"""Inference fast paths: exact conv+BN folding, channels_last and torch.compile, on a copy of a model;
on CPU, freed memory kept for the next forward.

For evaluation and prediction only. `prepare_for_inference` works on a deep copy: the model passed
in (a training model, or one whose state_dict becomes a checkpoint) is never changed. Never save
the prepared model's state_dict: folding replaces each folded BatchNorm by an Identity (its keys
disappear) and gives the convs new weights and biases.
"""

import argparse
import copy
import ctypes
import functools
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .inference import padded_size

BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc `mallopt` parameters (malloc.h)."""
KEPT_BLOCK_BYTES = 1 << 30
"""Freed blocks up to this size stay with the process (`keep_freed_memory`)."""


def example_input(model: nn.Module, size=(64, 64)) -> torch.Tensor:
    """A fixed random (1, C, H, W) image batch on the model's device: the probe `fold_conv_bn` runs.
    64x64 suits every convolutional family here (OffSeg needs sides that are multiples of 32); a ViT
    backbone's patch grid may need the sides rounded up (its `size_multiple`: 84x84 for DINOv2's)."""
    size = padded_size(size, getattr(getattr(model, 'backbone', None), 'size_multiple', 1))
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    channels = getattr(model, 'in_channels', 3)
    return torch.randn(1, channels, *size, generator=generator).to(parameter.device, parameter.dtype)


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list:
    """Names of the (Conv2d, BatchNorm2d) pairs of `model` (in eval mode) that fold exactly.

    Found from the data flow of one forward of `example`, not from module names: a pair qualifies
    when the conv is a plain `nn.Conv2d` and the norm a BatchNorm2d using running statistics, each
    is registered once and called exactly once, the BN receives the conv's output tensor itself
    (no op, in-place or not, in between), and that output feeds nothing else: in the autograd graph
    of the model's output the only edge into the conv's node comes from the BN's node. Dataflow the
    graph cannot see (a conv output read under no_grad or kept for a later call) is not supported.
    The global RNG state is restored afterwards (LightHam's NMF draws from it in eval).
    """
    calls, outputs = record_calls(model, example)
    edges, seen = count_edges(outputs)
    producers = {}
    for name, records in calls.items():
        if type(model.get_submodule(name)) is nn.Conv2d and len(records) == 1 and records[0][1] is not None:
            producers[records[0][1]] = name
    pairs = []
    for name, records in calls.items():
        module = model.get_submodule(name)
        if not isinstance(module, BATCH_NORMS) or len(records) != 1:
            continue
        bn_input, bn_node = records[0]
        conv_name = producers.get(bn_input)
        if conv_name is None or bn_node not in seen or edges.get(bn_input) != 1:
            continue
        if model.get_submodule(conv_name).out_channels == module.num_features:
            pairs.append((conv_name, name))
    return pairs


def record_calls(model: nn.Module, example: torch.Tensor) -> tuple:
    """({name: [(input grad_fn, output grad_fn) per call]} of the plain convs and running-statistics BNs
    registered once, [output tensors]) of one forward of `example` with autograd on."""
    registered = {}
    for name, module in model.named_modules(remove_duplicate=False):
        registered.setdefault(id(module), []).append(name)
    calls, hooks = {}, []

    def record(name, module, inputs, output):
        calls.setdefault(name, []).append((inputs[0].grad_fn, output.grad_fn))

    for name, module in model.named_modules():
        plain_conv = type(module) is nn.Conv2d
        running_bn = isinstance(module, BATCH_NORMS) and not module.training and module.running_mean is not None
        if (plain_conv or running_bn) and len(registered[id(module)]) == 1:
            hooks.append(module.register_forward_hook(functools.partial(record, name)))
    devices = [example.device] if example.device.type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            output = model(example.detach().clone().requires_grad_())
    finally:
        for hook in hooks:
            hook.remove()
    return calls, output if isinstance(output, (list, tuple)) else [output]


def count_edges(outputs: list) -> tuple:
    """({node: number of edges into it}, every node) of the autograd graph behind `outputs`."""
    edges, seen, stack = {}, set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                edges[parent] = edges.get(parent, 0) + 1
                stack.append(parent)
    return edges, seen


def fold_conv_bn(model: nn.Module, example: torch.Tensor = None) -> int:
    """Fold every BatchNorm that `find_conv_bn_pairs` finds into its conv, in place (the BN becomes
    nn.Identity); returns the number of pairs folded. Puts `model` in eval mode. The folded conv
    computes conv·γ/σ + (b − μ)·γ/σ + β in one op: equal to conv then BN up to float rounding."""
    model.eval()
    pairs = find_conv_bn_pairs(model, example_input(model) if example is None else example)
    for conv_name, bn_name in pairs:
        model.set_submodule(conv_name, fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name)))
        model.set_submodule(bn_name, nn.Identity())
    return len(pairs)


def keep_freed_memory() -> bool:
    """Make this process keep the memory it frees for its next allocations (glibc malloc, Linux).

    glibc hands large freed blocks straight back to the kernel (those over its mmap threshold,
    128 KiB to 32 MiB, and a heap top over its trim threshold), so each forward on CPU faults its
    activation memory in again page by page, which reused memory avoids (whole forwards timed both
    ways by benchmarks/freed_memory.py). ONNX Runtime keeps an arena for the same reason. Raising both
    thresholds keeps blocks up to 1 GiB in the heap; the process's resident memory then stays at its
    peak. Process-wide; returns False where glibc is not there (the defaults then stay).
    """
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES) and mallopt(M_TRIM_THRESHOLD, KEPT_BLOCK_BYTES))


def time_calls(calls: dict, runs: int, warmup: int, device: torch.device) -> dict:
    """{name: [seconds of each timed call]}. The calls run in turn within each round, so that load
    from other processes falls on all of them alike and their ratios come from the same conditions."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = {name: [] for name in calls}
    for round_ in range(warmup + runs):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def channels_last_pays(model: nn.Module, example: torch.Tensor, rounds: int = 3, amp_dtype=None) -> bool:
    """Whether `model` (in eval mode) runs `example` faster with channels_last weights and input than in
    NCHW, timed on its own device under the autocast dtype inference will use (None: float32): one
    warm-up and `rounds` interleaved calls of each, medians, and channels_last only when it wins by
    5% or more.

    Which order is faster depends on the model and the device, so it is measured, not assumed: on CPU
    SegFormer-B0 has timed faster channels_last and OffSeg-T slower (tools/benchmark.py
    --channels-last on / off times either order).
    """
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    nhwc_example = example.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(example.device.type, amp_dtype, enabled=amp_dtype is not None):
        seconds = time_calls(
            {False: lambda: model(example), True: lambda: nhwc(nhwc_example)}, rounds, 1, example.device
        )
    return statistics.median(seconds[True]) < 0.95 * statistics.median(seconds[False])


def uses_channels_last(model: nn.Module) -> bool:
    """Whether the convolution weights of `model` are stored channels_last (`prepare_for_inference`);
    1x1 kernels, the same in either order, do not tell."""
    return any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )


def memory_order(model: nn.Module) -> str:
    """'channels_last' or 'NCHW', as evaluate.py and infer.py report the order they run in."""
    return 'channels_last' if uses_channels_last(model) else 'NCHW'


def prepare_for_inference(
    model: nn.Module,
    channels_last: bool | None = False,
    fold_bn: bool = True,
    compile: bool = False,
    example: torch.Tensor = None,
    amp_dtype=None,
) -> nn.Module:
    """A copy of `model` in eval mode, made faster for inference; `model` itself is left as it was.

    - fold_bn: conv+BN pairs folded where that is exact (`fold_conv_bn`; `example`, on the model's
      device, is the probe input, 1x3x64x64 by default);
    - channels_last: weights in channels_last memory order (convs then run in NHWC, usually faster
      on CUDA and with oneDNN; NCHW inputs are fine: the first conv returns channels_last); None
      chooses by timing both orders on a 1x3x256x256 input (`channels_last_pays`) under `amp_dtype`,
      the autocast dtype inference runs in, as evaluate.py and infer.py do by default;
    - compile: `torch.compile(model)`, compiled at the first call and again for new input shapes
      (after the first recompilation sizes are treated as dynamic); on CPU it needs a C++ compiler.
    Same outputs as `model.eval()` up to float rounding. A model on the CPU also makes the process
    keep the memory it frees (`keep_freed_memory`; benchmarks/freed_memory.py times it).
    """
    model = copy.deepcopy(model).eval()
    if next(model.parameters()).device.type == 'cpu':
        keep_freed_memory()
    if fold_bn:
        fold_conv_bn(model, example)
    if channels_last is None:
        channels_last = channels_last_pays(model, example_input(model, (256, 256)), amp_dtype=amp_dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def on_off_auto(value: str) -> bool | None:
    """'on' -> True, 'off' -> False, 'auto' -> None (decide by measuring)."""
    choices = {'auto': None, 'on': True, 'off': False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f'{value!r}: expected auto, on or off')
    return choices[value]


def add_arguments(parser) -> None:
    """The switches of evaluate.py and infer.py for `prepare_for_inference`: BN folding on by default."""
    parser.add_argument(
        '--channels-last',
        nargs='?',
        const=True,
        type=on_off_auto,
        metavar='{auto,on,off}',
        help='run the model in channels_last (NHWC) memory order: on, off, or auto (the default) to '
        'time both on this device first and keep the faster (a few forwards of a 256x256 image)',
    )
    parser.add_argument(
        '--compile',
        action='store_true',
        help='torch.compile the model: a slow first batch, and recompiles for new input sizes',
    )
    parser.add_argument(
        '--no-fold-bn',
        dest='fold_bn',
        action='store_false',
        help='keep BatchNorms apart (by default each one applied to a conv output alone is folded '
        'into that conv: the same results up to float rounding)',
    )
