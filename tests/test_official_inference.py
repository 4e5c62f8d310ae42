"""The path from a model's output to the prediction at image size, against mmseg 1.x's, written out here
as mmseg 1.2.2 runs it (the version the official OffSeg code vendors): `SegDataPreProcessor` with its
`test_cfg` padding, `EncoderDecoder.whole_inference` / `slide_inference` / `postprocess_result`,
`BaseDecodeHead.predict_by_feat`, `Mask2FormerHead.predict`, and `SegTTAModel` over mmseg's
`tta_pipeline` (mmcv's `Resize(scale_factor, keep_ratio=True)` on the loaded image, then flips).

Per family, with the published test settings of each: tiny real models whose outputs are scaled to
be sharp, as a trained model's are (flat random logits hide boundary errors), on images whose sides
are not multiples of 32 and whose aspect ratio exceeds 4, so that windows are wider than the image
and padding is not empty.
"""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_mask2former import SMALL_HEAD as SMALL_MASK2FORMER
from test_published_models import pair_model

from engine.inference import predict_scores
from models.heads.mask_classification import MaskClassification

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
TTA_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # mmseg's tta_pipeline


class Sharpened(torch.nn.Module):
    """A model whose outputs are standardised and scaled, as a trained model's are sharp: logits
    over the classes of each pixel; for mask classification, class logits over the classes of each
    query and mask logits over the pixels of each mask (near 0 or 1 except at mask borders). Each
    image's outputs depend on that image alone, as the model's do."""

    def __init__(self, model, factor: float = 8.0):
        super().__init__()
        self.model, self.factor = model.eval(), factor

    def forward(self, images):
        output = self.model(images)
        if isinstance(output, MaskClassification):
            masks = output.mask_logits
            flat = masks.flatten(2)
            masks = (masks - flat.mean(-1)[..., None, None]) / flat.std(-1)[..., None, None]
            return MaskClassification(self.standardised(output.class_logits, -1), 2 * self.factor * masks)
        return self.standardised(output, 1)

    def standardised(self, x, dim):
        return self.factor * (x - x.mean(dim, keepdim=True)) / x.std(dim, keepdim=True)


# ---- mmseg 1.2.2, transcribed ------------------------------------------------------------------------


def mmcv_scale_size(size, scale):
    w, h = size
    return int(w * float(scale) + 0.5), int(h * float(scale) + 0.5)


def mmcv_resize_by_factor(img: np.ndarray, factor: float) -> np.ndarray:
    """mmcv.transforms.Resize(scale_factor=factor, keep_ratio=True): `_scale_size` of the image, then
    `imrescale` to that scale (`rescale_size`), OpenCV bilinear."""
    h, w = img.shape[:2]
    scale = mmcv_scale_size((w, h), factor)
    scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = mmcv_scale_size((w, h), scale_factor)
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def data_preprocessor(img: np.ndarray, size_divisor):
    """SegDataPreProcessor in test mode (RGB input): normalise, then `stack_batch` pads bottom/right
    with 0 to the divisor; returns the inputs and the meta `stack_batch` adds."""
    inputs = (torch.from_numpy(img).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD
    ).view(3, 1, 1)
    meta = {'img_shape': tuple(img.shape[:2])}
    if size_divisor:
        height, width = inputs.shape[-2:]
        pad_h = (height + size_divisor - 1) // size_divisor * size_divisor - height
        pad_w = (width + size_divisor - 1) // size_divisor * size_divisor - width
        inputs = F.pad(inputs, (0, pad_w, 0, pad_h), value=0)
        meta.update(img_padding_size=(0, pad_w, 0, pad_h), pad_shape=inputs.shape[-2:])
    return inputs[None], meta


