"""Any dataset on disk, its layout and label encoding described in YAML (`data.type: folder`).

    data:
      type: folder
      root: data/roads
      image_dir: images/{split}       # relative to root; {split} is data.train.split / data.val.split
      label_dir: annotations/{split}
      image_suffix: null              # null: any image extension (it may differ from the label's)
      label_suffix: .png              # e.g. _mask.png when x.jpg pairs with x_mask.png
      split_file: null                # e.g. splits/{split}.txt: names to use, one a line
      label_map: {0: 255, 1: 0, 2: 1} # raw value -> train id; unlisted values stay as they are
      label_colors: null              # RGB labels: [[r, g, b], ...] (index = value) or {value: [r, g, b]}

Grey 8/16-bit PNGs hold class ids; palette-mode PNGs are read as their indices. With label_colors,
labels are colour images: each colour becomes its value, and label_map and reduce_zero_label then
apply as for any label; a colour missing from the table is reported by the scan.
"""

from .base import DatasetError, SegmentationDataset, is_color
from .labels import LABEL_VALUES


class FolderDataset(SegmentationDataset):
    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        image_dir: str = 'images/{split}',
        label_dir: str = 'annotations/{split}',
        image_suffix: str | None = None,
        label_suffix: str = '.png',
        split_file: str | None = None,
        label_map: dict | None = None,
        label_colors: dict | list | None = None,
        **kwargs,
    ):
        self.IMAGE_DIR, self.LABEL_DIR, self.SPLIT_FILE = image_dir, label_dir, split_file
        self.IMAGE_SUFFIX, self.LABEL_SUFFIX = image_suffix, label_suffix
        self.LABEL_MAP = check_label_map(label_map, num_classes, kwargs.get('ignore_index', 255))
        self.LABEL_COLORS = check_label_colors(label_colors)
        super().__init__(root, split, num_classes, **kwargs)


def check_label_map(label_map, num_classes: int, ignore_index: int):
    if not label_map:
        return None
    for raw, train_id in label_map.items():
        if not (isinstance(raw, int) and 0 <= raw < LABEL_VALUES):
            raise DatasetError(f'data.label_map: key {raw!r} is not a label value (an integer in [0, {LABEL_VALUES}))')
        if not (isinstance(train_id, int) and (0 <= train_id < num_classes or train_id == ignore_index)):
            raise DatasetError(
                f'data.label_map: {raw} -> {train_id!r}; expected a train id in [0, {num_classes}) '
                f'or the ignore index {ignore_index}'
            )
    return label_map


def check_label_colors(label_colors):
    """{value: (r, g, b)} from a list (index = value) or a mapping."""
    if not label_colors:
        return None
    colors = dict(enumerate(label_colors)) if isinstance(label_colors, list) else label_colors
    for value, rgb in colors.items():
        if not (isinstance(value, int) and 0 <= value < LABEL_VALUES) or not is_color(rgb):
            raise DatasetError(
                f'data.label_colors: {value!r}: {rgb!r}; expected a label value and an [r, g, b] colour (0-255)'
            )
    return colors
