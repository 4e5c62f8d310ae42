"""Whole, sliding-window and multi-scale + flip inference on tiny models whose outputs are known by hand
(tests/test_official_inference.py compares the whole path with mmseg's)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datasets.transforms import scale_image
from engine.inference import predict_scores, single_view, slide, whole

IDENTITY = dict(mean=[0, 0, 0], std=[1, 1, 1])
"""Normalisation that leaves uint8 values as they are, so a test can reason about the model's input."""


def pointwise_model(classes: int = 3, channels: int = 3) -> nn.Module:
    """A 1x1 convolution: each output pixel depends on its input pixel only, so any window agrees with
    the whole image wherever it covers it."""
    torch.manual_seed(0)
    return nn.Conv2d(channels, classes, 1).eval()


def contextual_model(classes: int = 3) -> nn.Module:
    """A strided 3x3 convolution and a global term: every output depends on the whole input."""

    class Contextual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, classes, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x) + x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)

    torch.manual_seed(0)
    return Contextual().eval()


class WindowMean(nn.Module):
    """One value per window, the mean of its input, for every class (a 1x1 map resized to the window)."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 2, 1, 1)


class Recorder(nn.Module):
    """Records the input sizes it is called with and returns the first channel, once per class."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.sizes, self.classes = [], classes

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return torch.cat([x[:, :1] * (k + 1) for k in range(self.classes)], dim=1)


def uint8_images(*shape) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_slide_equals_whole_when_one_window_covers_the_image():
    model, images = contextual_model(), torch.randn(2, 3, 32, 48)
    assert torch.allclose(slide(model, images, (32, 48), (16, 16)), whole(model, images), atol=1e-6)
    # A smaller image is one window of its own size, unpadded (mmseg's slide_inference).
    small = images[..., :20, :30]
    model = Recorder()
    assert torch.allclose(slide(model, small, (32, 32), (16, 16)), whole(model, small), atol=1e-6)
    assert model.sizes == [(20, 30), (20, 30)]


@torch.no_grad()
@pytest.mark.parametrize('window_batch', [1, 8])
def test_slide_equals_whole_for_a_pointwise_model_with_overlapping_windows(window_batch):
    model, images = pointwise_model(), torch.randn(2, 3, 37, 50)
    result = slide(model, images, (16, 24), (10, 11), window_batch=window_batch)
    assert torch.allclose(result, whole(model, images), atol=1e-6)


@torch.no_grad()
def test_slide_averages_overlapping_windows():
    # Input value 10 y + x on a 6x10 image; 4x4 windows every 2 rows and 3 columns (mmseg's grid, the last
    # window flush with the border): rows [0,4) and [2,6), columns [0,4), [3,7) and [6,10). A window's
    # mean is 10 * (mean of its rows) + (mean of its columns): row means 1.5, 3.5; column means 1.5,
    # 4.5, 7.5. Each pixel averages the windows covering it, which is the per-row average of the row
    # means plus the per-column average of the column means.
    y, x = torch.meshgrid(torch.arange(6.0), torch.arange(10.0), indexing='ij')
    images = (10 * y + x).view(1, 1, 6, 10)
    result = slide(WindowMean(), images, (4, 4), (2, 3))
    rows = torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5])  # [0,4) / both / [2,6)
    cols = torch.tensor([1.5, 1.5, 1.5, 3.0, 4.5, 4.5, 6.0, 7.5, 7.5, 7.5])  # ... (1.5 + 4.5) / 2 at x = 3 ...
    expected = 10 * rows.view(6, 1) + cols.view(1, 10)
    assert result.shape == (1, 2, 6, 10)
    assert torch.allclose(result[0, 0], expected) and torch.allclose(result[0, 1], expected)


