"""Pascal VOC 2012, 21 classes (0 = background; 255 = the void band around objects, ignored), in the
devkit layout (root = VOCdevkit/VOC2012):

    JPEGImages/2007_000032.jpg    SegmentationClass/2007_000032.png     ImageSets/Segmentation/{train,val}.txt
                                  SegmentationClassAug/2007_000032.png  ImageSets/Segmentation/aug.txt

SegmentationClass holds palette-mode PNGs, whose indices are the class ids (read as such, not as
colours). Split `train_aug` is mmseg's 10,582-image training set: train.txt with SegmentationClass,
then the SBD images of aug.txt with SegmentationClassAug (grey PNGs from mmseg's voc_aug converter);
a name in both lists is used once, with its SegmentationClass label.
"""

from .base import SegmentationDataset, Source


def voc_palette(count: int) -> list:
    """The VOC colour map: the bits of the index spread over R, G and B from the high bit down
    (1 -> (128, 0, 0), 255 -> (224, 224, 192))."""
    palette = []
    for index in range(count):
        rgb, bits = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette.append(rgb)
    return palette


class PascalVOC(SegmentationDataset):
    CLASS_NAMES = [
        'background',
        'aeroplane',
        'bicycle',
        'bird',
        'boat',
        'bottle',
        'bus',
        'car',
        'cat',
        'chair',
        'cow',
        'diningtable',
        'dog',
        'horse',
        'motorbike',
        'person',
        'pottedplant',
        'sheep',
        'sofa',
        'train',
        'tvmonitor',
    ]
    PALETTE = voc_palette(21)
    IMAGE_DIR, LABEL_DIR = 'JPEGImages', 'SegmentationClass'
    IMAGE_SUFFIX = '.jpg'
    SPLIT_FILE = 'ImageSets/Segmentation/{split}.txt'
    VOID_VALUES = (255,)

    def layout(self, split: str) -> list:
        if split != 'train_aug':
            return super().layout(split)
        return [
            Source('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation/train.txt'),
            Source('JPEGImages', 'SegmentationClassAug', 'ImageSets/Segmentation/aug.txt'),
        ]
