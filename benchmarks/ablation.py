"""What Offset Learning buys: pairs of training runs that differ only in `head.offset_learning`.

    OMP_NUM_THREADS=1 nice python benchmarks/ablation.py                  # four models on CamVid, 3 seeds
    python benchmarks/ablation.py --config my.yaml --model-from-config --iters 4000 --out work_dirs/abl_mine
    python benchmarks/ablation.py --pairs segformer_b0 configs/convnext_t_aspp.yaml --seeds 0 1 2 3 4
    python benchmarks/ablation.py --report-only                           # the table of the runs done so far
    OMP_NUM_THREADS=1 nice python benchmarks/ablation.py --jobs 2         # two runs at a time, a core each

Each pair is one model (the backbone, head and aux_head sections of a YAML file, or of --config itself
with --model-from-config) trained twice per seed: with the head's plain per-pixel classifier ("plain")
and with Offset Learning in its place ("OL"). Everything else comes from --config, the protocol:

Default protocol (configs/camvid.yaml, CamVid train -> val, 11 classes, from scratch):
  data      its data section: 480x360 rescaled x U[0.5, 1.5], 256x256 crops, flip, photometric
            distortion; validation on the 101 whole val images.
  recipe    its train section: batch 8, AdamW lr 1e-3 (every parameter), weight decay 0.01, cosine
            decay, SMP's Dice; --iters iterations (default 100), of which the first tenth warm up
            (camvid.yaml: 100 of 1800); one validation, at the end, of the weights themselves (the
            recipe's moving average is off: its window of ~200 steps would average the whole short
            run, random start included; `--set train.ema_decay=...` turns it on, and the table still
            scores the weights).
  models    backbone.pretrained: null (no ImageNet weights offline), each model's own head settings.
How it adapts the published recipes (SegFormer, SegNeXt, OffSeg: AdamW 6e-5 with head lr x10, 1500
warm-up iterations, poly power 1, batch 16 of 512x512 crops, 160k iterations from ImageNet weights):
from scratch a uniform lr of 1e-3 replaces the small backbone lr and the x10 head, and a CPU-sized
budget (batch 8 of 256x256, --iters iterations) replaces 160k GPU iterations; the evaluation is
CamVid's whole image (OffSeg-T's published sliding window is for ADE20K's sizes).

Every run is a normal train.py run (`--resume auto`) in <out>/<pair>/<arm>/seed<k>, its config.yaml
and train.log there. Runs go seed by seed (both arms of every pair for seed 0, then seed 1, ...), so a
stopped ablation already holds whole pairs; one after another in this process, or with --jobs N as N
train.py processes at a time (set OMP_NUM_THREADS to the cores per job: a run's result depends on its
seed, not on how many run beside it). Rerunning the same command skips finished runs (last.pth at
train.max_iters) and continues the others from their last checkpoint (one every tenth of the run,
train.checkpoint_interval, and one where SIGTERM or Ctrl-C stopped it). With --results, a run that
result file (--study) already holds under the same protocol counts as finished too: a long study goes
on from a fresh checkout whose run folders are gone. Before training, both arms of each pair are
resolved and checked to differ only in `head.offset_learning` (and their models only in the
parameters under head.classifier). The table (printed, <out>/ablation.md, <out>/ablation.json) gives
per model and arm the parameters, GMACs at the training crop, the final val mIoU per seed and its
mean +- std (ddof 1), and per pair the paired difference OL - plain per seed with its mean +- std.
"""

import json
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError, read_yaml  # noqa: E402
from engine.outputs import write_results  # noqa: E402
from engine.rules import input_size, load_config  # noqa: E402
from tools.measure import flatten, meta_model, recorded_rows, size_figures, write_result_table  # noqa: E402

