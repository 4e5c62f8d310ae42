"""Pictures people look at (evaluate.py --show-dir, infer.py, TensorBoard), palettes, and infer.py's
refusal to lose data: on a tiny model trained once."""

import json
import os
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import infer
import train
from conftest import TINY
from datasets import DATASETS
from datasets.base import default_palette
from engine.outputs import write_class_ids
from engine.visualize import ROW, ClassStyle, confusion_heatmap, iou_chart, most_confused, side_by_side

DEMO = DATASETS['demo']
SIZE = 128  # the demo's images are 128 x 128


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('viz')
    config = folder / 'tiny.yaml'
    config.write_text(textwrap.dedent(TINY.format(root=folder / 'demo')))
    train.main(['--config', str(config), '--work-dir', str(folder / 'work'), '--device', 'cpu'])
    return folder


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def colours(image: np.ndarray) -> set:
    return {tuple(c) for c in image.reshape(-1, 3).tolist()}


def saturated(image: np.ndarray) -> set:
    """The colours that are not greys: anti-aliased black-on-white text and the ignore hatch are grey."""
    return {c for c in colours(image) if len(set(c)) > 1}


def test_a_tiny_sample_is_enlarged_with_square_pixels_so_its_legend_fits():
    style = ClassStyle(['a', 'b'], np.array([[230, 25, 75], [60, 180, 75]], np.uint8), 255)
    label = torch.tensor([[0, 1], [1, 255]])
    picture = side_by_side(torch.zeros(3, 2, 2, dtype=torch.uint8), label, torch.ones(2, 2, dtype=torch.long), style)
    assert picture.shape[1] == 3 * 48
    truth = picture[ROW : ROW + 48, 48:96]
    assert (truth[:24, :24] == truth[0, 0]).all() and not (truth[0, 0] == truth[0, 24]).all()


def test_side_by_side_shows_image_truth_and_prediction_with_a_legend_of_exactly_the_classes_present():
    palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8)
    style = ClassStyle(['a', 'b', 'c', 'd', 'e'], palette, 255)
    label = torch.zeros(40, 60, dtype=torch.long)
    label[:, 30:] = 2
    label[:5] = 255
    prediction = torch.full((40, 60), 3)
    prediction[20:] = 2
    image = torch.full((3, 20, 30), 128, dtype=torch.uint8)  # fed at half size: shown at the label's
    picture = side_by_side(image, label, prediction, style)
    assert picture.shape[1] == 3 * 60 and picture.dtype == np.uint8
    panels, strip = picture[ROW : ROW + 40], picture[ROW + 40 :]
    assert (panels[:, :60] == 128).all()
    assert colours(panels[:5, 60:120]) == {(0, 0, 0), (255, 255, 255)}  # ignored pixels hatched
    assert saturated(strip) == {tuple(palette[i].tolist()) for i in (0, 2, 3)}
    assert {(0, 0, 0), (255, 255, 255)} <= colours(strip)  # the hatch swatch for 'ignored'


def test_palette_png_reads_back_as_the_ids(tmp_path):
    ids = np.random.default_rng(0).integers(0, 150, (37, 53))
    write_class_ids(tmp_path / 'ids.png', ids, np.array(DATASETS['ade20k'].PALETTE, np.uint8))
    with Image.open(tmp_path / 'ids.png') as image:
        assert image.mode == 'P'
        assert image.getpalette()[: 3 * 150] == [c for rgb in DATASETS['ade20k'].PALETTE for c in rgb]
        assert np.array_equal(np.asarray(image), ids)
    many = np.random.default_rng(0).integers(0, 300, (5, 7))  # more classes than a palette holds: 16-bit grey
    write_class_ids(tmp_path / 'many.png', many, np.zeros((300, 3), np.uint8))
    assert np.array_equal(cv2.imread(str(tmp_path / 'many.png'), cv2.IMREAD_UNCHANGED), many)


def test_palettes_are_mmsegs_and_generated_ones_are_distinct_and_readable():
    assert DATASETS['ade20k'].PALETTE[:3] == [[120, 120, 120], [180, 120, 120], [6, 230, 230]]
    assert DATASETS['ade20k'].PALETTE[-1] == [92, 0, 255] and len(DATASETS['ade20k'].PALETTE) == 150
    assert DATASETS['coco_stuff'].PALETTE[:3] == [[0, 192, 64], [0, 192, 64], [0, 64, 96]]
    assert DATASETS['coco_stuff'].PALETTE[-1] == [64, 64, 0] and len(DATASETS['coco_stuff'].PALETTE) == 171
    assert DATASETS['pascal_context'].PALETTE[0] == [180, 120, 120] and len(DATASETS['pascal_context'].PALETTE) == 59
    assert DATASETS['voc'].PALETTE == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
        [0, 128, 128],
        [128, 128, 128],
        [64, 0, 0],
        [192, 0, 0],
        [64, 128, 0],
        [192, 128, 0],
        [64, 0, 128],
        [192, 0, 128],
        [64, 128, 128],
        [192, 128, 128],
        [0, 64, 0],
        [128, 64, 0],
        [0, 192, 0],
        [128, 192, 0],
        [0, 64, 128],
    ]
    assert DATASETS['camvid'].PALETTE[8] == [64, 0, 128]  # car, as in its README
    for palette, closest in ((DEMO.PALETTE, 100), (default_palette(12), 50), (default_palette(256), 1)):
        rgb = np.array(palette, float)
        distance = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
        assert distance.min() >= closest  # no two classes share a colour
        assert (rgb @ [0.299, 0.587, 0.114]).min() > 25  # none reads as a shadow-black


