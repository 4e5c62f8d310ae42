"""The measured tables of README.md and docs/, rendered from the result files in benchmarks/results/
(written by the scripts that measured them: tools/measure.py `write_result_table`).

Each function takes the path of the page it renders into (links are relative to it) and returns
Markdown: the table, then where it comes from (the command, the machine, the date, the file) and the
protocol notes the file records. Means, standard deviations (over seeds, n - 1) and differences are
computed here from the recorded rows, never typed.
"""

import functools
import json
import os
import statistics
from pathlib import Path

from engine.config import read_config
from engine.rules import accepted_keys
from tools.measure import describe, meta_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
CONFIGS = ROOT / 'configs'

REFERENCE_VECTORS = (
    'mask2former_swin_t_ol',
    'offseg_t',
    'segformer_b0',
    'segformer_b0_ol',
    'segnext_t',
    'segnext_t_ol',
)
"""Configs whose converted official checkpoints reproduce the official code's logits within 1e-4
relative (tests/test_published_models.py and tests/test_mask2former.py, with ../shared/vectors)."""

SPEED_CONFIGS = (
    'segformer_b0',
    'segformer_b0_ol',
    'segnext_t',
    'segnext_t_ol',
    'offseg_t',
    'offseg_b',
    'offseg_l',
    'deeplabv3plus_r50',
    'convnext_t_upernet',
    'swin_t_upernet',
    'dinov2_vits14_linear',
    'dinov3_vits16_linear',
    'dinov3_vits16_upernet',
    'dinov3_convnext_t_segformer',
    'dinov3_convnext_t_segformer_ol',
    'dinov3_convnext_t_offseg_ol',
)
README_MODELS = (
    'offseg_t',
    'offseg_b',
    'offseg_l',
    'segformer_b0',
    'segformer_b0_ol',
    'segnext_t',
    'segnext_t_ol',
    'mask2former_swin_t',
    'mask2former_swin_t_ol',
    'deeplabv3plus_r50',
)
DATASETS = {
    'ade20k': 'ADE20K',
    'cityscapes': 'Cityscapes',
    'coco_stuff': 'COCO-Stuff 164k',
    'pascal_context': 'Pascal Context-59',
}


# ------------------------------------------------------------------------------------- reading


@functools.cache
def result(study: str, machine: str) -> dict:
    """The result file of `study` measured on `machine` (`cpu2`, `h200`), whatever torch it ran on:
    its record, with `rows` as dicts and `path`."""
    paths = sorted(RESULTS.glob(f'{study}-{machine}-torch*.json'))
    if len(paths) != 1:
        found = ', '.join(p.name for p in paths) or 'none'
        raise SystemExit(f'error: expected one result file {study}-{machine}-torch*.json in {RESULTS}, found {found}')
    record = json.loads(paths[0].read_text())
    record['rows'] = [dict(zip(record['columns'], row)) for row in record['rows']]
    record['path'] = paths[0]
    return record


def mean_std(values: list) -> tuple:
    values = [v for v in values if v is not None]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------- writing


def cell(value, spec: str = '.2f', sign: bool = False) -> str:
    if value is None:
        return ''
    if isinstance(value, str):
        return value
    return format(value, ('+' if sign else '') + spec)


def pm(values: list, sign: bool = False) -> str:
    """Mean ± std, or the value alone where there is one."""
    mean, std = mean_std(values)
    return f'{cell(mean, sign=sign)} ± {std:.2f}' if len(values) > 1 else cell(mean, sign=sign)


def size_text(size) -> str:
    """An input size as the tables write it: 512x512."""
    return 'x'.join(map(str, size))


def table(header: list, rows: list) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(cell(value) for value in row) + ' |' for row in rows]
    return '\n'.join(lines)


def provenance(record: dict, page: Path) -> str:
    """Where a table comes from, and the protocol notes its file records."""
    env = record['environment']
    machine = env['machine'] + (f', {env["threads"]} thread(s)' if env.get('threads') else '')
    link = os.path.relpath(record['path'], page.parent)
    command = f'`{record["command"]}`' if record.get('command') else 'the runs named in the table'
    lines = [
        f'Measured by {command} on {machine}, torch {env["torch"]}, {record["date"]}: [{record["path"].name}]({link}).'
    ]
    if record.get('source'):
        lines[0] += f' Source: {record["source"]}.'
    lines += [f'- {line}' for note in record['notes'] for line in note.splitlines()]
    return '\n'.join(lines)


