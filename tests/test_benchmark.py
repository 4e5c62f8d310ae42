"""tools/benchmark.py and tools/measure.py: model sizes, GMACs against the published counts, the outputs."""

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, published_offset_learning_forward
from engine.config import ConfigError, read_config
from engine.fast import time_calls
from engine.rules import accepted_keys, load_config
from models import BACKBONES, OffsetLearning
from models.backbones.efficientformer_v2 import Attention4D, Attention4DDownsample
from tools import benchmark, measure
from train import create_model

CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
TINY = ['--size', '64', '64', '--runs', '1', '--warmup', '0']

# GMACs at 512x512, 150 classes. Full counts: SegFormer-B0 (transformers' model) and SegNeXt-T (a
# rebuild of the official code) counted with FlopCounterMode as here; OffSeg: mmengine's count of the
# official code. Paper convention: the OffSeg paper's Table 2.
FULL_GMACS = {'segformer_b0': 8.39, 'segnext_t': 6.40, 'offseg_t': 9.54, 'offseg_b': 14.88, 'offseg_l': 22.09}
PAPER_GMACS = {'offseg_t': 5.3, 'offseg_b': 10.3, 'offseg_l': 17.1}


def run(tmp_path, *argv) -> list:
    """The CLI in this process; returns what it wrote as JSON."""
    path = tmp_path / 'results.json'
    benchmark.main([*map(str, argv), '--json', str(path)])
    return json.loads(path.read_text())


def one_config_per_architecture(paths: list) -> list:
    """The config of each architecture (backbone family, head type, Offset Learning or not, auxiliary
    head) with the smallest backbone variant, first in `paths` among equals: dataset variants differ in
    the class count alone and size variants in widths and depths, so counting each of them again tests
    no new code (every config is built in test_published_models, and counted in ARCHITECTURES.md by
    tools/model_table.py)."""
    architectures = {}
    for path in paths:  # read, not checked: the benchmark checks the ones it counts
        cfg = read_config(path, ['backbone.pretrained=null'], accepted_keys)
        backbone, head, aux = cfg['backbone'], cfg['head'], cfg['aux_head'] or {}
        key = (backbone['type'], head['type'], head.get('offset_learning', False), aux.get('type'))
        variants = [str(v) for v in sys.modules[BACKBONES[backbone['type']].__module__].VARIANTS]
        size = variants.index(str(backbone.get('variant'))) if str(backbone.get('variant')) in variants else 0
        if key not in architectures or size < architectures[key][0]:
            architectures[key] = (size, path)
    return [path for _, path in architectures.values()]


def test_every_model_has_params_and_gmacs(tmp_path):
    chosen = one_config_per_architecture(CONFIGS)
    assert {'offseg_t.yaml', 'segformer_b0_ol.yaml', 'mask2former_swin_t_ol.yaml'} <= {p.name for p in chosen}
    results = run(tmp_path, '--all', *chosen, '--macs-only', '--size', '224', '224', '--csv', tmp_path / 'results.csv')
    assert [Path(r['config']).name for r in results] == [p.name for p in chosen]
    for result in results:
        assert result['params_m'] > 0.1 and result['gmacs'] > 0, result
        is_offseg = 'offseg' in result['model']
        assert (result['gmacs_paper_convention'] is not None) == is_offseg, result
        if is_offseg:  # less where it leaves out EfficientFormerV2's attention or Offset Learning's matmuls
            assert 0 < result['gmacs_paper_convention'] <= result['gmacs']
    assert len((tmp_path / 'results.csv').read_text().splitlines()) == len(chosen) + 1


def test_all_takes_folders_and_glob_patterns_in_the_order_given():
    camvid = ROOT / 'configs' / 'camvid.yaml'
    found = benchmark.config_paths([str(camvid), str(ROOT / 'configs'), str(ROOT / 'configs' / 'segformer_b*_ol.yaml')])
    assert found[0] == camvid and found[1 : len(CONFIGS) + 1] == CONFIGS
    assert [p.name for p in found[len(CONFIGS) + 1 :]] == [f'segformer_b{i}_ol.yaml' for i in range(6)]


@pytest.mark.parametrize('name', ['segformer_b0', 'offseg_t'])
def test_params_are_those_of_the_built_model(name):
    cfg = measure.random_weights_config(ROOT / 'configs' / f'{name}.yaml')
    built = sum(p.numel() for p in create_model(cfg).parameters())
    assert measure.size_figures(cfg, (64, 64))['params_m'] * 1e6 == built


