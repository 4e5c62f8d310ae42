"""Images of other than three bands (data.in_channels): 16-bit multispectral TIFFs read in the file's
band order, a pretrained RGB backbone inflated into the wider input convolution (named in the load
report), and a 4-band dataset that trains, evaluates and infers through the CLIs."""

import cv2
import numpy as np
import pytest
import tifffile
import timm
import torch
from PIL import Image
from timm.models import adapt_input_conv

import infer
import train
from datasets.base import DatasetError, read_bands
from engine.config import ConfigError
from engine.rules import load_config
from models.backbones import BACKBONES
from models.input_channels import take_input_channels
from models.weights import load_pretrained


def test_tiff_bands_are_read_in_file_order_interleaved_or_planar(tmp_path):
    bands = np.stack([np.full((4, 6), 1000 * (i + 1), np.uint16) for i in range(5)], axis=-1)
    tifffile.imwrite(tmp_path / 'interleaved.tif', bands, photometric='minisblack', planarconfig='contig')
    tifffile.imwrite(tmp_path / 'planar.tif', np.moveaxis(bands, -1, 0), planarconfig='separate')
    for name in ('interleaved.tif', 'planar.tif'):
        image = read_bands(tmp_path / name, 5)
        assert (
            image.shape == (4, 6, 5)
            and image.dtype == np.uint16
            and image[0, 0].tolist() == [1000, 2000, 3000, 4000, 5000]
        )
    with pytest.raises(DatasetError, match=r"interleaved.tif' has 5 bands; data.in_channels is 4"):
        read_bands(tmp_path / 'interleaved.tif', 4)


def test_a_pretrained_rgb_resnet_is_inflated_into_four_bands_and_the_report_names_it(tmp_path):
    rgb = timm.create_model('resnet18').state_dict()  # an ImageNet file's names
    torch.save(rgb, tmp_path / 'resnet18.pth')
    backbone = BACKBONES['resnet'](18)
    take_input_channels(backbone, 4)
    report = load_pretrained(backbone, tmp_path / 'resnet18.pth')
    assert report.complete and report.inflated == ['body.conv1.weight (3 -> 4 input channels)']
    assert 'inflated body.conv1.weight (3 -> 4 input channels)' in report.summary()
    expected = adapt_input_conv(4, rgb['conv1.weight'])  # repeated, scaled by 3/4
    assert torch.equal(backbone.body.conv1.weight, expected)
    assert backbone(torch.randn(1, 4, 64, 64))[0].shape == (1, 64, 16, 16)


def four_band_dataset(root, count: int = 4):
    """64x64 16-bit TIFFs whose fourth band is bright where the label is class 1."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((64, 64), np.uint8)
            label[rng.integers(0, 32) :, : rng.integers(16, 64)] = 1
            image = rng.integers(0, 20000, (64, 64, 4)).astype(np.uint16)
            image[..., 3] = np.where(label == 1, 50000, 5000)
            tifffile.imwrite(
                root / 'images' / split / f'{i}.tif', image, photometric='minisblack', planarconfig='contig'
            )
            cv2.imwrite(str(root / 'annotations' / split / f'{i}.png'), label)
    return root


def test_a_four_band_dataset_trains_and_infers_from_an_inflated_rgb_backbone(tmp_path, capsys):
    root = four_band_dataset(tmp_path / 'bands')
    torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'resnet18.pth')
    config = tmp_path / 'bands.yaml'
    config.write_text(
        f'backbone: {{type: resnet, variant: 18, pretrained: {tmp_path / "resnet18.pth"}}}\n'
        'head: {type: fcn, channels: 8}\n'
        f'data: {{type: folder, root: {root}, num_classes: 2, in_channels: 4, workers: 0,\n'
        '       mean: [10000, 10000, 10000, 20000], std: [6000, 6000, 6000, 20000],\n'
        '       train: {pipeline: [{type: random_crop, size: [48, 48]}, {type: random_flip}]}}\n'
        'train: {max_iters: 2, batch_size: 2, val_interval: 2}\n'
    )
    train.main(['--config', str(config), '--work-dir', str(tmp_path / 'work'), '--device', 'cpu'])
    log = (tmp_path / 'work' / 'train.log').read_text()
    assert 'inflated body.conv1.weight (3 -> 4 input channels)' in log and 'iter 2: mIoU' in log
    output = tmp_path / 'predictions'
    checkpoint = tmp_path / 'work' / 'best.pth'
    infer.main(['--checkpoint', str(checkpoint), '--input', str(root / 'images' / 'val'), '--output', str(output)])
    assert np.asarray(Image.open(output / '0.png')).shape == (64, 64)  # the class ids
    assert cv2.imread(str(output / '0_overlay.jpg')).shape[1:] == (64, 3)
    assert '4 images predicted' in capsys.readouterr().out


def test_statistics_and_rgb_only_steps_are_checked_against_the_bands(tmp_path):
    root = four_band_dataset(tmp_path / 'bands', count=1)
    base = [f'data.root={root}', 'data.in_channels=4']
    with pytest.raises(ConfigError, match='data.mean has 3 values for data.in_channels 4: give one per band'):
        load_bands_config(tmp_path, base)
    with pytest.raises(ConfigError, match=r"'data.train.pipeline\[0\]' \(photometric\) works on 8-bit RGB images"):
        statistics = ['data.mean=[0, 0, 0, 0]', 'data.std=[1, 1, 1, 1]']
        load_bands_config(tmp_path, [*base, *statistics, 'data.train.pipeline=[{type: photometric}]'])


def load_bands_config(tmp_path, overrides):
    config = tmp_path / 'c.yaml'
    config.write_text(
        'backbone: {type: resnet, variant: 18}\nhead: {type: fcn}\n'
        'data: {type: folder, root: x, num_classes: 2}\ntrain: {max_iters: 1, batch_size: 1}\n'
    )
    return load_config(config, overrides)


@pytest.mark.parametrize('kind', list(BACKBONES))
def test_every_backbone_takes_other_band_counts(kind):
    backbone = BACKBONES[kind]('test').eval()
    take_input_channels(backbone, 4)
    side = 56 if kind == 'dinov2' else 64  # DINOv2's patch grid with its pyramid: multiples of 28
    with torch.no_grad():
        assert len(backbone(torch.randn(1, 4, side, side))) == 4