def rendered(record: dict, page: Path, body: str) -> str:
    return f'{body}\n\n{provenance(record, page)}'


def link(page: Path, target: str, text: str) -> str:
    return f'[{text}]({os.path.relpath(ROOT / target, page.parent)})'


# ---------------------------------------------------------------------------------- the model zoo


@functools.cache
def model_zoo_rows() -> dict:
    """{config name: the model_zoo benchmark's row} (parameters, GMACs and CPU latency)."""
    return {Path(row['config']).stem: row for row in result('model_zoo', 'cpu2')['rows']}


@functools.cache
def published_configs() -> list:
    """(name, config) of every config with a `paper` section, in file order (read and validated; the
    model each builds is checked by the tests)."""
    configs = [(path.stem, read_config(path, accepts=accepted_keys)) for path in sorted(CONFIGS.glob('*.yaml'))]
    return [(name, cfg) for name, cfg in configs if cfg['paper']]


def verified(name: str, cfg: dict) -> str:
    if name in REFERENCE_VECTORS:
        return "logits = official code's"
    return 'params = paper' if 'params_m' in cfg['paper'] else ''


def model_zoo(page: Path) -> str:
    record = result('model_zoo', 'cpu2')
    sections, unmeasured = [], []
    by_dataset = {}
    for name, cfg in published_configs():
        by_dataset.setdefault(cfg['data']['type'], []).append((name, cfg))
    header = ['config', 'model', 'paper mIoU', 'params (M)', 'GMACs', 'CPU ms', 'official checkpoint', 'verified here']
    for dataset, configs in by_dataset.items():
        rows = []
        for name, cfg in configs:
            paper = cfg['paper']
            checkpoint = f'[download]({paper["checkpoint"]})' if paper.get('checkpoint') else ''
            measured = model_zoo_rows().get(name)
            if measured is None:
                unmeasured.append(name)
                figures = [describe(meta_model(cfg), cfg), '', '', '']
            else:
                figures = [
                    measured['model'],
                    f'{measured["params_m"]:.2f}',
                    f'{measured["gmacs"]:.1f}',
                    f'{measured["latency_ms_median"]:.0f}',
                ]
            rows.append(
                [
                    link(page, f'configs/{name}.yaml', name),
                    figures[0],
                    str(paper.get('miou', '')),
                    *figures[1:],
                    checkpoint,
                    verified(name, cfg),
                ]
            )
        sections.append(f'### {DATASETS.get(dataset, dataset)}\n\n{table(header, rows)}')
    size = size_text(record['rows'][0]['size'])
    intro = (
        f'GMACs and CPU ms at one {size} image (CPU ms: median latency of the forward, one thread, on the '
        "`evaluate.py` fast path); params as built, at the config's class count."
    )
    if unmeasured:
        intro += (
            f' Not in the result file yet (added after it was measured; the command below measures every '
            f'config): {", ".join(f"`{name}`" for name in unmeasured)}.'
        )
    return rendered(record, page, intro + '\n\n' + '\n\n'.join(sections))


def readme_models(page: Path) -> str:
    configs = dict(published_configs())
    rows = []
    for name in README_MODELS:
        measured = model_zoo_rows()[name]
        rows.append(
            [
                link(page, f'configs/{name}.yaml', name),
                measured['model'],
                f'{measured["params_m"]:.1f}',
                str(configs[name]['paper'].get('miou', '')),
            ]
        )
    return table(['config (ADE20K)', 'model', 'params (M)', 'paper mIoU'], rows)


# ---------------------------------------------------------------------------------------- CamVid


def camvid_runs(page: Path) -> str:
    record = result('camvid_runs', 'cpu2')
    header = [
        'config',
        'model',
        'data',
        'val mIoU',
        'mAcc',
        'aAcc',
        'raw weights mIoU',
        'wall time (min)',
        'conditions',
    ]
    rows = [[row[column] for column in record['columns']] for row in record['rows']]
    return rendered(record, page, table(header, rows))


def camvid_peer(page: Path) -> str:
    record = result('camvid_peer', 'cpu2')
    points = ['iter 600', 'iter 1200', 'iter 1800']
    rows = [[row['run'], row['weights'], *(row[p] for p in points), row['wall time (min)']] for row in record['rows']]
    ours = next(row for row in record['rows'] if row['weights'] == 'average')
    peer = next(row for row in record['rows'] if row['run'] != ours['run'])
    rows.append(['ours (average) − peer', '', *(cell(ours[p] - peer[p], sign=True) for p in points), None])
    return rendered(record, page, table(['run', 'weights', *points, 'wall time (min)'], rows))


