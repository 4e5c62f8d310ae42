"""Score a model on a dataset: predictions resized to each label's original size, confusion on the device."""

import torch
from tqdm import tqdm

from .inference import inference_options, predict_scores
from .metrics import ConfusionMatrix


@torch.inference_mode()
def evaluate(model, loader, cfg: dict, device, amp_dtype=None, progress: bool = True, on_sample=None) -> dict:
    """Run the inference of the config's `eval` section (engine/inference.py) over `loader` (batch 1:
    sizes differ; `build_dataset`'s val set, which gives the loaded images under test-time
    augmentation), with its `data` section's classes, ignore index and normalisation, and return
    the scores of `eval.metrics` (mIoU always), their per-class values and the summed `confusion`
    matrix (num_classes, num_classes) on the CPU.

    Under torch.distributed each process scores its own share and the matrices are summed.
    `on_sample(position, image, label, prediction)`, if given, sees each image of this process's
    loader as it is scored: the (3, h, w) uint8 image as fed to the model, and the label and the
    prediction (H, W) at the label's size, on the device (for pictures: engine/visualize.py).
    """
    was_training = model.training
    model.eval()
    data = cfg['data']
    confusion = ConfusionMatrix(data['num_classes'], data['ignore_index'], device)
    options = inference_options(cfg['eval'])
    batches = tqdm(loader, desc='eval', leave=False, disable=None if progress else True, dynamic_ncols=True)
    for position, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores = predict_scores(model, images, data['mean'], data['std'], labels.shape[-2:], **options)
        predictions = scores.argmax(dim=1)
        confusion.update(predictions, labels)
        if on_sample:
            on_sample(position, images[0], labels[0], predictions[0])
    confusion.all_reduce()
    model.train(was_training)
    return {**confusion.compute(cfg['eval']['metrics']), 'confusion': confusion.matrix.cpu()}
