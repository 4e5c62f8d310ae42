"""Datasets: each reads its on-disk layout and yields (uint8 image (3,H,W), int64 label (H,W))."""
from .base import DatasetError, SegmentationDataset
from .camvid import CamVid
from .demo import DemoScenes

DATASETS = {
    'folder': SegmentationDataset,
    'camvid': CamVid,
    'demo': DemoScenes,
}
