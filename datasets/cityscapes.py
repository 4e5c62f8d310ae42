"""Cityscapes (gtFine), 19 classes, in its own layout (as mmseg reads it):

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       (labels: label_ids, default)
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (labels: train_ids)

`label_ids` reads the files as downloaded and maps the 34 label ids to the 19 train ids (7 road -> 0,
..., 33 bicycle -> 18; everything else, e.g. caravan 29, trailer 30, license plate, -> ignore), so no
conversion script is needed. `train_ids` reads files already converted (cityscapesscripts'
createTrainIdLabelImgs or mmseg's converter), where 255 is ignore.
"""

from .base import DatasetError, SegmentationDataset

LABEL_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
LABEL_SUFFIXES = {'label_ids': '_gtFine_labelIds.png', 'train_ids': '_gtFine_labelTrainIds.png'}


class Cityscapes(SegmentationDataset):
    CLASS_NAMES = [
        'road',
        'sidewalk',
        'building',
        'wall',
        'fence',
        'pole',
        'traffic light',
        'traffic sign',
        'vegetation',
        'terrain',
        'sky',
        'person',
        'rider',
        'car',
        'truck',
        'bus',
        'train',
        'motorcycle',
        'bicycle',
    ]
    PALETTE = [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
    ]
    IMAGE_DIR, LABEL_DIR = 'leftImg8bit/{split}', 'gtFine/{split}'
    IMAGE_SUFFIX = '_leftImg8bit.png'

    def __init__(self, root: str, split: str, num_classes: int, labels: str = 'label_ids', **kwargs):
        if labels not in LABEL_SUFFIXES:
            raise DatasetError(f'data.labels must be one of {list(LABEL_SUFFIXES)} for cityscapes, got {labels!r}')
        self.LABEL_SUFFIX = LABEL_SUFFIXES[labels]
        if labels == 'label_ids':
            self.LABEL_MAP, self.UNLISTED_IGNORED = LABEL_ID_TO_TRAIN_ID, True
        else:
            self.VOID_VALUES = (255,)
        super().__init__(root, split, num_classes, **kwargs)