@pytest.mark.parametrize('name', sorted(FULL_GMACS))
def test_gmacs_at_512_match_published_counts(name, monkeypatch):
    """Offset Learning here reassociates the published products (the same scores in fewer MACs), so
    the comparison counts it in the published order of operations."""
    cfg = measure.random_weights_config(ROOT / 'configs' / f'{name}.yaml')
    model = measure.meta_model(cfg)
    as_run = measure.module_macs(measure.image_macs(model, (512, 512)), '')
    monkeypatch.setattr(OffsetLearning, 'forward', published_offset_learning_forward)
    counts = measure.image_macs(model, (512, 512))
    assert measure.module_macs(counts, '') / 1e9 == pytest.approx(FULL_GMACS[name], rel=0.05)
    if name.startswith('offseg'):
        assert measure.module_macs(counts, '') - as_run > 1e9  # what the reassociation saves: 1.3 G
        paper = measure.paper_convention_macs(model, counts)
        assert paper / 1e9 == pytest.approx(PAPER_GMACS[name], rel=0.05)


def test_paper_convention_leaves_out_exactly_the_offset_learning_and_attention_matmuls():
    model = measure.meta_model(measure.random_weights_config(ROOT / 'configs' / 'offseg_t.yaml'))
    counts = measure.image_macs(model, (512, 512))
    omitted = [
        name for name, m in model.named_modules() if isinstance(m, (Attention4D, Attention4DDownsample, OffsetLearning))
    ]
    matmuls = sum(measure.module_macs(counts, name) - counts[name].get('aten.convolution', 0) for name in omitted)
    assert measure.module_macs(counts, 'head.classifier') > 0 and matmuls > 0
    paper = measure.paper_convention_macs(model, counts)
    assert paper == pytest.approx(measure.module_macs(counts, '') - matmuls, abs=1)
    assert paper == counts['']['aten.convolution']  # OffSeg: what is left is every convolution


def test_inference_latency_json(tmp_path):
    [result] = run(tmp_path, '--config', ROOT / 'configs' / 'segformer_b0.yaml', *TINY, '--no-fold-bn')
    expected = {
        'config',
        'model',
        'params_m',
        'gmacs',
        'gmacs_paper_convention',
        'size',
        'device',
        'mode',
        'batch',
        'threads',
        'runs',
        'warmup',
        'latency_ms_median',
        'latency_ms_p90',
        'images_per_s',
        'peak_memory_mb',
        'added_memory_mb',
    }
    assert expected <= set(result)
    assert result['mode'] == 'infer' and result['batch'] == 1 and not result['fold_bn']
    assert 0 < result['latency_ms_median'] <= result['latency_ms_p90']
    assert result['images_per_s'] == pytest.approx(1e3 / result['latency_ms_median'])


def test_results_go_to_a_table_named_by_the_machine_and_torch(tmp_path):
    """--results writes what the docs render: the rows, the command, the environment, the date."""
    argv = ['--config', ROOT / 'configs' / 'segformer_b0.yaml', *TINY, '--results', tmp_path / 'out', '--study', 'zoo']
    [result] = run(tmp_path, *argv)
    tag = f'cpu{os.cpu_count()}-torch{torch.__version__.split("+")[0]}'
    path = tmp_path / 'out' / f'zoo-{tag}.json'
    table = json.loads(path.read_text())
    row = dict(zip(table['columns'], table['rows'][0]))
    assert row['latency_ms_median'] == result['latency_ms_median'] and row['params_m'] == result['params_m']
    assert table['environment']['torch'] in tag and table['command'] == shlex.join(['python', *sys.argv])
    run(tmp_path, *argv)  # a rerun replaces its own file
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['results.txt', path.name]


def test_a_size_sweep_gives_ms_per_gmac_and_the_profile_the_top_operators(tmp_path, capsys):
    results = run(
        tmp_path,
        '--config',
        ROOT / 'configs' / 'segformer_b0.yaml',
        '--runs',
        1,
        '--warmup',
        0,
        '--sizes',
        64,
        96,
        '--profile',
    )
    assert [r['size'] for r in results] == [[64, 64], [96, 96]]
    for r in results:
        assert r['ms_per_gmac'] == pytest.approx(r['latency_ms_median'] / r['gmacs'])
        shares = [op['share'] for op in r['profile']]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert all(op['calls'] >= 1 and op['self_ms'] >= 0 for op in r['profile'])
    out = capsys.readouterr().out
    assert 'ms/GMAC' in out and '64x64' in out and '96x96' in out and 'top operators of one forward' in out


