"""tools/export_onnx.py: a checkpoint of every model family exports to ONNX, and ONNX Runtime gives
PyTorch's logits (max abs diff < 1e-4) at two input sizes and batch 2: height, width and batch are
dynamic. Skips where onnx or onnxruntime is not installed."""

import re

import pytest
import torch

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

from test_fast import FAMILIES, tiny_config, tiny_model  # noqa: E402

from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from tools import export_onnx  # noqa: E402
from train import create_model  # noqa: E402


@pytest.mark.parametrize('family', list(FAMILIES))
def test_onnx_runtime_matches_pytorch_at_two_sizes(family, tmp_path, capsys):
    import onnx

    path = tmp_path / 'tiny.pth'
    model = tiny_model(family)
    save_checkpoint({'model': model.state_dict(), 'config': tiny_config(family)}, path)
    output = tmp_path / 'tiny.onnx'
    step = getattr(model.backbone, 'size_multiple', 32)  # DINOv2: 28, so 56x56 and 84x112
    side, sizes = 2 * step, [(2 * step, 2 * step), (3 * step, 4 * step)]
    export_onnx.main(['--checkpoint', str(path), '--output', str(output), '--size', str(side), str(side), '--check'])
    printed = capsys.readouterr().out
    differences = [re.search(rf'at {h}x{w}, batch 2: max abs diff (\S+)', printed)[1] for h, w in sizes]
    assert max(map(float, differences)) < 1e-4, differences
    graph = onnx.load(str(output))
    assert [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim] == ['batch', '', 'height', 'width']
    assert {p.key for p in graph.metadata_props} >= {'mean', 'std', 'num_classes'}


def test_lightham_export_at_batch_1_is_pytorch_eval_with_nmf_seed(tmp_path):
    """The graph's fixed NMF bases are the first image's share of the seeded eval draw."""
    import onnxruntime

    model = tiny_model('mscan_lightham')
    output = export_onnx.export(model, tmp_path / 'ham.onnx', size=(64, 64))
    images = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected = model(images)
    session = onnxruntime.InferenceSession(str(output), providers=['CPUExecutionProvider'])
    (actual,) = session.run(['logits'], {'images': images.numpy()})
    assert (torch.from_numpy(actual) - expected).abs().max().item() < 1e-4
    assert 'initial_bases' not in vars(model.head.hamburger.ham)  # the export patched a copy


def test_a_mask2former_graph_predicts_as_pytorch_through_the_shared_inference(tmp_path):
    """Its two outputs come back as `MaskClassification` from OnnxSegmentor (evaluate.py --onnx), so
    the mask logits are resized before they are combined, as for the PyTorch model."""
    from engine.inference import predict_scores
    from engine.onnx_runtime import OnnxSegmentor

    model = tiny_model('resnet_mask2former_ol')
    path = export_onnx.export(model, tmp_path / 'm2f.onnx', size=(64, 64))
    graph = OnnxSegmentor(path)
    assert graph.output_names == ['class_logits', 'mask_logits']
    images = torch.randint(0, 256, (1, 3, 70, 150), dtype=torch.uint8)
    options = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], out_size=(90, 200), size_divisor=32)
    with torch.no_grad():
        expected = predict_scores(model.eval(), images, **options)
    actual = predict_scores(graph, images, **options)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def test_a_model_onnx_cannot_express_for_any_size_is_refused_before_exporting(tmp_path):
    cfg = tiny_config('resnet_deeplabv3plus')
    cfg['head'] = {'type': 'upernet', 'channels': 16, 'pool_scales': [1, 2]}
    with pytest.raises(ConfigError, match=r"'head\.psp_modules\.1\.0' pools to 2 bins"):
        export_onnx.export(create_model(cfg).eval(), tmp_path / 'upernet.onnx', size=(64, 64))
    assert not (tmp_path / 'upernet.onnx').exists()
