"""Datasets: each one's real layout built on the fly (a few generated files with the real names), its
label mapping, the one-time scan and its cache, the message for every kind of bad data; CamVid on disk."""

import os
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import datasets.scan
from conftest import CAMVID, ROOT
from datasets import DATASETS, CamVid, DatasetError, DatasetWarning, DemoScenes, FolderDataset, SegmentationDataset
from datasets.sampler import TrainSampler, shard
from datasets.voc import voc_palette
from engine.config import ConfigError
from engine.data import build_dataset
from engine.rules import load_config


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
    with pytest.raises(DatasetError, match=r"label '.*a.png' has values \[7\] outside \[0, 3\)"):
        SegmentationDataset(make_folder(tmp_path, label_value=7), 'train', num_classes=3)


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
    assert sorted(index for _, (index, _) in items[:5]) == [0, 1, 2, 3, 4]  # one epoch = a permutation
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


@pytest.mark.skipif(not CAMVID.is_dir(), reason='../shared/data/camvid not available')
def test_camvid_class_frequencies_match_its_readme(tmp_path):
    """The pixel counts per label value listed in ../shared/data/camvid/README.md, 11 being ignored."""
    readme = (CAMVID / 'README.md').read_text()
    for split in ('train', 'val'):
        listed = re.search(rf'- {split}: ((?:\d+:\d+\s*)+)', readme).group(1).split()
        counts = [int(item.split(':')[1]) for item in listed]
        dataset = CamVid(CAMVID, split, 11, cache_dir=tmp_path)
        assert dataset.class_pixels.tolist() == counts[:11] and dataset.ignored_pixels == counts[11]


@pytest.mark.skipif(not CAMVID.is_dir(), reason='../shared/data/camvid not available')
@pytest.mark.parametrize('held_out, frames', [('0001TP', 62), ('0006R0', 101), ('0016E5', 305)])
def test_camvid_folds_hold_out_one_whole_sequence_and_train_on_every_other_frame(tmp_path, held_out, frames):
    config = tmp_path / 'fold.yaml'
    overlay = ROOT / 'configs' / '_base_' / 'datasets' / f'camvid_hold_out_{held_out}.yaml'
    config.write_text(f'_base_: [{ROOT / "configs" / "camvid.yaml"}, {overlay}]\n')
    cfg = load_config(config, [f'output.work_dir={tmp_path}'])
    train, val = build_dataset(cfg, 'train'), build_dataset(cfg, 'val')
    sequences = [{image.name.split('_')[0] for image, _ in dataset.samples} for dataset in (train, val)]
    assert sequences[1] == {held_out} and held_out not in sequences[0] and len(val) == frames
    assert len(train) + len(val) == 468


def test_a_list_file_split_takes_names_across_the_split_folders_and_names_what_is_missing(tmp_path):
    root = make_folder(tmp_path / 'data', names=('a', 'b'))
    make_folder(root, names=())
    (root / 'images/val').mkdir(), (root / 'annotations/val').mkdir()
    for name in ('c',):
        cv2.imwrite(str(root / 'images/val' / f'{name}.jpg'), np.full((12, 16, 3), 100, np.uint8))
        cv2.imwrite(str(root / 'annotations/val' / f'{name}.png'), np.full((12, 16), 2, np.uint8))
    fold = tmp_path / 'fold_train.txt'
    fold.write_text('train/b\nval/c\n')
    dataset = SegmentationDataset(root, str(fold), num_classes=3, cache_dir=tmp_path / 'cache')
    assert [label.name for _, label in dataset.samples] == ['b.png', 'c.png']
    assert dataset.class_pixels[1:].tolist() == [12 * 16, 12 * 16]
    assert [path.name for path in (tmp_path / 'cache').iterdir()][0].startswith('fold_train-')
    fold.write_text('train/b\nval/d\n')
    with pytest.raises(DatasetError, match=r"fold_train.txt' lists 2 names; 1 without an image .* e.g. val/d"):
        SegmentationDataset(root, str(fold), num_classes=3)


# ------------------------------------------------------------------ each dataset's layout, on the fly