def test_training_logs_pictures_per_class_iou_learning_rates_memory_and_config(run):
    events = EventAccumulator(str(run / 'work' / 'tensorboard'), size_guidance={'images': 0, 'tensors': 0})
    events.Reload()
    tags = events.Tags()
    assert {'val/IoU_chart', 'val/confusion', *(f'val/prediction_{i}' for i in range(4))} <= set(tags['images'])
    assert 'config/text_summary' in tags['tensors']
    assert {'lr/default', 'memory/peak_rss_mib', 'val/IoU/disc'} <= set(tags['scalars'])
    assert [e.step for e in events.Images('val/prediction_0')] == [3, 6]
    shown = events.Images('val/prediction_0')[-1]
    assert shown.width == 3 * SIZE and shown.height > ROW + SIZE
    config = events.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
    assert 'type: demo' in config and 'max_iters: 6' in config
    assert events.Scalars('memory/peak_rss_mib')[-1].value > 100


def test_evaluate_show_dir_writes_side_by_side_pictures_and_charts(run, tmp_path):
    show = tmp_path / 'show'
    evaluate.main(
        [
            '--checkpoint',
            str(run / 'work' / 'best.pth'),
            '--device',
            'cpu',
            '--work-dir',
            str(tmp_path),
            '--show-dir',
            str(show),
            '--show-limit',
            '3',
        ]
    )
    assert (show / 'pictures.txt').is_file()  # what evaluate.py wrote there, so it may write it again
    pictures = sorted(path for path in show.iterdir() if path.suffix == '.png')
    assert [p.name for p in pictures] == ['00000_0000.png', '00001_0001.png', '00002_0002.png']
    for index, path in enumerate(pictures):
        picture = read_rgb(path)
        assert picture.shape[1] == 3 * SIZE and picture.shape[0] > ROW + SIZE
        label = cv2.imread(str(run / 'demo' / 'annotations' / 'val' / f'{index:04d}.png'), cv2.IMREAD_UNCHANGED)
        in_legend = colours(picture[ROW + SIZE :])
        assert {tuple(DEMO.PALETTE[c]) for c in np.unique(label) if c != 255} <= in_legend
    assert 'confusion' not in json.loads((tmp_path / 'eval_val_whole_best.json').read_text())
    assert read_rgb(tmp_path / 'eval_val_whole_best_iou.png').shape[0] > 100
    assert read_rgb(tmp_path / 'eval_val_whole_best_confusion.png').shape[0] > 100


def write_inputs(folder: Path, run) -> None:
    (folder / 'nested').mkdir(parents=True)
    image = cv2.imread(str(run / 'demo' / 'images' / 'val' / '0000.jpg'))
    cv2.imwrite(str(folder / 'a.jpg'), image)
    cv2.imwrite(str(folder / 'nested' / 'b.png'), cv2.resize(image, (96, 80)))


def test_infer_writes_palette_ids_overlays_legend_and_class_list(run, tmp_path):
    write_inputs(tmp_path / 'in', run)
    output = tmp_path / 'out'
    infer.main(
        [
            '--checkpoint',
            str(run / 'work' / 'best.pth'),
            '--input',
            str(tmp_path / 'in'),
            '--output',
            str(output),
            '--device',
            'cpu',
            '--overlay-format',
            'png',
            '--opacity',
            '1',
        ]
    )
    with Image.open(output / 'nested' / 'b.png') as ids_file:
        assert ids_file.mode == 'P' and ids_file.getpalette()[:15] == [c for rgb in DEMO.PALETTE for c in rgb]
        ids = np.asarray(ids_file)
    assert ids.shape == (80, 96) and ids.max() < 5
    overlay = read_rgb(output / 'nested' / 'b_overlay.png')[:80]  # opacity 1: the class colours, white borders
    ids8 = ids.astype(np.uint8)
    inside = cv2.erode(ids8, np.ones((3, 3), np.uint8)) == cv2.dilate(ids8, np.ones((3, 3), np.uint8))
    assert inside.mean() > 0.5 and np.array_equal(overlay[inside], np.array(DEMO.PALETTE, np.uint8)[ids][inside])
    assert (overlay[~inside] == 255).all(axis=-1).any()
    assert json.loads((output / 'classes.json').read_text()) == [
        {'id': i, 'name': name, 'color': rgb} for i, (name, rgb) in enumerate(zip(DEMO.CLASS_NAMES, DEMO.PALETTE))
    ]
    assert saturated(read_rgb(output / 'legend.png')) >= {tuple(c) for c in DEMO.PALETTE[1:]}
    assert sorted(p.name for p in output.iterdir()) == [
        'a.png',
        'a_overlay.png',
        'classes.json',
        'legend.png',
        'nested',
        'predictions.txt',
    ]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def refused(argv: list, capsys) -> str:
    """infer.py through its command-line entry point: it must stop with exit code 2 and one line."""
    with pytest.raises(SystemExit) as stop:
        train.run_cli(lambda: infer.main(argv + ['--device', 'cpu']))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith('error: ') and 'Traceback' not in error[0]
    return error[0]


