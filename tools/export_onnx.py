"""Export a checkpoint to ONNX with dynamic batch, height and width; optionally check it with ONNX Runtime.

    python tools/export_onnx.py --checkpoint work_dirs/demo/best.pth --output model.onnx
                                [--size 512 512] [--opset 17] [--check] [--config CFG] [--set KEY=VALUE ...]
    python tools/export_onnx.py --checkpoint work_dirs/camvid/best_ema.pth --output model_int8.onnx
                                --int8 --calibration ../shared/data/camvid/images/train [--calibration-images 32]
    python evaluate.py --onnx model_int8.onnx          # its mIoU on the config's val set, as for a checkpoint

The model is built as evaluate.py builds it (the checkpoint's stored config, or --config), put in
eval mode and its conv+BN pairs folded (engine/fast.py). The graph:

- input `images`: float32 (B, C, H, W), RGB (C = 3, or `data.in_channels` bands), already normalised
  with the config's data.mean and data.std (0-255 scale, stored in the file's metadata as `mean`
  and `std`). Normalisation is left out so that the graph is the same function as the PyTorch model
  (Segmentor) and the exported model is timed and checked against it as is.
- output `logits`: float32 (B, K, H/s, W/s) at the head's stride s, not resized and not argmax'ed:
  s = 4 for the OffSeg, DeepLabV3+ and SegFormer heads; 8 for LightHam (SegNeXt), the two fast
  SegFormer heads and SegFormer with Offset Learning; the backbone's output stride for DeepLabV3
  (each head's docstring says; for sides that are not multiples of s the backbone's rounding
  decides). Mask2Former's graph has two outputs instead, `class_logits` (B, Q, K+1) and
  `mask_logits` (B, Q, H/4, W/4). Class ids come from them as evaluate.py and infer.py take them
  (engine/inference.py: whole / slide, resized to (H, W), argmax over K).

Any size the PyTorch model accepts works; --size only sets the tracing example (OffSeg needs sides
that are multiples of 32). LightHam's NMF starts from random bases (see models/heads/ham.py): in the
graph they are one fixed (1, C, R) draw from the head's `nmf_seed` (0 where unset), shared by every
image of a batch, so the ONNX model is deterministic and at batch 1 equals PyTorch eval with
`head.nmf_seed` set. The exporter is PyTorch's TorchScript-based one (`dynamo=False`): it needs only
the `onnx` package, and exports these models in seconds. --check runs ONNX Runtime (`onnxruntime`)
at the export size and at a second size, on batches of two images, against the PyTorch model and prints
the max abs differences.
The file's metadata also holds the resolved config, so `evaluate.py --onnx FILE` needs nothing else.

--int8: ONNX Runtime static quantization of the float graph (QDQ format; Conv nodes with int8
weights, per output channel, and uint8 activations; everything else stays float: ONNX Runtime's
quantized MatMul cannot run the per-channel products of attention and Offset Learning). Activation
ranges are calibrated (min-max) on the first --calibration-images images of the --calibration folder
(sorted by name), fed exactly as evaluation feeds the model: the config's val pipeline and
normalisation, then the eval mode's padding, windows, scales and flips, recorded at the model's
input. A few dozen images of the training set are the usual choice; the validation set then scores it.
"""

import contextlib
import copy
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.base import IMAGE_SUFFIXES, DatasetError, read_input  # noqa: E402
from datasets.transforms import Pipeline  # noqa: E402
from engine.cli import ArgumentParser, number, run_cli  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.fast import prepare_for_inference  # noqa: E402
from engine.inference import eval_pipeline, inference_options, predict_scores  # noqa: E402
from engine.onnx_runtime import output_axes, output_tensors  # noqa: E402
from engine.outputs import OutputError, write_failure  # noqa: E402
from models.heads.ham import Hamburger  # noqa: E402
from train import load_trained  # noqa: E402

DEFAULT_OPSET = 17
DEFAULT_CALIBRATION_IMAGES = 32
EXPORTER_NOTICES = (
    'You are using the legacy TorchScript-based ONNX export|The feature will be removed|Constant folding - Only steps=1'
)
"""Notices of the exporter itself (deprecation, a skipped optimisation) that say nothing about the model."""


def fix_nmf_bases(model: torch.nn.Module) -> None:
    """Give every LightHam NMF of `model` fixed initial bases: the first image's share of its eval
    draw with `nmf_seed` (0 where unset), expanded over the batch. In place, for export copies only."""
    for hamburger in (m for m in model.modules() if isinstance(m, Hamburger)):
        nmf, channels = hamburger.ham, hamburger.ham_in.conv.out_channels
        generator = torch.Generator().manual_seed(0 if nmf.seed is None else nmf.seed)
        bases = F.normalize(torch.rand((1, channels, nmf.rank), generator=generator), dim=1)
        nmf.initial_bases = lambda batch, channels, device, bases=bases: bases.to(device).expand(batch, -1, -1)