DEFAULT_CONFIG = 'configs/camvid.yaml'
DEFAULT_ITERS = 100
MODEL_CONFIGS = {  # pair name -> the config whose model sections it trains
    'segformer_b0': 'configs/segformer_b0.yaml',  # MiT-B0 + mmseg SegFormer head
    'segnext_t': 'configs/segnext_t.yaml',  # MSCAN-T + LightHam
    'offseg_t': 'configs/offseg_t.yaml',  # EfficientFormerV2-S1 + OffSeg head
    'resnet18_deeplabv3plus': 'configs/camvid_deeplabv3plus.yaml',  # ResNet-18 (output stride 16) + DeepLabV3+
}
MODEL_SECTIONS = ('backbone', 'head', 'aux_head')
ARMS = {'plain': False, 'OL': True}
ARM_KEY = 'head.offset_learning'
CLASSIFIER = 'head.classifier.'
WARMUP_FRACTION = 10  # warm-up iterations = --iters // 10 (configs/camvid.yaml: 100 of 1800)
CHECKPOINTS = 10  # training checkpoints per run besides the last: a run killed midway loses a tenth at most


@dataclass
class Pair:
    """One model, trained with and without Offset Learning."""

    name: str
    sections: dict  # backbone / head / aux_head, as the pair's config file gives them


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument(
        '--config',
        default=DEFAULT_CONFIG,
        help=f'the protocol: data, train and eval sections of this YAML (default: {DEFAULT_CONFIG})',
    )
    models = parser.add_mutually_exclusive_group()
    models.add_argument(
        '--pairs',
        nargs='+',
        metavar='NAME|YAML',
        help=f'models to ablate: {", ".join(MODEL_CONFIGS)} or config files whose backbone, head '
        'and aux_head sections are taken (default: all four names)',
    )
    models.add_argument('--model-from-config', action='store_true', help="ablate --config's own model")
    parser.add_argument('--seeds', nargs='+', type=number(int, 0), default=[0, 1, 2])
    parser.add_argument(
        '--iters',
        type=number(int, 1),
        default=DEFAULT_ITERS,
        help=f'training iterations of every run (default: {DEFAULT_ITERS})',
    )
    parser.add_overrides('extra overrides for every run (e.g. data.workers=0 backbone.pretrained=PATH)')
    parser.add_argument('--out', type=Path, default=Path('work_dirs/ablation'), help='(default: work_dirs/ablation)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument(
        '--jobs', type=number(int, 1), default=1, help='runs at a time, each its own train.py process (default: 1)'
    )
    parser.add_argument('--report-only', action='store_true', help='train nothing: the table of the finished runs')
    parser.add_argument(
        '--results', type=Path, metavar='DIR', help='also write the table as a result file there (what the docs render)'
    )
    parser.add_argument('--study', default='ablation', help='the result file name (default: %(default)s)')
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ configs


def pairs_of(args) -> list:
    """The pairs asked for, each with the model sections of its config file, trained from scratch."""
    if args.model_from_config:
        items = [args.config]
    else:
        items = args.pairs or list(MODEL_CONFIGS)
    pairs = [pair_from(item) for item in items]
    names = [pair.name for pair in pairs]
    if len(set(names)) < len(names):
        raise ConfigError(
            f'--pairs: two pairs would share a run folder ({", ".join(names)}); give files with different names'
        )
    return pairs


def pair_from(item: str) -> Pair:
    """A pair name of MODEL_CONFIGS, or a YAML file (the pair is named after the file)."""
    path = Path(MODEL_CONFIGS.get(item, item))
    raw = read_yaml(path if path.is_absolute() or path.exists() else ROOT / path)
    if not (isinstance(raw.get('backbone'), dict) and isinstance(raw.get('head'), dict)):
        raise ConfigError(f'{path}: a pair takes the backbone and head sections of a config; it has none')
    sections = {name: raw.get(name) for name in MODEL_SECTIONS}
    sections['backbone'] = {**sections['backbone'], 'pretrained': None}  # --set backbone.pretrained=... to change
    return Pair(item if item in MODEL_CONFIGS else path.stem, sections)


def run_overrides(pair: Pair, offset_learning: bool, seed: int, args) -> list:
    """`--set` items of one run: the pair's model sections (replacing the protocol's), a warm-up of a
    tenth of the run, no moving average of the weights and a checkpoint every tenth of the run, then the
    user's extra overrides (which may change those), then what the ablation fixes: iterations, one
    validation at the end, seed and the arm."""
    model = [
        f'{name}=' + json.dumps(section if section is None else {'_delete_': True, **section})
        for name, section in pair.sections.items()
    ]
    warmup = f'train.schedule.warmup_iters={args.iters // WARMUP_FRACTION}'
    fixed = [
        f'train.max_iters={args.iters}',
        f'train.val_interval={args.iters}',
        f'train.seed={seed}',
        f'{ARM_KEY}={str(offset_learning).lower()}',
    ]
    checkpoints = f'train.checkpoint_interval={max(1, args.iters // CHECKPOINTS)}'
    return [*model, warmup, 'train.ema_decay=null', checkpoints, *args.set, *fixed]


