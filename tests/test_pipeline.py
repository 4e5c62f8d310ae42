"""The augmentation pipeline: image and label stay aligned through every geometric step, each step
follows mmseg's semantics, and randomness depends on (seed, draw) alone, not on loader workers."""

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import SegmentationDataset
from datasets.sampler import TrainSampler
from datasets.transforms import (
    IMAGENET_MEAN,
    Albumentations,
    Pad,
    PhotoMetricDistortion,
    Pipeline,
    RandomChoiceResize,
    RandomCrop,
    RandomResize,
    rescale_size,
)

COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]], np.uint8)
GEOMETRIC = [
    {'type': 'random_resize', 'scale': [120, 60], 'ratio_range': [0.5, 2.0]},
    {'type': 'random_crop', 'size': [48, 48], 'cat_max_ratio': 0.75},
    {'type': 'random_flip', 'prob': 0.5},
    {'type': 'pad', 'size': [48, 48]},
]


def blobs(seed: int, shape=(45, 80)) -> np.ndarray:
    """A label of random rectangles of classes 1-4 on class 0."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for kind in rng.integers(1, 5, size=6):
        top, left = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        label[top : top + rng.integers(6, 20), left : left + rng.integers(6, 30)] = kind
    return label


def interior(label: np.ndarray) -> np.ndarray:
    """Pixels at least two pixels from every edge between regions (5x5 neighbourhood of one value):
    upscaled up to 3x, bilinear blends the colours over up to 1.5 pixels on each side of an edge.
    Pixels near the array's border count as near an edge: a crop may have cut one off there."""
    kernel = np.ones((5, 5), np.uint8)
    low = cv2.erode(label, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return low == cv2.dilate(label, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=255)


@pytest.mark.parametrize('seed', range(25))
def test_resize_crop_flip_pad_keep_a_label_drawn_from_the_image_aligned(seed):
    """The image is the label painted in class colours: after the geometric steps every pixel away
    from region edges still shows its label's colour, and padding is ignore with the mean colour."""
    label = blobs(seed)
    image = COLOURS[label]
    out_image, out_label = Pipeline(GEOMETRIC)(image, label, np.random.default_rng(seed))
    assert out_image.shape == (48, 48, 3) and out_label.shape == (48, 48) and out_image.dtype == np.uint8
    padded = out_label == 255
    assert (out_image[padded] == np.round(IMAGENET_MEAN).astype(np.uint8)).all()
    check = interior(out_label) & ~padded
    assert check.sum() > 100
    error = np.abs(out_image[check].astype(int) - COLOURS[out_label[check]].astype(int))
    assert error.max() <= 1, f'{(error > 1).any(axis=1).sum()} interior pixels off their label colour'
    assert set(np.unique(out_label[~padded])) <= set(np.unique(label))


def test_a_flip_mirrors_image_and_label_together():
    label = blobs(0)
    image = COLOURS[label]
    flipped_image, flipped_label = Pipeline([{'type': 'random_flip', 'prob': 1.0}])(
        image, label, np.random.default_rng(0)
    )
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])


def test_random_resize_follows_mmseg_target_scale_and_keep_ratio():
    """ADE20K: scale (2048, 512) x r, truncated to integers, then fit within both bounds."""
    image, label = np.zeros((512, 683, 3), np.uint8), np.zeros((512, 683), np.uint8)
    for seed in range(10):
        ratio = np.random.default_rng(seed).uniform(0.5, 2.0)
        out_image, out_label = RandomResize([2048, 512])(image, label, np.random.default_rng(seed))
        long, short = int(2048 * ratio), int(512 * ratio)
        factor = min(long / 683, short / 512)
        assert out_image.shape[:2] == out_label.shape == (int(512 * factor + 0.5), int(683 * factor + 0.5))
    assert rescale_size(360, 480, [2048, 512]) == (512, 683)  # CamVid at the ADE scale: short side 512


def test_random_choice_resize_sets_the_short_edge_within_the_long_edge_limit():
    """Mask2Former's ADE20K recipe: short edge one of the listed sizes, long edge at most max_size."""
    image, label = np.zeros((512, 683, 3), np.uint8), np.zeros((512, 683), np.uint8)
    sizes = {
        RandomChoiceResize([256, 1024])(image, label, np.random.default_rng(seed))[0].shape[:2] for seed in range(20)
    }
    assert sizes == {(256, 342), (1024, 1366)}  # 683 / 2 = 341.5, rounded half up
    tall = np.zeros((100, 1000, 3), np.uint8)
    out_image, out_label = RandomChoiceResize([512], max_size=2048)(tall, tall[..., 0], np.random.default_rng(0))
    assert out_image.shape[:2] == out_label.shape == (205, 2048)  # short 512 would make the long edge 5120


def cat_ratio(label: np.ndarray, ignore: int = 255) -> tuple:
    """(classes present, share of the largest), ignore pixels left out."""
    counts = np.bincount(label[label != ignore].ravel())
    counts = counts[counts > 0]
    return len(counts), counts.max() / counts.sum() if len(counts) else 1.0