@pytest.mark.parametrize('name', ['camvid', 'mask2former_camvid'])  # per-pixel and set-prediction losses
def test_training_step_latency_and_its_phases(tmp_path, name, capsys):
    [result] = run(tmp_path, '--config', ROOT / 'configs' / f'{name}.yaml', *TINY, '--mode', 'train', '--profile')
    assert result['mode'] == 'train' and result['batch'] == 2 and result['latency_ms_median'] > 0
    averaged = load_config(ROOT / 'configs' / f'{name}.yaml')['train']['ema_decay']
    phases = ['forward', 'loss', 'backward', 'optimizer'] + ['moving average'] * bool(averaged)
    assert list(result['phases_ms']) == phases
    assert all(ms > 0 for ms in result['phases_ms'].values())
    out = capsys.readouterr().out
    assert 'a training step by phase' in out and 'top operators of one training step' in out


@pytest.mark.parametrize(
    'name, offset_learning', [('offseg_t', 'head.classifier'), ('mask2former_camvid', 'head.offset_learning')]
)
def test_breakdown_reports_offset_learning_and_head_shares(tmp_path, name, offset_learning):
    [result] = run(tmp_path, '--config', ROOT / 'configs' / f'{name}.yaml', *TINY, '--no-fold-bn', '--breakdown')
    parts = result['breakdown']
    label = f'offset learning ({offset_learning})'
    assert set(parts) == {'backbone', 'head', label}
    assert parts['backbone']['mac_share'] + parts['head']['mac_share'] == pytest.approx(1)
    assert 0 < parts[label]['mac_share'] < parts['head']['mac_share']
    assert all(part['latency_share'] > 0 for part in parts.values())


def test_compare_hf_gives_equal_logits(tmp_path):
    [result] = run(
        tmp_path,
        '--config',
        ROOT / 'configs' / 'segformer_b0.yaml',
        '--set',
        'head.type=segformer_mlp',
        *TINY,
        '--compare',
        'hf',
    )
    assert result['compare_hf']['max_abs_diff'] < 1e-4
    assert result['compare_hf']['hf_over_ours'] > 0


def test_compare_hf_needs_the_official_head(tmp_path):
    with pytest.raises(ConfigError, match='head.type=segformer_mlp'):
        run(tmp_path, '--config', ROOT / 'configs' / 'segformer_b0.yaml', *TINY, '--compare', 'hf')


def test_fast_paths(tmp_path):
    pytest.importorskip('engine.fast', reason='engine/fast.py not available')
    [result] = run(tmp_path, '--config', ROOT / 'configs' / 'segformer_b0.yaml', *TINY, '--channels-last')
    assert result['fold_bn'] and result['channels_last'] and result['latency_ms_median'] > 0


def test_onnx_beside_eager(tmp_path):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('tools.export_onnx', reason='tools/export_onnx.py not available')
    [result] = run(tmp_path, '--config', ROOT / 'configs' / 'segformer_b0.yaml', *TINY, '--no-fold-bn', '--onnx')
    assert result['onnx']['max_abs_diff'] < 1e-4 and result['onnx']['onnxruntime_ms'] > 0


def test_unknown_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match='not found'):
        run(tmp_path, '--config', tmp_path / 'missing.yaml', '--macs-only')
    with pytest.raises(ConfigError, match='no config files'):
        run(tmp_path, '--all', tmp_path / 'none_*.yaml', '--macs-only')


@pytest.mark.parametrize(
    'argv',
    [
        ['--mode', 'train', '--breakdown'],
        ['--macs-only', '--onnx'],
        ['--compare', 'hf', '--channels-last'],
        ['--breakdown', '--compile'],
    ],
)
def test_options_that_cannot_be_measured_together(tmp_path, argv):
    with pytest.raises(SystemExit) as error:
        benchmark.parse_args(['--config', str(ROOT / 'configs' / 'segformer_b0.yaml'), *argv])
    assert error.value.code == 2


def test_cuda_timing_synchronises(monkeypatch):
    """Each timed call is bracketed by torch.cuda.synchronize, so queued kernels are inside the time."""
    events = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda: events.append('sync'))
    time_calls({'call': lambda: events.append('call')}, runs=1, warmup=0, device=torch.device('cuda'))
    assert events == ['sync', 'call', 'sync']
