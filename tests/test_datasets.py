"""Folder datasets: pairing, label checks and the error messages for bad data; CamVid on disk."""
import cv2
import numpy as np
import pytest
import torch

from conftest import CAMVID
from datasets import CamVid, DatasetError, DemoScenes, SegmentationDataset
from datasets.sampler import TrainSampler, shard


def make_folder(root, names=('a', 'b'), size=(12, 16), label_value=1, image_suffix='.jpg'):
    for sub in ('images/train', 'annotations/train'):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(root / 'images/train' / f'{name}{image_suffix}'), np.full((*size, 3), 100, np.uint8))
        cv2.imwrite(str(root / 'annotations/train' / f'{name}.png'), np.full(size, label_value, np.uint8))
    return root


def test_pairs_by_stem_across_extensions_and_returns_uint8_images(tmp_path):
    dataset = SegmentationDataset(make_folder(tmp_path, image_suffix='.png'), 'train', num_classes=3)
    image, label = dataset[0]
    assert len(dataset) == 2 and image.dtype == torch.uint8 and image.shape == (3, 12, 16)
    assert label.dtype == torch.int64 and label.unique().tolist() == [1]


def test_reduce_zero_label_maps_0_to_ignore_and_shifts(tmp_path):
    root = make_folder(tmp_path, names=('a',))
    label = np.zeros((12, 16), np.uint8)
    label[:, 6:11], label[:, 11:] = 1, 150
    cv2.imwrite(str(root / 'annotations/train/a.png'), label)
    dataset = SegmentationDataset(root, 'train', num_classes=150, reduce_zero_label=True)
    assert sorted(dataset[0][1].unique().tolist()) == [0, 149, 255]


def test_missing_partner_is_named(tmp_path):
    root = make_folder(tmp_path)
    (root / 'annotations/train/b.png').unlink()
    with pytest.raises(DatasetError, match=r'2 images and .* 1 labels; 1 without a partner, e.g. b'):
        SegmentationDataset(root, 'train', num_classes=3)


def test_size_mismatch_names_both_files(tmp_path):
    root = make_folder(tmp_path)
    cv2.imwrite(str(root / 'annotations/train/a.png'), np.zeros((10, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"size mismatch: image '.*a.jpg' is 16x12, label '.*a.png' is 16x10"):
        SegmentationDataset(root, 'train', num_classes=3)[0]


def test_label_values_out_of_range_are_named(tmp_path):
    dataset = SegmentationDataset(make_folder(tmp_path, label_value=7), 'train', num_classes=3)
    with pytest.raises(DatasetError, match=r"label '.*a.png' has values \[7\] outside \[0, 3\)"):
        dataset[0]


def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path)
    (root / 'images/train/a.jpg').write_bytes(b'garbage')
    with pytest.raises(DatasetError, match=r"cannot read image '.*a.jpg'"):
        SegmentationDataset(root, 'train', num_classes=3)[0]


def test_demo_scenes_are_generated_once_and_deterministic(tmp_path):
    first = DemoScenes(tmp_path / 'one', 'val')
    second = DemoScenes(tmp_path / 'two', 'val')
    assert len(first) == 48 and first.class_names[0] == 'ground'
    image_a, label_a = first[3]
    image_b, label_b = second[3]
    assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    assert set(label_a.unique().tolist()) <= {0, 1, 2, 3, 4, 255} and (label_a == 255).any()


def test_train_sampler_is_seeded_resumable_and_sharded():
    stream = TrainSampler(5, seed=3)
    first = [next(iter(stream)) for _ in range(1)]
    items = list(zip(range(12), stream))
    assert sorted(index for _, (index, _) in items[:5]) == [0, 1, 2, 3, 4]          # one epoch = a permutation
    resumed = TrainSampler(5, seed=3, start=7)
    assert [item for _, item in zip(range(5), resumed)] == [item for _, item in items[7:12]]
    ranks = [[item for _, item in zip(range(3), TrainSampler(6, seed=3, rank=r, world_size=2))] for r in (0, 1)]
    assert sorted(position for rank in ranks for _, position in rank) == list(range(6))
    assert first[0] == items[0][1]
    assert shard(5, 0, 2) + shard(5, 1, 2) == [0, 2, 4, 1, 3]


@pytest.mark.skipif(not CAMVID.is_dir(), reason='../shared/data/camvid not available')
def test_camvid_loads_with_the_documented_counts():
    train, val = CamVid(CAMVID, 'train', 11, ignore_index=11), CamVid(CAMVID, 'val', 11, ignore_index=11)
    assert (len(train), len(val)) == (367, 101)
    image, label = val[0]
    assert image.shape == (3, 360, 480) and label.shape == (360, 480)
    assert label.max() <= 11 and val.class_names[3] == 'road'