def decode_head_predict(model, inputs, meta):
    """BaseDecodeHead.predict_by_feat, or Mask2FormerHead.predict for mask classification."""
    output = model(inputs)
    if isinstance(output, MaskClassification):
        size = meta['pad_shape'] if 'pad_shape' in meta else meta['img_shape']
        mask_pred = F.interpolate(output.mask_logits, size=size, mode='bilinear', align_corners=False)
        cls_score = F.softmax(output.class_logits, dim=-1)[..., :-1]
        return torch.einsum('bqc, bqhw->bchw', cls_score, mask_pred.sigmoid())
    if isinstance(meta['img_shape'], torch.Size):  # slide inference
        size = meta['img_shape']
    elif 'pad_shape' in meta:
        size = meta['pad_shape'][:2]
    else:
        size = meta['img_shape']
    return F.interpolate(output, size=size, mode='bilinear', align_corners=False)


def slide_inference(model, inputs, meta, crop_size, stride, num_classes):
    h_stride, w_stride = stride
    h_crop, w_crop = crop_size
    batch_size, _, h_img, w_img = inputs.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = inputs[:, :, y1:y2, x1:x2]
            window_meta = {**meta, 'img_shape': crop_img.shape[2:]}
            window_meta.pop('pad_shape', None)  # Mask2Former would resize to the whole image (mmseg fails there)
            crop_seg_logit = decode_head_predict(model, crop_img, window_meta)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def mmseg_predict(model, img, ori_shape, test_cfg, size_divisor, num_classes, flip=False):
    """EncoderDecoder.predict for one image (after the test pipeline): seg_logits at `ori_shape`."""
    if flip:
        img = img[:, ::-1].copy()  # RandomFlip(prob=1.0, direction='horizontal') on the image
    inputs, meta = data_preprocessor(img, size_divisor)
    if test_cfg['mode'] == 'slide':
        seg_logits = slide_inference(model, inputs, meta, test_cfg['crop_size'], test_cfg['stride'], num_classes)
    else:
        seg_logits = decode_head_predict(model, inputs, meta)
    _, _, H, W = seg_logits.shape
    padding_left, padding_right, padding_top, padding_bottom = meta.get('img_padding_size', [0] * 4)
    seg_logits = seg_logits[:, :, padding_top : H - padding_bottom, padding_left : W - padding_right]
    if flip:
        seg_logits = seg_logits.flip(dims=(3,))
    return F.interpolate(seg_logits, size=ori_shape, mode='bilinear', align_corners=False)[0]


def mmseg_tta(model, original, test_cfg, size_divisor, num_classes, ratios=TTA_RATIOS):
    """SegTTAModel.merge_preds over the tta_pipeline's views of the loaded image."""
    logits = 0
    views = [(mmcv_resize_by_factor(original, r), flip) for r in ratios for flip in (False, True)]
    for img, flip in views:
        seg_logit = mmseg_predict(model, img, original.shape[:2], test_cfg, size_divisor, num_classes, flip)
        logits = logits + seg_logit.softmax(dim=0)
    return logits / len(views)


# ---- the comparisons ---------------------------------------------------------------------------------


