"""An exported ONNX graph (tools/export_onnx.py) behind a Segmentor's interface, for evaluate.py.

The graph takes normalised images and returns logits at the head's stride, as the PyTorch model does,
so the same whole / slide / multi-scale inference and scoring run on either, and the speed gained and
the mIoU lost by a deployment (an int8 graph) are measured on the same validation set.
"""

import json

import torch
from torch import nn

from models.weights import CheckpointError


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
    """(B, 3, H, W) normalised images -> (B, K, H/s, W/s) logits, computed by ONNX Runtime on the CPU.

    `metadata` holds what the exporter stored beside the graph (mean, std, num_classes, class_names,
    config, checkpoint), each JSON-decoded where it is JSON.
    """

    def __init__(self, path, threads: int = None):
        super().__init__()
        self.path = str(path)
        self.session = open_session(path, threads)
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (['images'], ['logits']):
            raise OnnxError(f'{path}: not a graph of tools/export_onnx.py (inputs, outputs: {names})')
        self.metadata = {k: decoded(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        try:
            (logits,) = self.session.run(['logits'], {'images': images.float().cpu().numpy()})
        except Exception as error:  # ONNX Runtime's own exception types
            message = str(error).strip().splitlines()[0]
            raise OnnxError(f'{self.path}: ONNX Runtime cannot run it on {tuple(images.shape)} ({message})') from None
        return torch.from_numpy(logits).to(images.device)


def decoded(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