def arm_configs(pair: Pair, seed: int, args) -> dict:
    """{arm: resolved config} of the pair for one seed."""
    return {arm: load_config(args.config, run_overrides(pair, on, seed, args)) for arm, on in ARMS.items()}


def arm_difference(configs: dict) -> dict:
    """What tells the two arms apart: differing config keys and the state-dict keys found in one model only
    (built on the meta device). The ablation is valid when that is `head.offset_learning` and classifier keys."""
    plain, ol = (flatten(configs[arm]) for arm in ARMS)
    keys = sorted(k for k in plain.keys() | ol.keys() if plain.get(k, '<absent>') != ol.get(k, '<absent>'))
    plain_state, ol_state = (meta_model(configs[arm]).state_dict() for arm in ARMS)
    shared = plain_state.keys() & ol_state.keys()
    changed = [k for k in shared if plain_state[k].shape != ol_state[k].shape]
    only = sorted((plain_state.keys() ^ ol_state.keys()) | set(changed))
    return {
        'config_keys': keys,
        'state_keys': only,
        'valid': keys == [ARM_KEY] and all(k.startswith(CLASSIFIER) for k in only),
    }


def check_pairs(pairs: list, args) -> dict:
    """{pair: arm_difference}, stopping before any training if some pair's arms differ in more."""
    checks = {pair.name: arm_difference(arm_configs(pair, args.seeds[0], args)) for pair in pairs}
    for name, check in checks.items():
        print(
            f'check {name}: configs differ in {check["config_keys"]}; models in {len(check["state_keys"])} '
            f'state-dict keys, {"all" if check["valid"] else "NOT all"} under {CLASSIFIER.rstrip(".")}'
        )
    broken = [name for name, check in checks.items() if not check['valid']]
    if broken:
        raise SystemExit(
            f'error: the arms of {", ".join(broken)} differ in more than the classifier; '
            'an override (--set) must not change with the arm'
        )
    return checks