def street_image(height: int, width: int) -> np.ndarray:
    """A uint8 RGB image with regions and edges (a model's outputs then have class boundaries)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:height, :width]
    image = np.stack([(x * 3) % 256, (y * 5 + x) % 256, ((x // 23 + y // 17) % 2) * 200], axis=-1)
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


def assert_same_prediction(ours: torch.Tensor, official: torch.Tensor) -> None:
    assert ours.shape == official.shape
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5 * official.abs().max().item())
    assert torch.equal(ours.argmax(0), official.argmax(0))


def ours(model, image: np.ndarray, out_size, **eval_options) -> torch.Tensor:
    images = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    return predict_scores(model, images, MEAN, STD, out_size, **eval_options)[0]


FAMILIES = {
    # name: (backbone, head, image size, eval options as the published configs of the family set them)
    'segformer (mmseg: whole, no padding)': ('mit', {'type': 'segformer', 'channels': 32}, {'size_divisor': 1}),
    'segformer+OL, OffSeg (slide 96/64, no padding)': (
        'mit',
        {'type': 'segformer', 'channels': 32, 'offset_learning': True},
        {'mode': 'slide', 'crop_size': (96, 96), 'stride': (64, 64), 'size_divisor': 1},
    ),
    'offseg (slide 64/48, no padding; 64-pixel windows on an 80x340 image: EfficientFormerV2 takes multiples of 32)': (
        'efficientformerv2',
        {'type': 'offseg', 'new_channels': [32, 32, 64, 64], 'channels': 64},
        {'mode': 'slide', 'crop_size': (64, 64), 'stride': (48, 48), 'size_divisor': 1},
    ),
    'segnext (whole, padded to 32)': (
        'mscan',
        {'type': 'ham', 'ham_channels': 32, 'channels': 32, 'nmf_seed': 0},
        {'size_divisor': 32},
    ),
    'segnext+OL Pascal Context (slide, padded to 32)': (
        'mit',
        {'type': 'segformer', 'channels': 32},
        {'mode': 'slide', 'crop_size': (96, 96), 'stride': (64, 64), 'size_divisor': 32},
    ),
    'deeplabv3+ (whole, no padding)': (
        'resnet',
        {'type': 'aspp', 'channels': 16, 'dilations': [1, 2], 'c1_channels': 8},
        {'size_divisor': 1},
    ),
    'mask2former (whole, padded to 32)': ('resnet', SMALL_MASK2FORMER, {'size_divisor': 32}),
    'mask2former+OL (whole, padded to 32)': (
        'resnet',
        {**SMALL_MASK2FORMER, 'offset_learning': True},
        {'size_divisor': 32},
    ),
}


@pytest.fixture(scope='module')
def models():
    return {}


def family_model(models: dict, name: str):
    if name not in models:
        backbone, head, _ = FAMILIES[name]
        models[name] = Sharpened(pair_model(backbone, head))
    return models[name]


@torch.no_grad()
@pytest.mark.parametrize('name', list(FAMILIES))
def test_single_scale_equals_mmseg(name, models):
    """A 75x330 test image (aspect 4.4; slide windows of 96 are taller than it), scored at a
    label size of 90x400 (the test resize undone)."""
    model, options = family_model(models, name), FAMILIES[name][2]
    image, label_size = street_image(*((80, 340) if name.startswith('offseg') else (75, 330))), (90, 400)
    test_cfg = {'mode': options.get('mode', 'whole'), **options}
    official = mmseg_predict(model, image, label_size, test_cfg, options['size_divisor'], 5)
    assert_same_prediction(ours(model, image, label_size, **options), official)
    if 'mask2former' not in name:  # sharp, as a trained model's logits are
        assert official.softmax(0).amax(0).median() > 0.8


@torch.no_grad()
@pytest.mark.parametrize(
    'name', ['segformer+OL, OffSeg (slide 96/64, no padding)', 'mask2former+OL (whole, padded to 32)']
)
def test_multi_scale_and_flip_equal_mmseg_tta(name, models):
    """mmseg's six ratios and flips of the loaded 71x301 image, each brought back to its size."""
    model, options = family_model(models, name), FAMILIES[name][2]
    image = street_image(71, 301)
    test_cfg = {'mode': options.get('mode', 'whole'), **options}
    official = mmseg_tta(model, image, test_cfg, options['size_divisor'], 5)
    result = ours(model, image, image.shape[:2], scales=TTA_RATIOS, flip=True, **options)
    assert_same_prediction(result, official)


@torch.no_grad()
def test_mask2former_combines_masks_at_image_size_not_before_resizing():
    """The mmseg order matters with sharp masks: combining at stride 4 and resizing the class map
    moves the argmax at class boundaries."""
    model = Sharpened(pair_model('resnet', {**SMALL_MASK2FORMER, 'offset_learning': True}))
    image = street_image(96, 384)
    images = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    output = model((images.float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    combined_first = torch.einsum(
        'bqk,bqhw->bkhw', output.class_logits.softmax(-1)[..., :-1], output.mask_logits.sigmoid()
    )
    resized_after = F.interpolate(combined_first, size=(96, 384), mode='bilinear', align_corners=False)[0]
    result = ours(model, image, (96, 384), size_divisor=32)
    assert (result.argmax(0) != resized_after.argmax(0)).any()