def write_pair(image_path, label_path, label, palette_mode=False):
    """A noise image and `label` under the given names; `palette_mode` writes a VOC-style palette PNG."""
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(image_path)))
    cv2.imwrite(str(image_path), rng.integers(0, 256, (*label.shape[:2], 3), dtype=np.uint8))
    if palette_mode:
        image = Image.fromarray(label, 'P')
        image.putpalette([c for rgb in voc_palette(256) for c in rgb])
        image.save(label_path)
    else:
        cv2.imwrite(str(label_path), label)


def bands(*values, dtype=np.uint8):
    """A 12x16 label of vertical bands holding `values`, left to right."""
    label = np.zeros((12, 16), dtype)
    edges = np.linspace(0, 16, len(values) + 1).astype(int)
    for value, start, end in zip(values, edges, edges[1:]):
        label[:, start:end] = value
    return label


def read_bands(label, count: int) -> list:
    """The value in the middle of each of the `count` bands of a label made by `bands`."""
    edges = np.linspace(0, 16, count + 1).astype(int)
    return [int(label[6, (start + end) // 2]) for start, end in zip(edges, edges[1:])]


def ade20k_layout(root):
    for split, prefix, count in (('training', 'ADE_train', 3), ('validation', 'ADE_val', 2)):
        for i in range(1, count + 1):
            name = f'{prefix}_{i:08d}'
            write_pair(
                root / 'images' / split / f'{name}.jpg',
                root / 'annotations' / split / f'{name}.png',
                bands(0, 1, 75, 150),
            )
    return root


def cityscapes_layout(root):
    for split, city, count in (('train', 'aachen', 2), ('train', 'bochum', 1), ('val', 'frankfurt', 2)):
        for i in range(count):
            stem = f'{city}/{city}_{i:06d}_000019'
            gt = root / 'gtFine' / split / stem
            write_pair(
                root / 'leftImg8bit' / split / f'{stem}_leftImg8bit.png',
                gt.with_name(f'{gt.name}_gtFine_labelIds.png'),
                bands(7, 26, 0, 29, 33),
            )
            cv2.imwrite(f'{gt}_gtFine_labelTrainIds.png', bands(0, 13, 255, 255, 18))
            cv2.imwrite(f'{gt}_gtFine_color.png', np.zeros((12, 16, 3), np.uint8))  # not labels of this kind
            cv2.imwrite(f'{gt}_gtFine_instanceIds.png', np.zeros((12, 16), np.uint16))
            (gt.parent / f'{gt.name}_gtFine_polygons.json').write_text('{}')
    return root


def coco_stuff_layout(root):
    for split, count in (('train2017', 2), ('val2017', 1)):
        for i in range(count):
            name = f'{9 + i:012d}'
            write_pair(
                root / 'images' / split / f'{name}.jpg',
                root / 'annotations' / split / f'{name}.png',
                bands(0, 12, 91, 181, 255),
            )
            cv2.imwrite(str(root / 'annotations' / split / f'{name}_labelTrainIds.png'), bands(0, 11, 80, 170, 255))
    return root


def pascal_context_layout(root):
    names = ['2008_000002', '2008_000003', '2008_000007']
    for name in names:
        write_pair(
            root / 'JPEGImages' / f'{name}.jpg', root / 'SegmentationClassContext' / f'{name}.png', bands(0, 1, 59)
        )
    (root / 'ImageSets/SegmentationContext').mkdir(parents=True)
    (root / 'ImageSets/SegmentationContext/train.txt').write_text('\n'.join(names[:2]) + '\n')
    (root / 'ImageSets/SegmentationContext/val.txt').write_text(names[2] + '\n')
    return root


def voc_layout(root):
    """train.txt and val.txt with palette-mode labels; aug.txt (SBD) with grey ones, overlapping train.txt."""
    write_pair(
        root / 'JPEGImages/2007_000032.jpg',
        root / 'SegmentationClass/2007_000032.png',
        bands(0, 15, 255),
        palette_mode=True,
    )
    write_pair(
        root / 'JPEGImages/2007_000033.jpg',
        root / 'SegmentationClass/2007_000033.png',
        bands(0, 1, 255),
        palette_mode=True,
    )
    for name in ('2007_000039', '2008_000001'):
        write_pair(root / f'JPEGImages/{name}.jpg', root / f'SegmentationClassAug/{name}.png', bands(0, 7, 255))
    cv2.imwrite(str(root / 'SegmentationClassAug/2007_000032.png'), bands(20, 20, 20))
    (root / 'ImageSets/Segmentation').mkdir(parents=True)
    for split, names in (
        ('train', ['2007_000032']),
        ('val', ['2007_000033']),
        ('aug', ['2007_000032', '2007_000039', '2008_000001']),
    ):
        (root / f'ImageSets/Segmentation/{split}.txt').write_text('\n'.join(names) + '\n')
    return root


def camvid_layout(root):
    for split, names in (('train', ['0001TP_006690', '0001TP_006720']), ('val', ['0016E5_07959'])):
        for name in names:
            write_pair(
                root / 'images' / split / f'{name}.jpg', root / 'annotations' / split / f'{name}.png', bands(3, 8, 11)
            )
    return root


def folder_layout(root):
    """Split list files, image extensions that differ, labels named x_mask.png, a label_map."""
    for name, suffix in (('x', '.png'), ('y', '.jpg'), ('z', '.jpg')):
        write_pair(root / 'images' / f'{name}{suffix}', root / 'masks' / f'{name}_mask.png', bands(0, 1, 2))
    (root / 'splits').mkdir()
    (root / 'splits/train.txt').write_text('x\ny\n')
    (root / 'splits/val.txt').write_text('z\n')
    return root


FOLDER_OPTIONS = {
    'image_dir': 'images',
    'label_dir': 'masks',
    'label_suffix': '_mask.png',
    'split_file': 'splits/{split}.txt',
    'label_map': {0: 255, 1: 0, 2: 1},
}

# data.type: (builder, num_classes, options, (train, val) sizes, train ids of the first train label's bands)
LAYOUTS = {
    'ade20k': (ade20k_layout, 150, {}, (3, 2), [255, 0, 74, 149]),
    'cityscapes': (cityscapes_layout, 19, {}, (3, 2), [0, 13, 255, 255, 18]),
    'coco_stuff': (coco_stuff_layout, 171, {}, (2, 1), [0, 11, 80, 170, 255]),
    'pascal_context': (pascal_context_layout, 59, {}, (2, 1), [255, 0, 58]),
    'voc': (voc_layout, 21, {}, (1, 1), [0, 15, 255]),
    'camvid': (camvid_layout, 11, {}, (2, 1), [3, 8, 255]),
    'folder': (folder_layout, 2, FOLDER_OPTIONS, (2, 1), [255, 0, 1]),
}

TRAIN_PIPELINE = [
    {'type': 'random_resize', 'scale': [32, 16], 'ratio_range': [0.5, 2.0]},
    {'type': 'random_crop', 'size': [8, 8], 'cat_max_ratio': 0.75},
    {'type': 'random_flip', 'prob': 0.5},
    {'type': 'photometric'},
    {'type': 'pad', 'size': [8, 8]},
]


@pytest.mark.parametrize('kind', LAYOUTS)
def test_each_dataset_reads_its_layout_and_maps_labels_to_train_ids(tmp_path, kind):
    build, num_classes, options, sizes, ids = LAYOUTS[kind]
    root = build(tmp_path)
    train, val = (DATASETS[kind](root, split, num_classes, **options) for split in ('train', 'val'))
    assert (len(train), len(val)) == sizes
    image, label = train[0]
    assert image.shape == (3, 12, 16) and image.dtype == torch.uint8 and label.dtype == torch.int64
    assert read_bands(label, len(ids)) == ids
    assert len(train.class_names) == num_classes and train.palette.shape == (num_classes, 3)
    known = [i for i in ids if i != 255]
    assert train.class_pixels[known].sum() == 12 * 16 * len(train) - train.ignored_pixels


@pytest.mark.parametrize('kind', LAYOUTS)
def test_a_train_sample_is_crop_sized_with_only_train_ids_or_ignore(tmp_path, kind):
    build, num_classes, options, _, ids = LAYOUTS[kind]
    dataset = DATASETS[kind](build(tmp_path), 'train', num_classes, pipeline=TRAIN_PIPELINE, **options)
    seen = set()
    for draw in range(8):
        image, label = dataset[(draw % len(dataset), draw)]
        assert image.shape == (3, 8, 8) and label.shape == (8, 8)
        seen |= set(label.unique().tolist())
    assert seen <= set(ids) and seen - {255}


def test_dataset_names_and_colours():
    assert DATASETS['cityscapes'].CLASS_NAMES[13] == 'car' and DATASETS['cityscapes'].PALETTE[0] == [128, 64, 128]
    assert DATASETS['ade20k'].CLASS_NAMES[:3] == ['wall', 'building', 'sky']
    assert DATASETS['coco_stuff'].CLASS_NAMES[80] == 'banner' and DATASETS['coco_stuff'].CLASS_NAMES[-1] == 'wood'
    assert DATASETS['voc'].PALETTE[15] == [192, 128, 128] and voc_palette(256)[255] == [224, 224, 192]
    assert DATASETS['pascal_context'].CLASS_NAMES[-1] == 'wood'


@pytest.mark.parametrize('kind, layout', [('cityscapes', cityscapes_layout), ('coco_stuff', coco_stuff_layout)])
def test_converted_train_id_files_give_the_same_labels_as_the_raw_ones(tmp_path, kind, layout):
    root, num_classes = layout(tmp_path), LAYOUTS[kind][1]
    raw = DATASETS[kind](root, 'train', num_classes)
    converted = DATASETS[kind](root, 'train', num_classes, labels='train_ids')
    assert converted.samples[0][1].name.endswith('_labelTrainIds.png')
    assert len(raw) == len(converted) and torch.equal(raw[0][1], converted[0][1])
    with pytest.raises(DatasetError, match=r"data.labels must be one of \['"):
        DATASETS[kind](root, 'train', num_classes, labels='trainIds')


def test_voc_train_aug_adds_the_sbd_list_and_keeps_the_fine_label_of_a_name_in_both(tmp_path):
    dataset = DATASETS['voc'](voc_layout(tmp_path), 'train_aug', 21)
    assert [pair[1].parent.name for pair in dataset.samples] == ['SegmentationClass'] + ['SegmentationClassAug'] * 2
    assert read_bands(dataset[0][1], 3) == [0, 15, 255]  # palette indices, not colours
    assert read_bands(dataset[1][1], 3) == [0, 7, 255]


def test_ignore_index_other_than_255_receives_each_datasets_void_values(tmp_path):
    camvid = CamVid(camvid_layout(tmp_path / 'camvid'), 'train', 11, ignore_index=11)
    assert read_bands(camvid[0][1], 3) == [3, 8, 11]
    ade = DATASETS['ade20k'](ade20k_layout(tmp_path / 'ade'), 'val', 150, ignore_index=200)
    assert read_bands(ade[0][1], 4) == [200, 0, 74, 149]


def test_folder_reads_palette_mode_labels_as_indices(tmp_path):
    write_pair(tmp_path / 'images/train/a.jpg', tmp_path / 'annotations/train/a.png', bands(0, 1, 2), palette_mode=True)
    dataset = FolderDataset(tmp_path, 'train', 3)
    assert read_bands(dataset[0][1], 3) == [0, 1, 2]


def test_folder_maps_rgb_colour_labels_through_the_colour_table(tmp_path):
    colours = [[0, 0, 0], [128, 64, 128], [220, 20, 60]]
    label = np.array(colours, np.uint8)[bands(0, 1, 2)]
    write_pair(tmp_path / 'images/train/a.jpg', tmp_path / 'annotations/train/a.png', label[..., ::-1].copy())
    dataset = FolderDataset(tmp_path, 'train', 2, label_colors={255: colours[0], 0: colours[1], 1: colours[2]})
    assert read_bands(dataset[0][1], 3) == [255, 0, 1]
    listed = FolderDataset(tmp_path, 'train', 3, label_colors=colours)  # a list: index = value
    assert read_bands(listed[0][1], 3) == [0, 1, 2]
    with pytest.raises(
        DatasetError,
        match=r"label '.*a.png' has colours \(220, 20, 60\) that data.label_colors "
        r'does not list',
    ):
        FolderDataset(tmp_path, 'train', 2, label_colors=colours[:2])


# ------------------------------------------------------------------------------------- bad data


def test_skip_leaves_out_each_bad_pair_with_a_warning_naming_it(tmp_path):
    root = make_folder(tmp_path, names=('good', 'small', 'range', 'broken', 'lonely'))
    cv2.imwrite(str(root / 'annotations/train/small.png'), np.zeros((10, 16), np.uint8))
    cv2.imwrite(str(root / 'annotations/train/range.png'), np.full((12, 16), 9, np.uint8))
    (root / 'annotations/train/broken.png').write_bytes(b'not a png')
    (root / 'annotations/train/lonely.png').unlink()
    expected = [
        r'1 without a partner, e.g. lonely \(no label\)',
        r"size mismatch: image '.*small.jpg' is 16x12",
        r"label '.*range.png' has values \[9\] outside \[0, 3\)",
        r"cannot read label '.*broken.png'",
    ]
    with pytest.warns(DatasetWarning, match=r'left out 4 of 5 pairs \(data.on_invalid: skip\)') as caught:
        dataset = SegmentationDataset(root, 'train', 3, on_invalid='skip')
    assert [path.stem for path, _ in dataset.samples] == ['good']
    with pytest.raises(DatasetError) as error:
        SegmentationDataset(root, 'train', 3)
    for pattern in expected:
        assert re.search(pattern, str(caught[0].message)) and re.search(pattern, str(error.value)), pattern
    assert 'set data.on_invalid: skip' in str(error.value)


def test_a_label_with_colour_channels_is_named(tmp_path):
    root = make_folder(tmp_path, names=('a',))
    cv2.imwrite(str(root / 'annotations/train/a.png'), np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(
        DatasetError,
        match=r"label '.*a.png' has 3 channels; expected single-channel class ids .*"
        r'data.label_colors',
    ):
        SegmentationDataset(root, 'train', 3)


def test_values_outside_the_classes_after_mapping_name_both(tmp_path):
    root = ade20k_layout(tmp_path)
    cv2.imwrite(str(root / 'annotations/validation/ADE_val_00000002.png'), bands(0, 151))
    with pytest.raises(
        DatasetError,
        match=r"ADE_val_00000002.png' has values \[151\] \(train ids \[150\] after "
        r'mapping\) outside \[0, 150\) and not the ignore index 255',
    ):
        DATASETS['ade20k'](root, 'val', 150)


def test_split_lists_name_what_is_missing(tmp_path):
    root = voc_layout(tmp_path)
    (root / 'ImageSets/Segmentation/val.txt').write_text('2007_000033\n2009_999999\n')
    with pytest.raises(
        DatasetError,
        match=r"val.txt' lists 2 names; 1 without an image in '.*JPEGImages' or a "
        r"label in '.*SegmentationClass', e.g. 2009_999999 \(no image\)",
    ):
        DATASETS['voc'](root, 'val', 21)
    with pytest.raises(DatasetError, match=r"split list '.*ImageSets/Segmentation/test.txt' not found"):
        DATASETS['voc'](root, 'test', 21)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'type': 'ade20k', 'num_classes': 151}, r'data.num_classes is 151 but ADE20K has 150 classes'),
        ({'num_classes': 5, 'ignore_index': 3}, r'data.ignore_index 3 is also a class id \(data.num_classes is 5\)'),
        ({'on_invalid': 'warn'}, r"data.on_invalid must be 'error' or 'skip', got 'warn'"),
        ({'class_names': ['a']}, r'data.class_names has 1 names for data.num_classes 3'),
        ({'palette': [[0, 0, 0], [1, 2]]}, r'data.palette must give an \[r, g, b\] colour'),
        ({'label_map': {1: 7}}, r'data.label_map: 1 -> 7; expected a train id in \[0, 3\) or the ignore index 255'),
        ({'label_colors': {0: [0, 0]}}, r'data.label_colors: 0: \[0, 0\]; expected'),
    ],
)
def test_settings_that_cannot_match_the_data_are_named(tmp_path, kwargs, message):
    kwargs = {'type': 'folder', 'num_classes': 3, **kwargs}
    with pytest.raises(DatasetError, match=message):
        DATASETS[kwargs.pop('type')](make_folder(tmp_path), 'train', **kwargs)