@pytest.mark.parametrize('through_link', [False, True])
def test_infer_never_writes_over_an_input(run, tmp_path, capsys, through_link):
    inputs = tmp_path / 'in'
    write_inputs(inputs, run)
    output = inputs
    if through_link:
        output = tmp_path / 'link'
        output.symlink_to(inputs)
    before = snapshot(tmp_path)
    error = refused(
        ['--checkpoint', str(run / 'work' / 'best.pth'), '--input', str(inputs), '--output', str(output)], capsys
    )
    assert f"'{output / 'nested' / 'b.png'}' is one of the inputs" in error
    assert snapshot(tmp_path) == before


def test_infer_refuses_two_inputs_with_one_output_name_before_writing_anything(run, tmp_path, capsys):
    inputs = tmp_path / 'in'
    write_inputs(inputs, run)
    cv2.imwrite(str(inputs / 'a.png'), cv2.imread(str(inputs / 'a.jpg')))
    before = snapshot(tmp_path)
    error = refused(
        ['--checkpoint', str(run / 'work' / 'best.pth'), '--input', str(inputs), '--output', str(tmp_path / 'out')],
        capsys,
    )
    assert (
        f"'{inputs / 'a.jpg'}' and '{inputs / 'a.png'}' would both be written to '{tmp_path / 'out' / 'a.png'}'"
        in error
    )
    assert snapshot(tmp_path) == before and not (tmp_path / 'out').exists()


def test_infer_reports_an_output_it_cannot_write(run, tmp_path, capsys):
    write_inputs(tmp_path / 'in', run)
    (tmp_path / 'taken').write_text('a file where the output folder should be')
    before = snapshot(tmp_path)
    error = refused(
        [
            '--checkpoint',
            str(run / 'work' / 'best.pth'),
            '--input',
            str(tmp_path / 'in'),
            '--output',
            str(tmp_path / 'taken' / 'out'),
        ],
        capsys,
    )
    assert f"cannot write '{tmp_path / 'taken' / 'out' / 'predictions.txt'}': Not a directory" in error
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_infer_reports_a_read_only_output_folder(run, tmp_path, capsys):
    write_inputs(tmp_path / 'in', run)
    (tmp_path / 'out').mkdir(mode=0o555)
    error = refused(
        [
            '--checkpoint',
            str(run / 'work' / 'best.pth'),
            '--input',
            str(tmp_path / 'in'),
            '--output',
            str(tmp_path / 'out'),
        ],
        capsys,
    )
    assert f"cannot write '{tmp_path / 'out' / 'legend.png'}': Permission denied" in error


@pytest.mark.parametrize(
    'option, value, message',
    [
        ('--opacity', '1.5', 'argument --opacity: must be in [0, 1], got 1.5'),
        ('--opacity', '-0.1', 'argument --opacity: must be in [0, 1], got -0.1'),
        ('--batch-size', '0', 'argument --batch-size: must be >= 1, got 0'),
    ],
)
def test_infer_options_are_range_checked(run, tmp_path, capsys, option, value, message):
    write_inputs(tmp_path / 'in', run)
    before = snapshot(tmp_path)
    error = refused(
        [
            '--checkpoint',
            str(run / 'work' / 'best.pth'),
            '--input',
            str(tmp_path / 'in'),
            '--output',
            str(tmp_path / 'out'),
            option,
            value,
        ],
        capsys,
    )
    assert error == f'error: {message} (see --help)'
    assert snapshot(tmp_path) == before


def test_charts_of_150_classes_stay_readable():
    """ADE20K-sized: the IoU chart draws the 20 best and 20 worst classes (not 150 rows), the confusion
    matrix the classes of the largest confusions, annotated."""
    rng = np.random.default_rng(0)
    style = ClassStyle([f'class {i}' for i in range(150)], rng.integers(0, 256, (150, 3)).astype(np.uint8), 255)
    iou = rng.uniform(0, 90, 150)
    iou[:30] = np.nan
    assert iou_chart(iou, style).shape[0] < 1100
    matrix = np.diag(rng.integers(500, 5000, 150)) + rng.integers(0, 20, (150, 150))
    matrix[3, 7], matrix[10, 2] = 3000, 2000
    assert most_confused(matrix / matrix.sum(1, keepdims=True), 4).tolist() == [2, 3, 7, 10]
    assert confusion_heatmap(matrix, style).shape[0] < 1700
