"""What a training run reports, on the main process only: lines on the console (above the progress
bar) and in `train.log`, scalars and pictures in TensorBoard, and every logged number as one JSON
object a line in `metrics.jsonl`, which scripts read (`read_metrics`) instead of parsing the log.

A `metrics.jsonl` record: {"iteration": 600, "time": <unix seconds>, "tag": "val", "mIoU": 58.1, ...}
with tag `start` (a run starts or resumes), `train` (loss terms, lr, images/s), `val` or `val_ema`
(the scores of `eval.metrics` and their per-class values). A resumed run appends: records of
iterations it repeats come again, and `read_metrics` keeps the last of each (tag, iteration).
"""

import json
import logging
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from . import dist
from .metrics import null_for_nan, per_class_keys, reported
from .trackers import TRACKERS
from .visualize import ClassStyle, confusion_heatmap, iou_chart, side_by_side

# Loggers whose records (weight-loading reports, resume fallbacks) also belong in train.log.
LIBRARY_LOGGERS = ('models', 'engine')
LOG_TIME_FORMAT = '%Y-%m-%d %H:%M:%S'  # the stamp of every line, on the console and in train.log
METRICS_FILE = 'metrics.jsonl'

SHOWN_IMAGES = 4  # validation images drawn into TensorBoard at each validation: the first ones, always the same


class Logger:
    """Console (above the progress bar), work_dir/train.log, metrics.jsonl and the experiment trackers of
    `loggers` (engine/trackers.py: TensorBoard by default), on the main process only (elsewhere, with
    work_dir None, every call does nothing)."""

    def __init__(self, work_dir, loggers=('tensorboard',)):
        self.file = self.metrics = None
        self.trackers = []
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(work_dir / 'train.log', 'a')
            self.metrics = open(work_dir / METRICS_FILE, 'a')
            self.trackers = [TRACKERS[name](work_dir, work_dir.name) for name in loggers]
            self.handler = ForwardTo(self)
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).addHandler(self.handler)
                logging.getLogger(name).setLevel(logging.INFO)
                logging.getLogger(name).propagate = False  # printed here once, not again by the CLI's handler
            self.show_warning, warnings.showwarning = warnings.showwarning, self.warning

    def __call__(self, message: str) -> None:
        if self.file:
            stamp = time.strftime(LOG_TIME_FORMAT)
            stamped = ''.join(f'{stamp}  {line}\n' for line in message.splitlines())
            tqdm.write(stamped.rstrip('\n'))
            self.file.write(stamped)
            self.file.flush()

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def scalars(self, step: int, values: dict) -> None:
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def record(self, iteration: int, tag: str, values: dict) -> None:
        """One record of metrics.jsonl (NaN, a class absent from the data, is written as null)."""
        if self.metrics:
            entry = {'iteration': iteration, 'time': round(time.time(), 3), 'tag': tag, **null_for_nan(values)}
            self.metrics.write(json.dumps(entry) + '\n')
            self.metrics.flush()

    def images(self, step: int, draw) -> None:
        """The pictures {tag: RGB (H, W, 3) uint8} that `draw()` returns; drawn only where they are logged."""
        if self.trackers:
            images = draw()
            for tracker in self.trackers:
                tracker.images(step, images)

    def config(self, cfg: dict, path: Path) -> None:
        """The run's resolved config `cfg`, written to `path`, to each tracker: its values and the file."""
        for tracker in self.trackers:
            tracker.config(cfg, path)

    def warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """Python warnings during the run (e.g. weights that did not all fit) go to train.log too."""
        self(f'warning: {message}')

    def close(self) -> None:
        """Flush and close the log and TensorBoard; a failure there (a full disk) is a warning, so that
        it does not hide the error that ended the run."""
        if self.file:
            warnings.showwarning = self.show_warning
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).removeHandler(self.handler)
                logging.getLogger(name).propagate = True
            closables = [(self.file, 'train.log'), (self.metrics, METRICS_FILE)]
            closables += [(tracker, f'the {type(tracker).__name__} log') for tracker in self.trackers]
            for closable, name in closables:
                try:
                    closable.close()
                except (OSError, RuntimeError) as error:
                    print(f'warning: {name} could not be written completely ({error})', file=sys.stderr)


