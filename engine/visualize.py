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
CHART_ENDS = 20  # an IoU chart of more classes draws the best and the worst this many
ANNOTATED_CLASSES = 30  # a confusion matrix of more classes draws this many, the most confused
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


def displayable(image: np.ndarray) -> np.ndarray:
    """An (H, W, C) image of any bands and depth as an 8-bit RGB picture: its first three bands (the
    first in grey where there are fewer), 16-bit ones each stretched between its 1st and 99th percentile."""
    bands = image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)
    if bands.dtype == np.uint8:
        return np.ascontiguousarray(bands)
    low, high = np.percentile(bands, [1, 99], axis=(0, 1))
    return np.clip((bands - low) / np.maximum(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)


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
    """One evaluated sample as `evaluate` hands it over, (C, h, w) image as fed to the model and
    (H, W) label and prediction on any device: image | ground truth | prediction at the label's size,
    captioned, above a legend of the classes found in the label or the prediction."""
    return panels(image, {'ground truth': label, 'prediction': prediction}, style, opacity)


def panels(image: torch.Tensor, maps: dict, style: ClassStyle, opacity: float = 0.5) -> np.ndarray:
    """The (C, h, w) `image` (`displayable`), then for each {caption: (H, W) class ids} the image with those ids
    blended in, side by side at the maps' size and captioned, above a legend of the classes in any map
    (and the hatch, where a map has ignored pixels)."""
    maps = {caption: ids.cpu().numpy() for caption, ids in maps.items()}
    zoom = -(-MIN_PANEL // next(iter(maps.values())).shape[1])  # a tiny sample is enlarged, pixels kept sharp
    if zoom > 1:
        maps = {caption: np.kron(ids, np.ones((zoom, zoom), ids.dtype)) for caption, ids in maps.items()}
    height, width = next(iter(maps.values())).shape
    image = displayable(image.permute(1, 2, 0).cpu().numpy())
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
    """Per-class IoU (%) as bars in the class colours, best first. With many classes only the best and
    the worst `CHART_ENDS` each are drawn, the rest counted in between; classes in neither label nor
    prediction (no IoU) are counted in the title, not drawn."""
    iou = np.asarray(iou, dtype=float)
    scored = np.flatnonzero(~np.isnan(iou))
    order = scored[np.argsort(-iou[scored], kind='stable')]
    rows = list(order) if len(order) <= 2 * CHART_ENDS else [*order[:CHART_ENDS], None, *order[-CHART_ENDS:]]
    figure = Figure(figsize=(7, 1.2 + 0.22 * len(rows)), dpi=100, layout='constrained')
    axes = figure.add_subplot()
    positions = np.arange(len(rows))
    values = [0.0 if row is None else iou[row] for row in rows]
    colours = [(1, 1, 1) if row is None else style.palette[row] / 255 for row in rows]
    bars = axes.barh(positions, values, color=colours, edgecolor='black', linewidth=0.5)
    axes.bar_label(bars, ['' if row is None else f'{iou[row]:.1f}' for row in rows], padding=2, fontsize=8)
    names = [f'... {len(order) - 2 * CHART_ENDS} more' if row is None else style.names[row] for row in rows]
    absent = len(iou) - len(scored)
    title = f'mIoU {np.nanmean(iou):.2f}' if len(scored) else 'no class scored'
    axes.set(
        yticks=positions,
        yticklabels=names,
        xlim=(0, 105),
        xlabel='IoU (%)',
        title=title + (f'; {absent} of {len(iou)} classes in neither label nor prediction' if absent else ''),
    )
    axes.invert_yaxis()
    return figure_pixels(figure)


def confusion_heatmap(matrix, style: ClassStyle) -> np.ndarray:
    """The confusion matrix with each row (a ground-truth class) divided by its pixel count: where the
    pixels of each class went, the cells annotated. With more than `ANNOTATED_CLASSES` classes only
    the classes of the largest confusions (off-diagonal cells) are drawn, the pairs worth reading."""
    matrix = np.asarray(matrix, dtype=float)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    shown, title = np.arange(len(matrix)), None
    if len(matrix) > ANNOTATED_CLASSES:
        shown = most_confused(rows, ANNOTATED_CLASSES)
        title = f'the {len(shown)} classes of the largest confusions, of {len(matrix)}'
    rows, count = rows[np.ix_(shown, shown)], len(shown)
    cell = 0.45  # inches
    figure = Figure(figsize=(2.5 + cell * count, 2 + cell * count), dpi=100, layout='constrained')
    axes = figure.add_subplot()
    image = axes.imshow(rows, cmap='Blues', vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.04, label='fraction of the ground-truth row')
    ticks, names = np.arange(count), [style.names[i] for i in shown]
    axes.set_xticks(ticks, names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, names, fontsize=8)
    axes.set(xlabel='prediction', ylabel='ground truth', title=title)
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


def most_confused(rows: np.ndarray, count: int) -> np.ndarray:
    """The classes (sorted) of the largest off-diagonal cells of `rows`, taken pair by pair until `count`."""
    confused = rows - np.diag(np.diag(rows))
    chosen = []
    for cell in np.argsort(-confused, axis=None, kind='stable'):
        for index in np.unravel_index(cell, rows.shape):
            if index not in chosen and len(chosen) < count:
                chosen.append(int(index))
        if len(chosen) == count or confused.flat[cell] == 0:
            break
    return np.sort(chosen)
