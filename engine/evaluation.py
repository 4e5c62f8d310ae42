"""Score a model on a dataset: predictions resized to each label's original size, confusion on the device."""
import torch
from tqdm import tqdm

from .inference import infer_logits, inference_options, normalize
from .metrics import ConfusionMatrix


@torch.inference_mode()
def evaluate(model, loader, num_classes: int, ignore_index: int, mean, std, eval_cfg: dict, device,
             amp_dtype=None, progress: bool = True) -> dict:
    """Run the configured inference over `loader` (batch 1: sizes differ) and return mIoU/mAcc/aAcc.

    Under torch.distributed each process scores its own share and the matrices are summed.
    """
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index, device)
    options = inference_options(eval_cfg)
    bar = tqdm(loader, desc='eval', leave=False, disable=None if progress else True, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = infer_logits(model, normalize(images, mean, std), num_classes, labels.shape[-2:], **options)
        confusion.update(logits.argmax(dim=1), labels)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute()