def heldout_cells(fold: str, iteration: int, seeds: list, peer: list, ours: list, difference: list) -> list:
    """A row of benchmarks/camvid_heldout.py as printed and rendered: each score over the seeds as mean ± std."""
    return [fold, str(iteration), ' '.join(map(str, seeds)), pm(peer), pm(ours), pm(difference, sign=True)]


def camvid_heldout(page: Path) -> str:
    record = result('camvid_heldout', 'cpu2')
    rows = [heldout_cells(*(row[column] for column in record['columns'])) for row in record['rows']]
    return rendered(record, page, table(record['columns'], rows))


def heldout_row_table(rows: list) -> str:
    """benchmarks/camvid_heldout.py's recipe rows ({column: value} dicts) as printed and rendered: a line
    per row and fold, each validation point's mIoU and its difference to the peer paired by seed, and the
    last point's difference to the shipped recipe, each as mean ± std over the seeds, and the mean wall time."""
    groups = {}
    for row in rows:
        groups.setdefault(row['row'], {}).setdefault(row['held out'], {})[row['iteration']] = row
    points = sorted({row['iteration'] for row in rows})
    lines = []
    for name, folds in groups.items():
        for fold, at in folds.items():
            last = at[max(at)]
            scores = [f'{pm(at[p]["score"])} ({pm(at[p]["row − peer"], sign=True)})' if p in at else '' for p in points]
            change = last['change'] if fold == next(iter(folds)) else ''
            seeds = ' '.join(map(str, last['seeds']))
            minutes = cell(mean_std(last['minutes'])[0], '.0f')
            lines.append([f'`{name}`', change, fold, seeds, *scores, pm(last['row − recipe'], sign=True), minutes])
    header = ['row', 'change', 'held out', 'seeds', *(f'iter {p} (− peer)' for p in points), 'final − recipe', 'min']
    return table(header, lines)


def camvid_heldout_recipes(page: Path) -> str:
    record = result('camvid_heldout_recipes', 'cpu2')
    return rendered(record, page, heldout_row_table(record['rows']))


def seed_summary(record: dict) -> dict:
    """{(recipe, weights): {point: 'mean ± std'}}, from the seeds' rows or from recorded mean and std rows."""
    points = [column for column in record['columns'] if column.startswith('iter')]
    groups = {}
    for row in record['rows']:
        groups.setdefault((row['recipe'], row['weights']), []).append(row)
    summary = {}
    for key, rows in groups.items():
        seeds = [row for row in rows if isinstance(row['seed'], int)]
        if seeds:
            summary[key] = {p: pm([row[p] for row in seeds]) for p in points}
        else:
            mean, std = (next(row for row in rows if row['seed'] == which) for which in ('mean', 'std'))
            summary[key] = {p: f'{mean[p]:.2f} ± {std[p]:.2f}' for p in points}
    return summary


def camvid_seeds(page: Path) -> str:
    record = result('camvid_seeds', 'h200')
    points = [column for column in record['columns'] if column.startswith('iter')]
    rows = [
        [recipe, weights, *(values[p] for p in points)] for (recipe, weights), values in seed_summary(record).items()
    ]
    return rendered(record, page, table(['recipe', 'weights', *(f'{p}, mean ± std' for p in points)], rows))


def camvid_recipes(page: Path) -> str:
    record = result('camvid_recipes', 'h200')
    points = ['iter 600', 'iter 1200', 'iter 1800']
    rows = [
        [
            f'`{row["row"]}`',
            row['change'],
            *(' / '.join(cell(row[f'{p} {w}']) for w in ('raw', 'average')) for p in points),
        ]
        for row in record['rows']
    ]
    return rendered(record, page, table(['row', 'change', *(f'{p} (raw / average)' for p in points)], rows))


def plain_table(study: str, machine: str, page: Path) -> str:
    record = result(study, machine)
    rows = [[row[column] for column in record['columns']] for row in record['rows']]
    return rendered(record, page, table(record['columns'], rows))


def camvid_recipes_early(page: Path) -> str:
    return plain_table('camvid_recipes_early', 'cpu2', page)