def protocol_of(cfg: dict) -> dict:
    """The shared recipe as read from a resolved run config, for the report."""
    train_cfg, data = cfg['train'], cfg['data']
    return {
        'data': f'{data["type"]} at {data["root"]}, splits {data["train"]["split"]} -> {data["val"]["split"]}',
        'crop': list(input_size(cfg)),
        'batch_size': train_cfg['batch_size'],
        'iters': train_cfg['max_iters'],
        'optimizer': train_cfg['optimizer'],
        'param_groups': train_cfg['param_groups'],
        'schedule': train_cfg['schedule'],
        'loss': train_cfg['loss'],
        'eval': cfg['eval'],
        'threads': torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------- runs


def run_dir(out: Path, pair: Pair, arm: str, seed: int) -> Path:
    return out / pair.name / arm / f'seed{seed}'


def last_checkpoint(work_dir: Path):
    path = work_dir / 'last.pth'
    return load_checkpoint(path) if path.is_file() else None


def is_finished(work_dir: Path, iters: int) -> bool:
    checkpoint = last_checkpoint(work_dir)
    return checkpoint is not None and checkpoint['iteration'] >= iters


def train_runs(runs: list, args, recorded: dict, after_each) -> None:
    """Train the (pair, arm, seed) runs not finished yet (in --out, or `recorded`): in this process, or
    --jobs at a time; `after_each()` whenever one finishes."""
    todo = []
    for pair, arm, seed in runs:
        work_dir = run_dir(args.out, pair, arm, seed)
        if is_finished(work_dir, args.iters):
            print(f'{work_dir}: finished, skipped')
        elif (pair.name, arm, seed) in recorded:
            print(f'{work_dir}: finished, read back from {args.results}')
        else:
            todo.append((work_dir, train_arguments(work_dir, pair, arm, seed, args)))
    if args.jobs > 1:
        return run_processes(todo, args.jobs, after_each)
    for work_dir, arguments in todo:
        print(f'{work_dir}: training')
        train.main(arguments)
        after_each()


def run_processes(todo: list, jobs: int, after_each) -> None:
    """Train `todo` ([(work_dir, train.py arguments)]) as train.py processes, `jobs` at a time, calling
    `after_each()` as each one finishes (the table and result file follow a long study); SystemExit
    naming the runs that failed."""
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        runs = {pool.submit(train_process, *run): run[0] for run in todo}
        for run in as_completed(runs):
            if run.result():
                after_each()
            else:
                failed.append(str(runs[run]))
    if failed:
        raise SystemExit(f'error: {len(failed)} run(s) failed, see console.txt in: ' + ', '.join(failed))


def train_arguments(work_dir: Path, pair: Pair, arm: str, seed: int, args) -> list:
    """train.py's command line of one run, continued from its last checkpoint if it has one."""
    return resumable_run(args.config, work_dir, args.device, run_overrides(pair, ARMS[arm], seed, args))


def resumable_run(config: str, work_dir: Path, device: str, overrides: list) -> list:
    """train.py's arguments for a run of `config` with `overrides` in `work_dir`, continued if it stopped."""
    run = ['--config', config, '--work-dir', str(work_dir), '--resume', 'auto', '--device', device]
    return [*run, '--set', *overrides] if overrides else run  # --set takes one value at least


def train_process(work_dir: Path, arguments: list) -> bool:
    """One run as its own train.py process; its console output is kept in the run's console.txt."""
    say(f'{work_dir}: training (train.py process)')
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / 'console.txt', 'a') as console:
        code = subprocess.call(
            [sys.executable, str(ROOT / 'train.py'), *arguments], stdout=console, stderr=subprocess.STDOUT
        )
    say(f'{work_dir}: {"done" if code == 0 else f"FAILED (exit {code}), see console.txt"}')
    return code == 0


def say(line: str) -> None:
    """One whole line, even when --jobs threads print at once (print writes the newline separately)."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()


def final_miou(work_dir: Path, iters: int):
    """The val mIoU of the one validation, at the last iteration; None if the run has not finished."""
    checkpoint = last_checkpoint(work_dir)
    if checkpoint is None or checkpoint['iteration'] < iters:
        return None
    best = checkpoint['best']['model']
    return best['miou'] if best['iteration'] == iters else None


def recorded_runs(args, notes: list) -> dict:
    """{(pair name, arm, seed): val mIoU} of the finished runs the --results file holds under `notes`
    (the protocol and budget this command would write)."""
    runs = {}
    for row in recorded_rows(args.results, args.study, args.device, notes):
        pair = row['model'].partition(' (')[0]  # '<pair> (<backbone> + <head>)'
        for column, miou in row.items():
            if column.startswith('seed ') and miou is not None:
                runs[pair, row['arm'], int(column.removeprefix('seed '))] = miou
    return runs


# ------------------------------------------------------------------------------------------- report


def run_miou(pair: Pair, arm: str, seed: int, args, recorded: dict):
    """A run's val mIoU: from its folder in --out, else as the result file recorded it; None if neither."""
    miou = final_miou(run_dir(args.out, pair, arm, seed), args.iters)
    return recorded.get((pair.name, arm, seed)) if miou is None else miou


def mean_std(values: list) -> dict:
    """Mean and sample std (ddof 1) of the values there are; None where too few."""
    present = [v for v in values if v is not None]
    return {
        'mean': statistics.mean(present) if present else None,
        'std': statistics.stdev(present) if len(present) >= 2 else None,
    }


