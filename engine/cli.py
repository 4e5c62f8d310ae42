"""What every command-line script shares: one error line instead of a traceback, the config a
checkpoint was trained with, and the autocast dtype of a run."""

import argparse
import logging
import signal
import sys
import warnings

import torch

from datasets import DatasetError
from models.errors import InputSizeError
from models.weights import CheckpointError

from .config import ConfigError, resolve
from .outputs import OutputError
from .rules import accepted_keys, check_config, load_config

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside training's own handling of them (engine/preemption.py). A
    KeyboardInterrupt, so that DataLoader workers leave it to the main process, as they do Ctrl-C."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


def interrupt(number, frame) -> None:
    raise Interrupted(number)


def run_cli(main_fn) -> None:
    """Bad input (config, data, checkpoint, an image size the model cannot take) or an output that
    must not or cannot be written ends with one clear line and exit code 2, not a traceback; Ctrl-C
    and SIGTERM with one line and 128 + the signal's number (files being written are not left half
    written: they are written atomically). Weight-loading reports (models.weights) go to stderr as
    `note:` lines."""
    logging.basicConfig(level=logging.INFO, format='note: %(message)s', stream=sys.stderr)
    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    show_warning, warnings.showwarning = warnings.showwarning, one_line_warning
    try:
        main_fn()
    except (ConfigError, DatasetError, CheckpointError, InputSizeError, OutputError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        number = getattr(stop, 'number', signal.SIGINT)
        print(f'\nstopped by {signal.Signals(number).name}', file=sys.stderr)
        sys.exit(128 + number)
    finally:
        warnings.showwarning = show_warning
        for number, handler in previous.items():
            signal.signal(number, handler)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one line, as train.log has them, not its file, line and source."""
    print(f'warning: {message}', file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: the module docstring as help, and a usage error as one line (exit code 2)."""

    def __init__(self, doc: str):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f'error: {message} (see --help)\n')

    def add_overrides(self, help: str = 'override config values, e.g. --set train.max_iters=200 head.type=aspp'):
        """`--set KEY=VALUE ...`, repeatable; the values are parsed as YAML (engine.config)."""
        self.add_argument('--set', nargs='+', default=[], action='extend', metavar='KEY=VALUE', help=help)


def number(kind=int, low=None, high=None):
    """An argparse `type` for a number in [low, high]: a value outside is a usage error (exit code 2)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got '{text}'")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f'>= {low}' if high is None else f'in [{low}, {high}]'
            raise argparse.ArgumentTypeError(f'must be {span}, got {text}')
        return value

    return parse


def config_for_checkpoint(checkpoint: dict, checkpoint_path, config_path=None, overrides=()) -> dict:
    """The run's config: `config_path` if given, else the one stored in the checkpoint; then overrides."""
    if config_path:
        return load_config(config_path, overrides)
    if not checkpoint.get('config'):
        raise ConfigError(
            f'{checkpoint_path} stores no config: pass the YAML the model was trained with, --config FILE'
        )
    source = f'{checkpoint_path} (stored config)'
    cfg = resolve(checkpoint['config'], overrides, source, accepted_keys)
    check_config(cfg, source)
    return cfg


CPU_COMPUTES = {torch.bfloat16: 'mkldnn_bf16', torch.float16: 'mkldnn_fp16'}
"""The oneDNN capability a CPU needs to run a dtype's convolutions and matmuls in hardware (AVX512-BF16
or AMX for bfloat16, AVX512-FP16 or AMX-FP16 for float16); without it autocast emulates them, slower
than float32."""


def cpu_computes(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` in hardware (False also where PyTorch was built without oneDNN)."""
    supported = getattr(torch.ops.mkldnn, f'_is_{CPU_COMPUTES[dtype]}_supported', None)
    return torch.backends.mkldnn.is_available() and supported is not None and supported()


def amp_dtype_for(cfg: dict, device: torch.device):
    """The autocast dtype of `train.amp`; None (full float32) with AMP off, or on a CPU that does not
    compute that dtype in hardware (said in one warning line)."""
    dtype = AMP_DTYPES.get(cfg['train']['amp'])
    if dtype is None or device.type != 'cpu' or cpu_computes(dtype):
        return dtype
    warnings.warn(f'train.amp {cfg["train"]["amp"]}: this CPU has no {dtype} arithmetic; running in float32')
    return None