def export(
    model: torch.nn.Module,
    path,
    size=(512, 512),
    opset: int = DEFAULT_OPSET,
    fold_bn: bool = True,
    metadata: dict = None,
) -> Path:
    """Write `model` (a Segmentor; left unchanged) as ONNX to `path`, traced on CPU at (1, C, *size),
    with dynamic batch, height and width; `metadata` goes into the file (values that are not strings
    as JSON). Returns the path."""
    path = Path(path)
    refuse_fixed_size_pooling(model)
    exported = prepare_for_inference(model, fold_bn=fold_bn).cpu()
    fix_nmf_bases(exported)
    example = torch.randn(1, model.in_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        axes = output_axes(exported(example))
    with warnings.catch_warnings():
        # the models' input-size checks are Python conditions on shapes: traced as constants, as intended
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message=EXPORTER_NOTICES)
        torch.onnx.export(
            exported,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=['images'],
            output_names=list(axes),
            dynamic_axes={'images': {0: 'batch', 2: 'height', 3: 'width'}, **axes},
        )
    write_metadata(path, metadata or {})
    return path


def refuse_fixed_size_pooling(model: torch.nn.Module) -> None:
    """Adaptive pooling to more than one bin (UPerNet's pyramid pooling) has no ONNX form for inputs of
    any size in the TorchScript exporter: say so before exporting, not with its traceback."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            raise ConfigError(
                f"'{name}' pools to {module.output_size} bins, which ONNX cannot express for inputs of any "
                'size; this model (e.g. UPerNet with head.pool_scales beyond [1]) cannot be exported'
            )


def write_metadata(path: Path, metadata: dict) -> None:
    """Add `metadata` to the graph at `path` (values that are not strings as JSON), check it, save it."""
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def calibration_inputs(model: torch.nn.Module, cfg: dict, folder, count: int) -> tuple:
    """(the arrays `model` receives when evaluation runs it on the first `count` images of `folder`,
    how many images that was)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise DatasetError(f'--calibration {folder}: no image files ({", ".join(IMAGE_SUFFIXES)}) in that folder')
    data = cfg['data']
    pipeline = Pipeline(eval_pipeline(cfg), data['ignore_index'], data['mean'])
    recorded = []

    def record(images: torch.Tensor) -> torch.Tensor:
        recorded.append(images.numpy())
        return model(images)

    with torch.inference_mode():
        for path in files[:count]:
            image, _ = pipeline(read_input(path, data['in_channels']), None, np.random.default_rng(0))
            images = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
            predict_scores(record, images, data['mean'], data['std'], **inference_options(cfg['eval']))
    return recorded, len(files[:count])


