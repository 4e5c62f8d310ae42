"""What the benchmarks measure with: parameter and MAC counts, latency, memory, and the result files
the measurements are kept in.

A library for tools/benchmark.py and the scripts in benchmarks/, which import it rather than each
other. The counting conventions (what GMACs include, what the OffSeg paper leaves out) are stated in
tools/benchmark.py's help.

Result files are JSON tables named by what they measure and where (`<study>-<machine>-torch<version>
.json`, as timm names its result CSVs): the docs render them (tools/make_docs.py), so a number in the
docs is always one a script wrote.
"""

import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.cli import AMP_DTYPES
from engine.config import flatten  # noqa: F401  (the benchmarks' CSV columns)
from engine.losses import build_criterion
from engine.optim import build_ema, build_optimizer
from engine.outputs import write_results
from engine.rules import load_config
from models import OffsetLearning, OffsetLearningMask
from models.backbones.efficientformer_v2 import Attention4D, Attention4DDownsample
from models.heads.offseg import OffSegHead
from train import create_model

RANDOM_WEIGHTS = 'backbone.pretrained=null'

PAPER_OMITS_MATMULS = {OffSegHead: (Attention4D, Attention4DDownsample, OffsetLearning)}
"""Head class -> modules whose matmuls its paper's GFLOPs leave out. The OffSeg paper's figures
(5.3 / 10.3 / 17.1 G at 512x512) equal a count without the EfficientFormerV2 attention and Offset
Learning matmuls; every other paper here counts all operations."""

TORCH_VERSION = torch.__version__.split('+')[0]
"""The release, without the build's local tag (2.14.1, not 2.14.1+cu130): part of a result file's name."""

OFFSET_LEARNING = (OffsetLearning, OffsetLearningMask)
"""Offset Learning as a classifier, and its Mask2Former form (both reported and timed as OL)."""


# --------------------------------------------------------------------------------------- counting


def meta_model(cfg: dict) -> torch.nn.Module:
    """The config's model on the meta device (shapes only: no memory, no weights, nothing loaded)."""
    cfg = {**cfg, 'backbone': {**cfg['backbone'], 'pretrained': None}}
    with torch.device('meta'):
        return create_model(cfg).eval()


def count_macs(model: torch.nn.Module, *inputs) -> dict:
    """{module path ('' = the whole model): {aten op: MACs}} of `model(*inputs)`.

    FlopCounterMode attributes every op to each module it runs in (and to all their parents), keyed
    by the root's class name plus the module path; the class name is taken off here.
    """
    root = type(model).__name__
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return {
        name.removeprefix(root).removeprefix('.'): {str(op): flops / 2 for op, flops in ops.items()}
        for name, ops in counter.get_flop_counts().items()
        if name != 'Global'
    }


def image_macs(model: torch.nn.Module, size) -> dict:
    """`count_macs` of one image of `size` (H, W) through a model on the meta device."""
    return count_macs(model, torch.empty(1, 3, *size, device='meta'))


def module_macs(counts: dict, path: str) -> float:
    return sum(counts.get(path, {}).values())


def paper_convention_macs(model: torch.nn.Module, counts: dict):
    """MACs as the model's paper counts them (see PAPER_OMITS_MATMULS); None where that is the full count."""
    omitted = PAPER_OMITS_MATMULS.get(type(model.head))
    if omitted is None:
        return None
    paths = [name for name, module in model.named_modules() if isinstance(module, omitted)]
    outermost = [p for p in paths if not any(p.startswith(q + '.') for q in paths)]
    matmuls = sum(macs for path in outermost for op, macs in counts.get(path, {}).items() if 'convolution' not in op)
    return module_macs(counts, '') - matmuls


def describe(model: torch.nn.Module, cfg: dict) -> str:
    backbone = f'{cfg["backbone"]["type"]} {cfg["backbone"].get("variant", "")}'.strip()
    uses_ol = any(isinstance(m, OFFSET_LEARNING) for m in model.head.modules())
    return f'{backbone} + {cfg["head"]["type"]}' + (' + OL' if uses_ol else '')


def size_figures(cfg: dict, size) -> dict:
    """Parameters (M) and GMACs of the config's model at `size`, both conventions, from a meta build."""
    model = meta_model(cfg)
    counts = image_macs(model, size)
    paper = paper_convention_macs(model, counts)
    return {
        'model': describe(model, cfg),
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': module_macs(counts, '') / 1e9,
        'gmacs_paper_convention': paper and paper / 1e9,
    }


# ---------------------------------------------------------------------------------------- timing