def camvid_recipes_short(page: Path) -> str:
    return plain_table('camvid_recipes_short', 'cpu2', page)


# ------------------------------------------------------------------------------ Offset Learning


SEEDS = ('seed 0', 'seed 1', 'seed 2')


def ablation_pairs() -> dict:
    """{model: {'plain': row, 'OL': row}} of the ablation's result file."""
    pairs = {}
    for row in result('ablation', 'cpu2')['rows']:
        pairs.setdefault(row['model'], {})[row['arm']] = row
    return pairs


def ablation(page: Path) -> str:
    record = result('ablation', 'cpu2')
    rows = []
    for model, arms in ablation_pairs().items():
        plain, ol = arms['plain'], arms['OL']
        for label, row in (('plain', plain), ('OL', ol)):
            seeds = [row[s] for s in SEEDS]
            rows.append(
                [
                    model if label == 'plain' else '',
                    label,
                    f'{row["params (M)"]:.3f}',
                    f'{row["GMACs"]:.3f}',
                    *seeds,
                    pm(seeds),
                ]
            )
        differences = [ol[s] - plain[s] for s in SEEDS]
        rows.append(
            [
                '',
                'OL − plain',
                cell(ol['params (M)'] - plain['params (M)'], '.3f', sign=True),
                cell(ol['GMACs'] - plain['GMACs'], '.3f', sign=True),
                *(cell(d, sign=True) for d in differences),
                pm(differences, sign=True),
            ]
        )
    header = ['model', 'arm', 'params (M)', 'GMACs', *SEEDS, 'mean ± std']
    return rendered(record, page, table(header, rows))


# ---------------------------------------------------------------------------------------- speed


def speed_models(page: Path) -> str:
    record = result('model_zoo', 'cpu2')
    rows = []
    for name in SPEED_CONFIGS:
        row = model_zoo_rows()[name]
        rows.append(
            [
                f'`{name}`',
                row['model'],
                f'{row["params_m"]:.3f}',
                f'{row["gmacs"]:.2f}',
                cell(row['gmacs_paper_convention']),
                'channels_last' if row['channels_last'] else 'NCHW',
                f'{row["latency_ms_median"]:.1f}',
                f'{row["latency_ms_p90"]:.1f}',
                f'{row["images_per_s"]:.2f}',
                f'{row["peak_memory_mb"]:.0f}',
            ]
        )
    header = [
        'config',
        'model',
        'params (M)',
        'GMACs',
        "GMACs, OffSeg paper's count",
        'memory order',
        'median ms',
        'p90 ms',
        'images/s',
        'peak RSS (MB)',
    ]
    return rendered(record, page, table(header, rows))


def eomt_speed(page: Path) -> str:
    """EoMT-S against Mask2Former-Swin-T and SegFormer-B0, timed in one run: the ratios to EoMT-S."""
    record = result('eomt_speed', 'cpu2')
    rows = {Path(row['config']).stem: row for row in record['rows']}
    eomt = rows['eomt_dinov3_vits16']['latency_ms_median']
    body = table(
        ['config', 'model', 'params (M)', 'GMACs', 'median ms', 'time / EoMT-S'],
        [
            [
                f'`{name}`',
                row['model'],
                f'{row["params_m"]:.3f}',
                f'{row["gmacs"]:.2f}',
                f'{row["latency_ms_median"]:.1f}',
                f'{row["latency_ms_median"] / eomt:.2f}',
            ]
            for name, row in rows.items()
        ],
    )
    return rendered(record, page, body)


def size_sweep(page: Path) -> str:
    record = result('size_sweep', 'cpu2')
    rows = [
        [
            f'`{Path(row["config"]).stem}`',
            'channels_last' if row['channels_last'] else 'NCHW',
            size_text(row['size']),
            f'{row["gmacs"]:.2f}',
            f'{row["latency_ms_median"]:.1f}',
            f'{row["ms_per_gmac"]:.1f}',
        ]
        for row in record['rows']
    ]
    return rendered(record, page, table(['config', 'memory order', 'input', 'GMACs', 'median ms', 'ms/GMAC'], rows))