@contextlib.contextmanager
def quiet_root_logger():
    """Only warnings and errors from the root logger inside."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(float_path: Path, int8_path: Path, inputs: list) -> Path:
    """ONNX Runtime static quantization (see the module docstring), calibrated on `inputs`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Inputs(CalibrationDataReader):
        def __init__(self):
            self.arrays = iter(inputs)

        def get_next(self):
            array = next(self.arrays, None)
            return None if array is None else {'images': array}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / 'prepared.onnx'
        # ONNX shape inference and graph optimisation; ONNX Runtime's symbolic shape inference gives up
        # on graphs whose sizes are all dynamic (OffSeg's), and static quantization does not need it
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        with quiet_root_logger():  # the quantizer reports each step through logging.info
            quantize_static(
                str(prepared),
                str(int8_path),
                Inputs(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=['Conv'],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    return int8_path


def check(path, model: torch.nn.Module, sizes, batch: int = 1) -> list:
    """Max abs difference between ONNX Runtime (CPU) and `model` in eval mode (a copy, unfolded, with
    the NMF bases the export fixes) on random normalised images of each (H, W) in `sizes`; one float
    per size. With `head.nmf_seed` set and batch 1, the copy computes what `model.eval()` does."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    model = copy.deepcopy(model).eval()
    fix_nmf_bases(model)
    generator = torch.Generator().manual_seed(1)
    differences = []
    for height, width in sizes:
        images = torch.randn(batch, model.in_channels, height, width, generator=generator)
        with torch.no_grad():
            expected = output_tensors(model(images.to(next(model.parameters()).device)))
        actual = session.run(list(expected), {'images': images.numpy()})
        difference = 0.0
        for (name, reference), result in zip(expected.items(), actual):
            if tuple(result.shape) != tuple(reference.shape):
                raise AssertionError(
                    f'{path}: ONNX {name} of shape {result.shape} at {height}x{width}, PyTorch {tuple(reference.shape)}'
                )
            difference = max(difference, (torch.from_numpy(result) - reference.float().cpu()).abs().max().item())
        differences.append(difference)
    return differences


def check_output(path: Path, checkpoint) -> None:
    """--output may be a new file, or an earlier graph of this exporter (replaced); never the checkpoint
    or another file, which would be lost."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot write '{path}': {write_failure(error, path.parent)}") from None
    if not path.exists():
        return
    if path.is_dir() or os.path.samefile(path, checkpoint) or 'config' not in graph_metadata(path):
        raise OutputError(
            f"--output '{path}' is already there and is not a graph of tools/export_onnx.py (it would be "
            'lost); choose another file name'
        )


def graph_metadata(path: Path) -> dict:
    """The metadata keys of an ONNX file; empty for a file that is not one."""
    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # any file can be handed in: protobuf raises its own decode errors
        return {}


def describe_outputs(path) -> str:
    """The graph's outputs with their shapes, e.g. 'logits (batch, 150, logits_height, logits_width)'."""

    def shape(output) -> str:
        return ', '.join(d.dim_param or str(d.dim_value) for d in output.type.tensor_type.shape.dim)

    return ' and '.join(f'{o.name} ({shape(o)})' for o in onnx.load(str(path)).graph.output)


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--output', required=True, help='the .onnx file to write')
    parser.add_argument(
        '--size',
        nargs=2,
        type=number(int, 32),
        default=[512, 512],
        metavar=('H', 'W'),
        help='tracing example size (default 512 512); the graph takes any size the model does',
    )
    parser.add_argument(
        '--opset', type=number(int, 7), default=DEFAULT_OPSET, help=f'ONNX opset (default {DEFAULT_OPSET})'
    )
    parser.add_argument(
        '--check',
        action='store_true',
        help='compare ONNX Runtime with PyTorch on two images at --size and at (H+32, W+64) (a ViT: its size multiple)',
    )
    parser.add_argument('--int8', action='store_true', help='write a statically quantised graph (needs --calibration)')
    parser.add_argument('--calibration', metavar='DIR', help='folder of images to calibrate the int8 activations on')
    parser.add_argument(
        '--calibration-images',
        type=number(int, 1),
        default=DEFAULT_CALIBRATION_IMAGES,
        metavar='N',
        help=f'how many of them, the first by name (default {DEFAULT_CALIBRATION_IMAGES})',
    )
    parser.add_argument('--config', help="YAML to use instead of the checkpoint's stored config")
    parser.add_overrides()
    args = parser.parse_args(argv)
    if args.int8 != bool(args.calibration):
        parser.error('--int8 and --calibration DIR go together')
    if args.int8 and args.check:
        parser.error('--check compares a float graph with PyTorch; score the int8 one with evaluate.py --onnx')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    model, cfg = load_trained(args.checkpoint, args.config, args.set)
    data = cfg['data']
    metadata = {
        'mean': data['mean'],
        'std': data['std'],
        'num_classes': data['num_classes'],
        'class_names': data['class_names'],
        'checkpoint': args.checkpoint,
        'config': cfg,
    }
    path = Path(args.output)
    check_output(path, args.checkpoint)
    if args.int8:
        inputs, images = calibration_inputs(model, cfg, args.calibration, args.calibration_images)
        metadata['int8_calibration'] = {'folder': args.calibration, 'images': images}
    # Built beside the target and renamed into place: a failure leaves nothing, or the earlier graph.
    with tempfile.TemporaryDirectory(prefix=f'.{path.name}.', dir=path.parent) as tmp:
        graph = export(model, Path(tmp) / 'float.onnx', tuple(args.size), args.opset)
        if args.int8:
            graph = quantize_int8(graph, Path(tmp) / 'int8.onnx', inputs)
        write_metadata(graph, metadata)
        try:
            os.replace(graph, path)
        except OSError as error:
            raise OutputError(f"cannot write '{path}': {write_failure(error, path.parent)}") from None
    inputs_shape = f'images (B, {model.in_channels}, H, W) normalised'
    print(f'{path} written{" (int8)" if args.int8 else ""}: {inputs_shape} -> {describe_outputs(path)}')
    if args.check:
        height, width = args.size
        step = getattr(model.backbone, 'size_multiple', 32)  # a ViT's patch grid takes multiples of it only
        sizes = [(height, width), (height + step, width + 2 * step)]
        for (h, w), difference in zip(sizes, check(path, model, sizes, batch=2)):  # two images: batch is dynamic
            print(f'ONNX Runtime vs PyTorch at {h}x{w}, batch 2: max abs diff {difference:.2e}')


if __name__ == '__main__':
    run_cli(main)
