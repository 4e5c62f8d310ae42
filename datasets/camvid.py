"""CamVid (Brostow et al. 2009), the 11-class 480x360 SegNet version; label 11 ("Unlabelled") is ignored."""
from .base import SegmentationDataset


class CamVid(SegmentationDataset):
    CLASS_NAMES = ['sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign_symbol', 'fence', 'car',
                   'pedestrian', 'bicyclist']
    PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
               [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