def progress_bar(**options) -> tqdm:
    """A tqdm bar on the main process, shown only on a terminal: under nohup, Slurm or tee the log's
    periodic lines are the progress, not a stream of carriage returns."""
    return tqdm(dynamic_ncols=True, disable=None if dist.is_main() else True, **options)


class ForwardTo(logging.Handler):
    """Library log records, as lines of a Logger."""

    def __init__(self, log: Logger):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(('warning: ' if record.levelno >= logging.WARNING else '') + record.getMessage())


class FirstSamples:
    """An `on_sample` hook for `evaluate` that keeps the first `count` samples: the images shown in TensorBoard."""

    def __init__(self, count: int = SHOWN_IMAGES):
        self.count, self.samples = count, []

    def __call__(self, position: int, image, label, prediction) -> None:
        if position < self.count:
            self.samples.append((image, label, prediction))


def log_validation(
    log: Logger, iteration: int, name: str, results: dict, metric_names, best, style: ClassStyle, samples=()
) -> None:
    """One line, the scalars and a metrics.jsonl record of `metric_names` (`val/*` for the model,
    `val_ema/*` for its moving average; `best` is its best validation so far), and as images the
    per-class IoU, the confusion matrix and `samples` (image | ground truth | prediction)."""
    label, prefix = ('', 'val') if name == 'model' else (' (EMA)', 'val_ema')
    if math.isnan(results['mIoU']):
        log(
            f'iter {iteration}{label}: no valid label pixel in the validation set (every label is '
            'data.ignore_index?): nothing to score'
        )
        return
    names = reported(metric_names)
    scores = '  '.join(f'{name} {results[name]:.2f}' for name in names)
    log(f'iter {iteration}{label}: {scores}  (best mIoU {best.miou:.2f} at {best.iteration})')
    per_class = per_class_keys(metric_names)
    log.scalars(iteration, {f'{prefix}/{name}': results[name] for name in names})
    log.scalars(
        iteration,
        {
            f'{prefix}/{key}/{c}': value
            for key in per_class
            for c, value in zip(style.names, results[key])
            if not math.isnan(value)
        },
    )
    log.record(iteration, prefix, {name: results[name] for name in [*names, *per_class]})
    log.images(
        iteration,
        lambda: {
            f'{prefix}/IoU_chart': iou_chart(results['IoU'], style),
            f'{prefix}/confusion': confusion_heatmap(results['confusion'], style),
            **{f'{prefix}/prediction_{i}': side_by_side(*sample, style) for i, sample in enumerate(samples)},
        },
    )


def log_resources(log: Logger, iteration: int, optimizer, device: torch.device) -> None:
    """The learning rate of every parameter group (named by its train.param_groups rule) and the peak memory."""
    # A group restored from a checkpoint written before groups had names goes by its index.
    rates = {f'lr/{group.get("name", i)}': group['lr'] for i, group in enumerate(optimizer.param_groups)}
    log.scalars(iteration, {**rates, **peak_memory(device)})


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far, MiB. On CUDA the high-water mark of tensor memory allocated on the device; on
    CPU that of the process's resident set (ru_maxrss: this process, not its data-loader workers)."""
    if device.type == 'cuda':
        return {'memory/peak_cuda_allocated_mib': torch.cuda.max_memory_allocated(device) / 2**20}
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return {'memory/peak_rss_mib': kib_or_bytes / (2**20 if sys.platform == 'darwin' else 2**10)}


def read_metrics(work_dir) -> list:
    """The records of a run's metrics.jsonl in iteration order, the last of each (tag, iteration)."""
    path = Path(work_dir) / METRICS_FILE
    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        records[record['tag'], record['iteration']] = record
    return sorted(records.values(), key=lambda record: record['iteration'])


def validation_curve(work_dir, tag: str = 'val', metric: str = 'mIoU') -> dict:
    """{iteration: score} of a run's validations (`tag` 'val_ema': of its moving average)."""
    return {r['iteration']: r[metric] for r in read_metrics(work_dir) if r['tag'] == tag}


def run_seconds(work_dir):
    """Seconds from a run's start to its last record (the pause of a resumed run included), or None."""
    times = [record['time'] for record in read_metrics(work_dir)]
    return max(times) - min(times) if len(times) > 1 else None
