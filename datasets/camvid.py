"""CamVid (Brostow et al. 2009), the 11-class 480x360 SegNet version, in the folder layout of
../shared/data/camvid: `images/<split>/*.jpg` + `annotations/<split>/*.png`. Label 11 ("Unlabelled")
becomes the ignore index, so data.ignore_index may be 11 or the usual 255."""

from .base import SegmentationDataset


class CamVid(SegmentationDataset):
    CLASS_NAMES = [
        'sky',
        'building',
        'pole',
        'road',
        'pavement',
        'tree',
        'sign_symbol',
        'fence',
        'car',
        'pedestrian',
        'bicyclist',
    ]
    PALETTE = [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
    ]
    VOID_VALUES = (11,)
