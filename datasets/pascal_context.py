"""Pascal Context-59 (VOC 2010 images with the Detail API's labels), in mmseg's layout
(root = VOCdevkit/VOC2010):

    JPEGImages/2008_000002.jpg    SegmentationClassContext/2008_000002.png
    ImageSets/SegmentationContext/{train,val}.txt

The label PNGs are those written by mmseg's pascal_context converter: the 59 selected classes as
1..59 and 0 for everything else. The 59-class setting applies reduce_zero_label (0 -> ignore,
k -> k - 1), always. The palette is mmseg's: ADE20K's colours 1..59 (its 60-class setting uses 0..59).
"""

from .ade20k import ADE20K
from .base import SegmentationDataset


class PascalContext59(SegmentationDataset):
    CLASS_NAMES = [
        'aeroplane',
        'bag',
        'bed',
        'bedclothes',
        'bench',
        'bicycle',
        'bird',
        'boat',
        'book',
        'bottle',
        'building',
        'bus',
        'cabinet',
        'car',
        'cat',
        'ceiling',
        'chair',
        'cloth',
        'computer',
        'cow',
        'cup',
        'curtain',
        'dog',
        'door',
        'fence',
        'floor',
        'flower',
        'food',
        'grass',
        'ground',
        'horse',
        'keyboard',
        'light',
        'motorbike',
        'mountain',
        'mouse',
        'person',
        'plate',
        'platform',
        'pottedplant',
        'road',
        'rock',
        'sheep',
        'shelves',
        'sidewalk',
        'sign',
        'sky',
        'snow',
        'sofa',
        'table',
        'track',
        'train',
        'tree',
        'truck',
        'tvmonitor',
        'wall',
        'water',
        'window',
        'wood',
    ]
    PALETTE = ADE20K.PALETTE[1:60]
    IMAGE_DIR, LABEL_DIR = 'JPEGImages', 'SegmentationClassContext'
    IMAGE_SUFFIX = '.jpg'
    SPLIT_FILE = 'ImageSets/SegmentationContext/{split}.txt'
    REDUCE_ZERO_LABEL = True