# ------------------------------------------------------------------------------------ the scan cache


def test_the_scan_is_cached_and_redone_when_a_file_changes(tmp_path, monkeypatch):
    root, cache = make_folder(tmp_path / 'data', names=('a', 'b', 'c')), tmp_path / 'cache'
    scanned = []
    original = datasets.scan.scan_pair
    monkeypatch.setattr(datasets.scan, 'scan_pair', lambda pair, colors: scanned.append(pair) or original(pair, colors))
    SegmentationDataset(root, 'train', 3, cache_dir=cache)
    assert len(scanned) == 3 and len(list(cache.glob('train-*.json'))) == 1
    SegmentationDataset(root, 'train', 3, cache_dir=cache)
    assert len(scanned) == 3  # all from the cache
    label = root / 'annotations/train/b.png'
    cv2.imwrite(str(label), np.full((12, 16), 9, np.uint8))
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    with pytest.raises(DatasetError, match=r"b.png' has values \[9\]"):
        SegmentationDataset(root, 'train', 3, cache_dir=cache)
    assert len(scanned) == 6
    skipped = SegmentationDataset(root, 'train', 10, cache_dir=cache)  # other settings: the same records
    assert len(skipped) == 3 and len(scanned) == 6


# --------------------------------------------------------------------------- config: dataset options