def pair_result(pair: Pair, check: dict, args, recorded: dict) -> dict:
    """Sizes, per-seed mIoU (of the run in --out, else as `recorded`) and summary of both arms, and the
    paired differences."""
    configs = arm_configs(pair, args.seeds[0], args)
    arms, figures = {}, {arm: size_figures(cfg, input_size(cfg)) for arm, cfg in configs.items()}
    for arm, sizes in figures.items():
        miou = [run_miou(pair, arm, seed, args, recorded) for seed in args.seeds]
        arms[arm] = {'params_m': sizes['params_m'], 'gmacs': sizes['gmacs'], 'miou': miou, **mean_std(miou)}
    plain, ol = (arms[arm] for arm in ARMS)
    differences = [None if a is None or b is None else b - a for a, b in zip(plain['miou'], ol['miou'])]
    return {
        'pair': pair.name,
        'model': figures['plain']['model'],
        'check': check,
        'arms': arms,
        'difference': {
            'params_m': ol['params_m'] - plain['params_m'],
            'gmacs': ol['gmacs'] - plain['gmacs'],
            'miou': differences,
            **mean_std(differences),
        },
    }


def cell(value, fmt: str = '.2f') -> str:
    return '–' if value is None else format(value, fmt)


def summary_cell(row: dict, sign: str = '') -> str:
    if row['mean'] is None:
        return '–'
    return cell(row['mean'], sign + '.2f') + ('' if row['std'] is None else f' ± {row["std"]:.2f}')


def table(results: list, seeds: list) -> str:
    """One Markdown table: per pair a row for each arm and one for OL - plain."""
    lines = [
        '| model | arm | params (M) | GMACs | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean ± std |',
        '|' + '---|' * (len(seeds) + 5),
    ]
    for result in results:
        plain, ol = (result['arms'][arm] for arm in ARMS)
        lines += [
            table_row(f'{result["pair"]} ({result["model"]})', 'plain', plain),
            table_row('', 'OL', ol),
            table_row('', 'OL − plain', result['difference'], sign='+'),
        ]
    return '\n'.join(lines)


def table_row(model: str, arm: str, row: dict, sign: str = '') -> str:
    """A row of sizes and mIoUs; `sign` '+' for differences."""
    cells = [
        model,
        arm,
        cell(row['params_m'], sign + '.3f'),
        cell(row['gmacs'], sign + '.3f'),
        *(cell(v, sign + '.2f') for v in row['miou']),
        summary_cell(row, sign),
    ]
    return '| ' + ' | '.join(cells) + ' |'


def result_notes(protocol: dict, args) -> list:
    return [f'protocol: {json.dumps(protocol)}', f'val mIoU (%) after {args.iters} iterations']


def write_report(results: list, protocol: dict, args, argv) -> str:
    """The table, printed and written with the protocol and the command to <out>/ablation.{md,json}."""
    text = table(results, args.seeds)
    command = shlex.join(['python', 'benchmarks/ablation.py', *argv])
    record = {'command': command, 'protocol': protocol, 'seeds': args.seeds, 'pairs': results}
    write_results(
        args.out,
        {
            'ablation.md': f'`{command}`\n\nprotocol: {json.dumps(protocol)}\n\n'
            f'val mIoU (%) after {args.iters} iterations\n\n{text}\n',
            'ablation.json': json.dumps(record, indent=2) + '\n',
        },
    )
    print(text)
    if args.results:
        columns = ['model', 'arm', 'params (M)', 'GMACs', *(f'seed {s}' for s in args.seeds)]
        rows = [
            [
                f'{result["pair"]} ({result["model"]})',
                arm,
                arms[arm]['params_m'],
                arms[arm]['gmacs'],
                *arms[arm]['miou'],
            ]
            for result in results
            for arms in [result['arms']]
            for arm in ARMS
        ]
        path = write_result_table(args.results, args.study, columns, rows, args.device, result_notes(protocol, args))
        print('results:', path)
    return text


def main(argv=None) -> list:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    pairs = pairs_of(args)
    checks = check_pairs(pairs, args)
    protocol = protocol_of(arm_configs(pairs[0], args.seeds[0], args)['plain'])
    print('protocol: ' + json.dumps(protocol))
    recorded = recorded_runs(args, result_notes(protocol, args))

    def report() -> list:
        results = [pair_result(pair, checks[pair.name], args, recorded) for pair in pairs]
        write_report(results, protocol, args, argv)
        return results

    if not args.report_only:
        runs = [(pair, arm, seed) for seed in args.seeds for pair in pairs for arm in ARMS]
        train_runs(runs, args, recorded, after_each=report)
    return report()


if __name__ == '__main__':
    run_cli(main)