def top_operators(call, device: torch.device, count: int = 15) -> list:
    """The operators of one call, most self time first: [{op, self_ms, share, calls}] (torch.profiler; on
    CUDA the device time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        call()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    events = profiler.key_averages()
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    total = sum(getattr(event, key) for event in events) or 1
    ranked = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:count]
    return [
        {'op': e.key, 'self_ms': getattr(e, key) / 1e3, 'share': getattr(e, key) / total, 'calls': e.count}
        for e in ranked
    ]


def latency_ms(seconds: list) -> dict:
    """Median and 90th percentile (nearest rank) in milliseconds."""
    ordered = sorted(seconds)
    return {'median': 1e3 * statistics.median(ordered), 'p90': 1e3 * ordered[math.ceil(0.9 * len(ordered)) - 1]}


def rss_mb(field: str):
    """VmRSS (now) or VmHWM (the peak) of this process in MB; None where /proc is missing."""
    status = Path('/proc/self/status')
    if not status.exists():
        return None
    line = next(line for line in status.read_text().splitlines() if line.startswith(field + ':'))
    return int(line.split()[1]) / 1024


def release_freed_memory() -> None:
    """Hand memory that is free but still resident back to the OS (glibc's malloc_trim), so that RSS
    counts live memory only and a later rise of the peak is memory that is really needed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that receives `peak_memory_mb` and `added_memory_mb` (peak minus the memory
    before the block) when the block ends; see the module docstring for what each device measures."""
    result = {}
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        yield result
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        release_freed_memory()
        before = rss_mb('VmRSS')
        with contextlib.suppress(OSError):
            Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS
        yield result
        peak = rss_mb('VmHWM')
    result.update(peak_memory_mb=peak, added_memory_mb=None if peak is None else peak - before)


def autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None)


def inference_call(model, images: torch.Tensor, amp):
    def call():
        with torch.inference_mode(), autocast(images.device, amp):
            return model(images)

    return call


def train_phases(model, cfg: dict, images: torch.Tensor, amp) -> dict:
    """One training iteration as train.py runs it, phase by phase, in order: {name: call}. Zero grads and
    forward (autocast), the config's loss, backward (scaled for fp16), the config's optimizer step and,
    where the config keeps one, the update of the moving average; on random labels."""
    device = images.device
    labels = torch.randint(0, cfg['data']['num_classes'], (images.shape[0], *images.shape[2:]), device=device)
    train = cfg['train']
    optimizer, _ = build_optimizer(model, train['optimizer'], train['param_groups'], train['layer_decay'])
    criterion = build_criterion(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
    carried = {}

    def forward():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            carried['outputs'] = model(images)

    def loss():
        carried['loss'] = criterion(carried.pop('outputs'), labels)

    def backward():
        scaler.scale(carried.pop('loss')).backward()

    def optimizer_step():
        scaler.step(optimizer)
        scaler.update()

    phases = {
        'forward': forward,
        'loss': loss,
        'backward': backward,
        'optimizer': optimizer_step,
    }
    if train['ema_decay']:
        ema = build_ema(model, train['ema_decay'])
        phases['moving average'] = lambda: ema.update_parameters(model)
    return phases


def train_call(model, cfg: dict, images: torch.Tensor, amp):
    """`train_phases` as one call: a whole training iteration."""
    phases = list(train_phases(model, cfg, images, amp).values())

    def call():
        for phase in phases:
            phase()

    return call


def random_weights_config(path, overrides=()) -> dict:
    """The config of `path` with `backbone.pretrained` off (unless an override turns it back on)."""
    return load_config(path, [RANDOM_WEIGHTS, *overrides])


def build_model(cfg: dict, device: torch.device) -> torch.nn.Module:
    """The config's model on `device`, with the same random weights on every call (seed 0)."""
    torch.manual_seed(0)
    return create_model(cfg).to(device)


# ---------------------------------------------------------------------------------- result files


def environment(device: torch.device) -> dict:
    """The machine and library versions a measurement ran on."""
    if device.type == 'cuda':
        machine = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path('/proc/cpuinfo')
        names = (
            [
                line.split(':', 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith('model name')
            ]
            if cpuinfo.exists()
            else []
        )
        machine = f'{os.cpu_count()}-core {names[0] if names else platform.machine()} CPU'
    return {
        'machine': machine,
        'threads': torch.get_num_threads() if device.type == 'cpu' else None,
        'torch': TORCH_VERSION,
        'python': platform.python_version(),
    }


def environment_tag(device: torch.device) -> str:
    """The part of a result file's name that says where it was measured: `cpu2-torch2.14.1`,
    `h200-torch2.14.1` (the GPU's model)."""
    if device.type == 'cuda':
        machine = torch.cuda.get_device_name(device).split()[-1].lower()
    else:
        machine = f'cpu{os.cpu_count()}'
    return f'{machine}-torch{TORCH_VERSION}'


def chosen_device(device) -> torch.device:
    """A device as the scripts' --device takes it: 'auto' is CUDA where there is one."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)


def result_table_path(folder: Path, study: str, device) -> Path:
    """Where write_result_table puts `study` measured on `device` (a --device value)."""
    return Path(folder) / f'{study}-{environment_tag(chosen_device(device))}.json'


def recorded_rows(folder, study: str, device, notes) -> list:
    """The rows, each {column: value}, of the result file write_result_table wrote for `study` on `device`
    under these `notes` (they name what was measured), or [] where there is none (or no `folder`): the
    part of a long study that a fresh checkout, whose run folders are gone, already holds."""
    path = folder and result_table_path(folder, study, device)
    if not path or not path.is_file():
        return []
    record = json.loads(path.read_text())
    if record['notes'] != list(notes):
        return []
    return [dict(zip(record['columns'], row)) for row in record['rows']]


def write_result_table(folder: Path, study: str, columns: list, rows: list, device: torch.device, notes=()) -> Path:
    """Write one measured table as `<folder>/<study>-<environment tag>.json`, with the command that
    measured it, the environment and the date; a rerun on the same machine replaces its own file.
    `device` as the scripts' --device takes it ('auto': CUDA where there is one)."""
    path = result_table_path(folder, study, device)
    record = {
        'study': study,
        'command': shlex.join(['python', *sys.argv]),
        'environment': environment(chosen_device(device)),
        'date': datetime.date.today().isoformat(),
        'notes': list(notes),
        'columns': list(columns),
        'rows': [list(row) for row in rows],
    }
    write_results(path.parent, {path.name: json.dumps(record, indent=2) + '\n'})
    return path
