"""Datasets: each reads its on-disk layout and yields (uint8 image (3,H,W), int64 label (H,W)).

`DATASETS` maps `data.type` to the class; see datasets/README.md for each one's expected layout."""

import cv2

# OpenCV's own thread pool does not survive fork(): a data-loader worker forked from a process whose
# pool has started (the dataset scan reads files from threads) deadlocks as soon as OpenCV touches
# the pool. Loading is parallel across worker processes instead, so OpenCV runs single-threaded,
# set here before any of this package's OpenCV calls.
cv2.setNumThreads(0)

from .ade20k import ADE20K
from .base import DatasetError, DatasetWarning, SegmentationDataset
from .camvid import CamVid
from .cityscapes import Cityscapes
from .coco_stuff import COCOStuff
from .demo import DemoScenes
from .folder import FolderDataset
from .pascal_context import PascalContext59
from .voc import PascalVOC

DATASETS = {
    'ade20k': ADE20K,
    'cityscapes': Cityscapes,
    'coco_stuff': COCOStuff,
    'pascal_context': PascalContext59,
    'voc': PascalVOC,
    'camvid': CamVid,
    'folder': FolderDataset,
    'demo': DemoScenes,
}