def test_cat_max_ratio_holds_where_achievable_and_ignore_pixels_do_not_count():
    """Bands of classes 0 and 1, 20 columns wide, then ignore: about half the 24x24 windows have two
    classes with neither at 75% of the non-ignored pixels. The retries always find one; single draws
    often do not. Counting ignore as a class would accept windows at the ignore border that this rejects."""
    label = np.zeros((24, 120), np.uint8)
    label[:, 20:40] = label[:, 60:80] = 1
    label[:, 90:] = 255
    crop = RandomCrop([24, 24], cat_max_ratio=0.75)
    plain = RandomCrop([24, 24])
    image = np.zeros((*label.shape, 3), np.uint8)
    retried = [cat_ratio(crop(image, label, np.random.default_rng(seed))[1]) for seed in range(40)]
    single = [cat_ratio(plain(image, label, np.random.default_rng(seed))[1]) for seed in range(40)]
    assert all(classes > 1 and ratio < 0.75 for classes, ratio in retried)
    assert sum(classes > 1 and ratio < 0.75 for classes, ratio in single) < 25


def test_cat_max_ratio_gives_up_after_ten_redraws_where_no_window_qualifies():
    label = np.ones((30, 30), np.uint8)
    image, out = RandomCrop([10, 10], cat_max_ratio=0.75)(
        np.zeros((30, 30, 3), np.uint8), label, np.random.default_rng(0)
    )
    assert image.shape == (10, 10, 3) and (out == 1).all()


def test_photometric_tables_reproduce_mmseg_float_arithmetic_and_leave_labels_alone():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for alpha, beta in ((1.37, 0.0), (1.0, -21.4), (0.61, 0.0)):
        expected = np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
        assert np.array_equal(cv2.LUT(image, PhotoMetricDistortion.table(alpha, beta)), expected)
    label = blobs(1, (20, 30))
    changed = 0
    for seed in range(8):
        out_image, out_label = PhotoMetricDistortion()(image, label, np.random.default_rng(seed))
        assert out_image.dtype == np.uint8 and out_image.shape == image.shape and out_label is label
        changed += not np.array_equal(out_image, image)
    assert changed >= 6


def test_hue_shift_moves_hue_by_the_drawn_delta_only():
    hsv = np.full((4, 4, 3), [[[30, 200, 200]]], np.uint8)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    distortion = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=18)
    hues = set()
    for seed in range(30):
        out, _ = distortion(image, None, np.random.default_rng(seed))
        hues.add(int(cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0, 0]))
    assert 30 in hues and len(hues) > 5 and all(11 <= h <= 48 for h in hues)


def test_pad_fills_the_image_with_the_mean_or_a_given_value_and_the_label_with_ignore():
    image, label = np.full((5, 6, 3), 7, np.uint8), np.zeros((5, 6), np.uint8)
    padded_image, padded_label = Pipeline([{'type': 'pad', 'size': [8, 9]}], ignore_index=11, mean=[10.2, 20.7, 30.5])(
        image, label, None
    )
    assert padded_image.shape == (8, 9, 3) and (padded_label[5:] == 11).all() and (padded_label[:5, :6] == 0).all()
    assert padded_image[7, 8].tolist() == [10, 21, 30] and (padded_image[:5, :6] == 7).all()
    assert Pad([8, 9], value=[0, 0, 0])(image, label, None)[0][7, 8].tolist() == [0, 0, 0]


def test_test_time_resize_keeps_labels_at_their_original_size():
    image, label = np.zeros((360, 480, 3), np.uint8), np.zeros((360, 480), np.uint8)
    out_image, out_label = Pipeline([{'type': 'resize', 'scale': [2048, 512]}])(image, label, None)
    assert out_image.shape == (512, 683, 3) and out_label.shape == (360, 480)


def write_scenes(root, count=6):
    for sub in ('images/train', 'annotations/train'):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        label = blobs(i)
        cv2.imwrite(str(root / f'images/train/{i}.jpg'), COLOURS[label])
        cv2.imwrite(str(root / f'annotations/train/{i}.png'), label)
    return root


def test_albumentations_draw_from_the_pipeline_rng_and_fill_labels_with_the_ignore_index():
    label = blobs(0)
    image = COLOURS[label]
    shrink = Albumentations([{'type': 'Affine', 'scale': [0.5, 0.5], 'p': 1, 'border_mode': 0}], ignore_index=11)
    warped_image, warped_label = shrink(image, label, np.random.default_rng(0))
    border = warped_label == 11
    assert 0.5 < border.mean() < 0.9  # a half-size image leaves three quarters of the frame to fill
    assert (warped_image[border] == 0).all() and (warped_label[~border] < 5).all()

    jitter = Albumentations([{'type': 'HueSaturationValue', 'p': 1}, {'type': 'GaussNoise', 'p': 1}])
    first, again = jitter(image, label, np.random.default_rng(5)), jitter(image, label, np.random.default_rng(5))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], label)
    assert not np.array_equal(first[0], jitter(image, label, np.random.default_rng(6))[0])


@pytest.mark.parametrize(
    'extra',
    [
        [{'type': 'photometric'}],
        [{'type': 'albumentations', 'transforms': [{'type': 'Perspective', 'p': 1}, {'type': 'GaussNoise'}]}],
    ],
    ids=['photometric', 'albumentations'],
)
def test_samples_depend_on_seed_and_draw_only_not_on_loader_workers(tmp_path, extra):
    steps = GEOMETRIC + extra
    dataset = SegmentationDataset(write_scenes(tmp_path), 'train', 5, pipeline=steps, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(dataset[(2, 17)], dataset[(2, 17)]))
    assert not torch.equal(dataset[(2, 17)][0], dataset[(2, 18)][0])

    def batches(workers):
        loader = DataLoader(dataset, batch_size=2, sampler=TrainSampler(len(dataset), seed=3), num_workers=workers)
        stream = iter(loader)
        return [next(stream) for _ in range(4)]

    for (image_a, label_a), (image_b, label_b) in zip(batches(0), batches(2)):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