def compare_hf(page: Path) -> str:
    record = result('compare_hf', 'cpu2')
    [row] = record['rows']
    body = table(
        ['config', 'input', 'max abs logit difference', 'ours (ms)', 'transformers (ms)', 'transformers / ours'],
        [
            [
                f'`{Path(row["config"]).stem}` with `head.type=segformer_mlp`',
                size_text(row['size']),
                f'{row["compare_hf.max_abs_diff"]:.1e}',
                f'{row["compare_hf.ours_ms"]:.1f}',
                f'{row["compare_hf.hf_ms"]:.1f}',
                f'{row["compare_hf.hf_over_ours"]:.2f}',
            ]
        ],
    )
    return rendered(record, page, body)


def offseg_speed(page: Path) -> str:
    record = result('offseg_speed', 'cpu2')
    rows = []
    for row in record['rows']:
        whole = row['segformer_b0'] is not None
        rows.append(
            [
                row['change'],
                row['size'],
                f'{row["before"]:.1f}',
                f'{row["after"]:.1f}',
                f'{row["ratio"]:.2f}',
                f'{row["diff"]:.1e}',
                f'{row["segformer_b0"]:.1f}' if whole else '',
                f'{row["segformer_b0"] / row["after"]:.2f}' if whole else '',
                f'{row["ms_per_gmac"]:.1f}' if whole else '',
            ]
        )
    header = [
        'change',
        'input',
        'before (ms)',
        'after (ms)',
        'speed-up',
        'max rel. diff',
        'SegFormer-B0 (ms)',
        'B0 / OffSeg-T',
        'ms/GMAC',
    ]
    return rendered(record, page, table(header, rows))


def freed_memory(page: Path) -> str:
    record = result('freed_memory', 'cpu2')
    rows = [
        [
            row['model'],
            f'{row["side"]}²',
            f'{row["glibc defaults (ms)"]:.1f}',
            f'{row["freed memory kept (ms)"]:.1f}',
            f'{row["glibc defaults (ms)"] / row["freed memory kept (ms)"]:.2f}',
            f'{row["peak MB, glibc"]:.0f} / {row["peak MB, kept"]:.0f}',
        ]
        for row in record['rows']
    ]
    header = ['model', 'input', 'glibc defaults (ms)', 'freed memory kept (ms)', 'speed-up', 'peak RSS (MB)']
    return rendered(record, page, table(header, rows))


def camvid_train_step(page: Path) -> str:
    record = result('camvid_train_step', 'cpu2')
    rows = [
        [str(row['threads']), row['arm'], f'{row["ms/step"]:.0f}', f'{row["images/s"]:.2f}', f'{row["vs peer"]:.2f}']
        + [f'{row["GMAC/s"]:.1f}', f'{row["of GEMM"]:.2f}']
        for row in record['rows']
    ]
    return rendered(record, page, table(record['columns'], rows))


def training_step_summary() -> str:
    """`configs/camvid.yaml`'s step over the peer's at each thread count, float32 and bf16."""
    rows = result('camvid_train_step', 'cpu2')['rows']
    ratios = {(row['arm'], row['threads']): row['vs peer'] for row in rows}
    threads = sorted({row['threads'] for row in rows})
    text = ' / '.join(f'{ratios["ours", t]:.2f}x' for t in threads) + " the peer's speed in float32"
    if all(('ours, bf16', t) in ratios for t in threads):
        text += '; ' + ' / '.join(f'{ratios["ours, bf16", t]:.2f}x' for t in threads) + ' with bf16 autocast'
    return text


def frozen_backbone(page: Path) -> str:
    """Per config, the fine-tuned and the frozen backbone's trainable parameters, step time and training
    memory, with the frozen arm's share of each."""
    return two_arms(page, 'frozen_backbone', 'fine-tuned', 'frozen')


def activation_checkpointing(page: Path) -> str:
    """Per config, training without and with `backbone.with_cp`: step time and training memory."""
    return two_arms(page, 'activation_checkpointing', 'plain', 'with_cp')


def two_arms(page: Path, study: str, first: str, second: str) -> str:
    """A benchmarks/arms.py table: per config, both arms' trainable parameters, step time and training
    memory, with the second arm's share of each."""
    record = result(study, 'cpu2')
    arms = {(row['config'], row['arm']): row for row in record['rows']}
    rows = []
    for config in dict.fromkeys(row['config'] for row in record['rows']):
        a, b = arms[config, first], arms[config, second]
        rows.append(
            [
                f'`{config}`',
                f'{a["trainable params"] / 1e6:.3f} / {b["trainable params"] / 1e6:.3f}',
                f'{a["ms/step"]:.0f} / {b["ms/step"]:.0f}',
                f'{b["ms/step"] / a["ms/step"]:.2f}',
                f'{a["training MB"]:.0f} / {b["training MB"]:.0f}',
                f'{b["training MB"] / a["training MB"]:.2f}',
            ]
        )
    share = f'{second} / {first}'
    header = ['config', 'trainable params (M)', 'ms/step', share, 'training MB', share]
    return rendered(record, page, table(header, rows))