@torch.no_grad()
@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_the_input_is_padded_to_the_size_divisor_and_the_scores_cropped_back(mode):
    model, images = Recorder(), torch.randn(1, 3, 20, 50)
    scores = single_view(model, images, mode, crop_size=(16, 16), stride=(16, 16), size_divisor=32)
    # slide: the 32x64 padded input is 2x4 windows of 16x16, run as one batch
    assert model.sizes == [(32, 64) if mode == 'whole' else (16, 16)] and scores.shape == (1, 2, 20, 50)
    assert torch.equal(scores[:, 1], 2 * images[:, 0])


@torch.no_grad()
def test_flip_averages_probabilities_with_the_flipped_branch_flipped_back():
    # A horizontal 1x3 kernel with unequal taps is not flip-equivariant, and the input is asymmetric.
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, (1, 3), padding=(0, 1)).eval()
    images = (uint8_images(1, 3, 8, 12) // 2 + torch.arange(0, 120, 10, dtype=torch.uint8)).float()
    direct = model(images).softmax(dim=1)
    flipped_back = model(images.flip(-1)).flip(-1).softmax(dim=1)
    assert not torch.allclose(direct, flipped_back, atol=1e-3)
    result = predict_scores(model, images.to(torch.uint8), flip=True, **IDENTITY)
    assert torch.allclose(result, (direct + flipped_back) / 2, atol=1e-6)
    assert not torch.allclose(result, (direct + model(images.flip(-1)).softmax(dim=1)) / 2, atol=1e-3)


@torch.no_grad()
def test_multi_scale_scales_the_loaded_image_and_averages_probabilities_at_the_output_size():
    model, images = pointwise_model(), uint8_images(1, 3, 20, 30)

    def probs_at(scale):
        scaled = scale_image(images[0].permute(1, 2, 0).numpy(), scale)
        logits = model(torch.from_numpy(scaled).permute(2, 0, 1)[None].float())
        return F.interpolate(logits, size=(20, 30), mode='bilinear', align_corners=False).softmax(dim=1)

    result = predict_scores(model, images, scales=(0.5, 1.0, 1.75), **IDENTITY)
    assert torch.allclose(result, (probs_at(0.5) + probs_at(1.0) + probs_at(1.75)) / 3, atol=1e-6)


@torch.no_grad()
def test_scaled_sizes_round_like_mmcv():
    model = Recorder()
    predict_scores(model, uint8_images(1, 3, 5, 7), scales=(0.5, 1.5), **IDENTITY)
    assert model.sizes == [(3, 4), (8, 11)]  # 2.5 -> 3, 3.5 -> 4, 7.5 -> 8, 10.5 -> 11
    # mmcv rescales to the rounded target keeping the aspect ratio, and rounds again: 0.3 of 41x17
    # targets 12x5, which keeps the ratio at 12/41 (5/17 would not): 12 x round(17*12/41) = 12x5.
    assert scale_image(np.zeros((41, 17, 3), np.uint8), 0.3).shape[:2] == (12, 5)


@torch.no_grad()
@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_logits_are_resized_to_the_output_size(mode):
    model, images = pointwise_model(), uint8_images(1, 3, 24, 32)
    result = predict_scores(model, images, out_size=(50, 70), mode=mode, crop_size=(16, 16), stride=(8, 8), **IDENTITY)
    expected = F.interpolate(model(images.float()), size=(50, 70), mode='bilinear', align_corners=False)
    assert result.shape == (1, 3, 50, 70) and torch.allclose(result, expected, atol=1e-6)


@torch.no_grad()
def test_slide_with_scales_and_flip_combines_all_branches():
    # A pointwise model: slide equals whole, so the slide TTA equals the whole-image TTA.
    model, images = pointwise_model(), uint8_images(1, 3, 24, 40)
    options = dict(out_size=(30, 50), scales=(0.75, 1.25), flip=True, **IDENTITY)
    slid = predict_scores(model, images, mode='slide', crop_size=(16, 16), stride=(12, 12), **options)
    assert torch.allclose(slid, predict_scores(model, images, **options), atol=1e-6)
