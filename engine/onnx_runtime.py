"""An exported ONNX graph (tools/export_onnx.py) behind a Segmentor's interface, for evaluate.py.

The graph takes normalised images and returns what the PyTorch model returns (logits at the head's
stride, or mask classification's class and mask logits), so the same whole / slide / multi-scale
inference and scoring run on either, and the speed gained and the mIoU lost by a deployment (an int8
graph) are measured on the same validation set.
"""

import json

import torch
from torch import nn

from models.heads.mask_classification import MaskClassification
from models.weights import CheckpointError

MASK_OUTPUTS = list(MaskClassification._fields)
"""The graph's outputs for a mask-classification model; a per-pixel model's is `logits`."""


def output_tensors(output) -> dict:
    """A model's output as the graph's named outputs."""
    if isinstance(output, MaskClassification):
        return output._asdict()
    return {'logits': output}


def output_axes(output) -> dict:
    """The dynamic axes of each named output, for torch.onnx.export."""
    return {
        name: {0: 'batch', **({2: f'{name}_height', 3: f'{name}_width'} if tensor.dim() == 4 else {})}
        for name, tensor in output_tensors(output).items()
    }


def open_session(path, threads: int = None):
    """An ONNX Runtime CPU session of the file, with torch's thread count unless told otherwise
    (ONNX Runtime would take every core, whatever OMP_NUM_THREADS says)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    except Exception as error:  # ONNX Runtime raises its own exception types for unreadable graphs
        raise OnnxError(f'{path}: ONNX Runtime cannot load it ({str(error).strip().splitlines()[0]})') from None


class OnnxError(CheckpointError):
    """A graph that cannot be loaded or lacks what this repo's exporter writes (a bad model file, like
    a bad checkpoint: one line and exit code 2 in the scripts)."""


class OnnxSegmentor(nn.Module):
    """(B, 3, H, W) normalised images -> the model's output (logits (B, K, H/s, W/s), or
    `MaskClassification`), computed by ONNX Runtime on the CPU.

    `metadata` holds what the exporter stored beside the graph (mean, std, num_classes, class_names,
    config, checkpoint), each JSON-decoded where it is JSON.
    """

    def __init__(self, path, threads: int = None):
        super().__init__()
        self.path = str(path)
        self.session = open_session(path, threads)
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names not in ((['images'], ['logits']), (['images'], MASK_OUTPUTS)):
            raise OnnxError(f'{path}: not a graph of tools/export_onnx.py (inputs, outputs: {names})')
        self.output_names = names[1]
        self.metadata = {k: decoded(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}

    def forward(self, images: torch.Tensor):
        try:
            arrays = self.session.run(self.output_names, {'images': images.float().cpu().numpy()})
        except Exception as error:  # ONNX Runtime's own exception types
            message = str(error).strip().splitlines()[0]
            raise OnnxError(f'{self.path}: ONNX Runtime cannot run it on {tuple(images.shape)} ({message})') from None
        tensors = [torch.from_numpy(a).to(images.device) for a in arrays]
        return MaskClassification(*tensors) if self.output_names == MASK_OUTPUTS else tensors[0]


def decoded(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