@pytest.fixture
def folder_config(tmp_path):
    root = folder_layout(tmp_path / 'data')
    config = tmp_path / 'folder.yaml'
    config.write_text(f"""
backbone: {{type: resnet, variant: test}}
head: {{type: aspp, channels: 16}}
data:
  type: folder
  root: {root}
  num_classes: 2
  image_dir: images
  label_dir: masks
  label_suffix: _mask.png
  split_file: splits/{{split}}.txt
  label_map: {{0: 255, 1: 0, 2: 1}}
  on_invalid: skip
train: {{max_iters: 2, batch_size: 1}}
output: {{work_dir: {tmp_path / 'work'}}}
""")
    return config


def test_dataset_options_in_yaml_reach_the_dataset_and_the_scan_is_cached_in_the_work_dir(folder_config, tmp_path):
    cfg = load_config(folder_config)
    dataset = build_dataset(cfg, 'train')
    assert isinstance(dataset, FolderDataset) and len(dataset) == 2 and dataset.on_invalid == 'skip'
    assert read_bands(dataset[0][1], 3) == [255, 0, 1]
    assert list((tmp_path / 'work' / 'scan_cache').glob('train-*.json'))


@pytest.mark.parametrize(
    'override, message',
    [
        ('data.label_mapp={1: 0}', "unknown key 'data.label_mapp' for FolderDataset (accepts: image_dir, label_dir"),
        ('data.label_mapp={1: 0}', "(did you mean 'label_map'?)"),
        ('data.workerz=1', "(did you mean 'workers'?)"),
        ('data.on_invalid=1', "'data.on_invalid' must be str, got int 1"),
        ('data.type=ade20k', "unknown key 'data.image_dir' for ADE20K"),
        ('data.type=demo', "unknown key 'data.image_dir' for DemoScenes (accepts: on_invalid, cache_dir)"),
    ],
)
def test_dataset_options_are_checked_against_the_dataset_class(folder_config, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(folder_config, [override])
    assert message in str(error.value) and str(folder_config) in str(error.value)