def onnx_runtime(page: Path) -> str:
    record = result('onnx_runtime', 'cpu2')
    rows = [
        [
            f'`{Path(row["config"]).stem}`',
            f'{row["onnx.eager_ms"]:.1f}',
            f'{row["onnx.onnxruntime_ms"]:.1f}',
            f'{row["onnx.onnx_over_eager"]:.2f}',
            f'{row["onnx.max_abs_diff"]:.1e}',
        ]
        for row in record['rows']
    ]
    header = ['config', 'eager (ms)', 'ONNX Runtime (ms)', 'ONNX Runtime / eager', 'max abs output difference']
    return rendered(record, page, table(header, rows))


def onnx_int8(page: Path) -> str:
    record = result('onnx_int8', 'cpu2')
    rows = [
        [
            row['model'],
            row['eager ms'],
            row['onnxruntime float32 ms'],
            row['onnxruntime int8 ms'],
            f'{row["onnxruntime float32 ms"] / row["onnxruntime int8 ms"]:.2f}',
            f'{row["eager ms"] / row["onnxruntime int8 ms"]:.2f}',
            f'{row["eager mIoU"]:.2f} / {row["float32 mIoU"]:.2f} / {row["int8 mIoU"]:.2f}',
        ]
        for row in record['rows']
    ]
    header = [
        'model',
        'eager (ms)',
        'ONNX Runtime float32 (ms)',
        'int8 (ms)',
        'int8 speed-up over float32',
        'over eager',
        'mIoU eager / float32 / int8',
    ]
    return rendered(record, page, table(header, rows))


# --------------------------------------------------------------------------------------- README


def readme_results(page: Path) -> str:
    """One line per claim of the front page, each with the page that holds its table."""
    seeds = seed_summary(result('camvid_seeds', 'h200'))
    ours, peer = seeds[('configs/camvid.yaml', 'average')], seeds[("SMP's example", 'raw')]
    differences = [
        f'{model.split()[0]} {pm([arms["OL"][s] - arms["plain"][s] for s in SEEDS], sign=True)}'
        for model, arms in ablation_pairs().items()
    ]
    [hf] = result('compare_hf', 'cpu2')['rows']
    whole = [row for row in result('offseg_speed', 'cpu2')['rows'] if row['segformer_b0'] is not None]
    speedups = ', '.join(f'{row["ratio"]:.2f}x at {row["size"]}' for row in whole)
    rows = [
        [
            "CamVid from scratch: `configs/camvid.yaml` against SMP's example, val mIoU at 1800 iterations, "
            'mean ± std over 3 seeds (GPU)',
            f'{ours["iter 1800"]} against {peer["iter 1800"]}',
            link(page, 'docs/camvid.md', 'docs/camvid.md'),
        ],
        [
            'Offset Learning − plain classifier, CamVid val mIoU after 100 iterations from scratch, 3 seeds',
            '; '.join(differences),
            link(page, 'docs/offset_learning.md', 'docs/offset_learning.md'),
        ],
        [
            "Training step of `configs/camvid.yaml` against SMP's FPN-ResNet18, 8 crops of 256x256 (CPU, "
            '1 / 2 threads)',
            training_step_summary(),
            link(page, 'docs/speed.md#training', 'docs/speed.md'),
        ],
        [
            "Inference against transformers' SegFormer-B0 on the same weights (CPU, one thread, "
            + size_text(hf['size'])
            + ')',
            f'{hf["compare_hf.hf_over_ours"]:.2f}x faster; max logit difference {hf["compare_hf.max_abs_diff"]:.1e}',
            link(page, 'docs/speed.md', 'docs/speed.md'),
        ],
        [
            'OffSeg-T against itself with its speed-ups undone, the published order of operations (CPU, one thread)',
            speedups,
            link(page, 'docs/speed.md', 'docs/speed.md'),
        ],
    ]
    return table(['what', 'measured', 'details'], rows)
