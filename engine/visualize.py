"""Pictures of predictions for people to look at: class colours blended on images, legends, the
image | ground truth | prediction comparison, and per-class IoU and confusion charts. Shared by
evaluate.py (--show-dir), infer.py and the TensorBoard images of train.py. Pictures are RGB uint8
(H, W, 3) arrays; engine/outputs.py writes them.
"""

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FONT, FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.45
ROW = 20  # height of a legend or caption row, pixels
SWATCH = 12  # side of a legend colour square
GAP = 14  # space after each legend entry
MIN_PANEL = 48  # narrower samples are enlarged to at least this width per panel
BLACK = (0, 0, 0)


@dataclass(frozen=True)
class ClassStyle:
    """What a picture needs to know about the classes: names, RGB colours (num_classes, 3) uint8,
    and the label value that marks ignored pixels."""

    names: list
    palette: np.ndarray
    ignore_index: int = 255

    @classmethod
    def of(cls, dataset) -> 'ClassStyle':
        return cls(dataset.class_names, dataset.palette, dataset.ignore_index)


def hatch(shape: tuple) -> np.ndarray:
    """Black and white diagonal stripes: marks ignored pixels, and reads as no class colour."""
    y, x = np.indices(shape)
    stripes = ((x + y) // 3 % 2 * 255).astype(np.uint8)
    return np.repeat(stripes[..., None], 3, axis=2)


def overlay(image: np.ndarray, ids: np.ndarray, style: ClassStyle, opacity: float = 0.5) -> np.ndarray:
    """`image` with the colours of the class ids `ids` (H, W) blended in at `opacity`, ignored pixels
    hatched, and the borders between regions drawn in white: blended at about half weight, dark
    class colours (CamVid's car, pedestrian) would otherwise read as shadows."""
    ignored = ids == style.ignore_index
    colours = style.palette[np.where(ignored, 0, ids)]
    blended = cv2.addWeighted(image, 1 - opacity, colours, opacity, 0)
    blended[ignored] = hatch(ids.shape)[ignored]
    borders = np.zeros(ids.shape, bool)
    borders[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    borders[1:] |= ids[1:] != ids[:-1]
    blended[borders] = 255
    return blended


def text_width(text: str) -> int:
    return cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0]


def put_text(canvas: np.ndarray, text: str, x: int, row_top: int) -> None:
    cv2.putText(canvas, text, (x, row_top + ROW - 6), FONT, FONT_SCALE, BLACK, 1, cv2.LINE_AA)


def legend(class_ids, style: ClassStyle, width: int, ignored: bool = False) -> np.ndarray:
    """A white strip `width` (>= 20) pixels wide with a colour square and the name of each class in
    `class_ids` (and the hatch for 'ignored'), left to right in rows."""
    entries = [(style.names[i], np.broadcast_to(style.palette[i], (SWATCH, SWATCH, 3))) for i in class_ids]
    if ignored:
        entries.append(('ignored', hatch((SWATCH, SWATCH))))
    placed, x, y = [], GAP // 2, 0
    for name, swatch in entries:
        entry_width = SWATCH + 4 + text_width(name) + GAP
        if x + entry_width > width and x > GAP // 2:
            x, y = GAP // 2, y + ROW
        placed.append((x, y, name, swatch))
        x += entry_width
    strip = np.full((y + ROW, width, 3), 255, np.uint8)
    for x, y, name, swatch in placed:
        top = y + (ROW - SWATCH) // 2
        strip[top : top + SWATCH, x : x + SWATCH] = swatch
        cv2.rectangle(strip, (x, top), (x + SWATCH - 1, top + SWATCH - 1), BLACK, 1)  # light colours on white
        put_text(strip, name, x + SWATCH + 4, y)
    return strip


def side_by_side(
    image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor, style: ClassStyle, opacity: float = 0.5
) -> np.ndarray:
    """One evaluated sample as `evaluate` hands it over, (3, h, w) uint8 image as fed to the model and
    (H, W) label and prediction on any device: image | ground truth | prediction at the label's size,
    captioned, above a legend of the classes found in the label or the prediction."""
    return panels(image, {'ground truth': label, 'prediction': prediction}, style, opacity)


def panels(image: torch.Tensor, maps: dict, style: ClassStyle, opacity: float = 0.5) -> np.ndarray:
    """The (3, h, w) uint8 `image`, then for each {caption: (H, W) class ids} the image with those ids
    blended in, side by side at the maps' size and captioned, above a legend of the classes in any map
    (and the hatch, where a map has ignored pixels)."""
    maps = {caption: ids.cpu().numpy() for caption, ids in maps.items()}
    zoom = -(-MIN_PANEL // next(iter(maps.values())).shape[1])  # a tiny sample is enlarged, pixels kept sharp
    if zoom > 1:
        maps = {caption: np.kron(ids, np.ones((zoom, zoom), ids.dtype)) for caption, ids in maps.items()}
    height, width = next(iter(maps.values())).shape
    image = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    if image.shape[:2] != (height, width):
        interpolation = cv2.INTER_NEAREST if zoom > 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    shown = [image, *(overlay(image, ids, style, opacity) for ids in maps.values())]
    captions = np.full((ROW, len(shown) * width, 3), 255, np.uint8)
    for i, caption in enumerate(('image', *maps)):
        put_text(captions, caption, i * width + max((width - text_width(caption)) // 2, 0), 0)
    ignored = [ids == style.ignore_index for ids in maps.values()]
    present = np.unique(np.concatenate([ids[~skip] for ids, skip in zip(maps.values(), ignored)]))
    strip = legend(present, style, len(shown) * width, any(skip.any() for skip in ignored))
    return np.vstack([captions, np.hstack(shown), strip])


def figure_pixels(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def iou_chart(iou, style: ClassStyle) -> np.ndarray:
    """Per-class IoU (%) as bars in the class colours; a class in neither label nor prediction is 'n/a'."""
    iou = np.asarray(iou, dtype=float)
    rows = np.arange(len(iou))
    figure = Figure(figsize=(7, 1 + 0.22 * len(iou)), dpi=100, layout='constrained')
    axes = figure.add_subplot()
    bars = axes.barh(rows, np.nan_to_num(iou), color=style.palette / 255, edgecolor='black', linewidth=0.5)
    axes.bar_label(bars, ['n/a' if np.isnan(v) else f'{v:.1f}' for v in iou], padding=2, fontsize=8)
    axes.set(
        yticks=rows,
        yticklabels=style.names,
        xlim=(0, 105),
        xlabel='IoU (%)',
        title=f'mIoU {np.nanmean(iou):.2f}' if not np.isnan(iou).all() else 'no class scored',
    )
    axes.invert_yaxis()
    return figure_pixels(figure)


def confusion_heatmap(matrix, style: ClassStyle) -> np.ndarray:
    """The confusion matrix with each row (a ground-truth class) divided by its pixel count: where the
    pixels of each class went. Cells are annotated when there are few enough classes to read them."""
    matrix = np.asarray(matrix, dtype=float)
    count = len(matrix)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    annotate = count <= 30
    cell = 0.45 if annotate else 0.11  # inches
    figure = Figure(figsize=(2.5 + cell * count, 2 + cell * count), dpi=100, layout='constrained')
    axes = figure.add_subplot()
    image = axes.imshow(rows, cmap='Blues', vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.04, label='fraction of the ground-truth row')
    ticks = np.arange(count)
    fontsize = 8 if annotate else 5
    axes.set_xticks(ticks, style.names, rotation=90, fontsize=fontsize)
    axes.set_yticks(ticks, style.names, fontsize=fontsize)
    axes.set(xlabel='prediction', ylabel='ground truth')
    if annotate:
        for (row, column), value in np.ndenumerate(rows):
            if value >= 0.005:
                axes.text(
                    column,
                    row,
                    f'{100 * value:.0f}',
                    ha='center',
                    va='center',
                    fontsize=7,
                    color='white' if value > 0.5 else 'black',
                )
    return figure_pixels(figure)
