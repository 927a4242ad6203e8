"""Reading a shapes picture back: background, the shape's colour, kind and position, by simple image analysis.

The background is the median colour of the border; the shape is every pixel far enough from it. Colours go
to the nearest palette entry; the position to the nearest anchor of :data:`~.data.ANCHORS`; the kind from
how its area splits between the top and bottom halves of its bounding box (an upright triangle keeps three
quarters below its middle) and whether it fills the box's corners (a square does, a circle does not).
Only the largest connected region counts as the shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import ANCHORS, COLORS, IMAGE_SIZE

# A pixel belongs to the shape when its RGB distance from the background exceeds this share of the distance
# from the background's palette colour to the nearest other palette colour (orange and yellow are close).
FOREGROUND_SHARE = 0.5
MIN_AREA = 12  # pixels; fewer means no shape was drawn
CORNER = 0.2  # corner patches: this share of the bounding box's height and width


@dataclass(frozen=True)
class Reading:
    """What the analysis found in one picture (``None``: no shape found)."""

    background: str
    color: str | None
    shape: str | None
    position: str | None
    area: int
    fill: float  # shape area / bounding-box area
    bottom_share: float  # share of the area below the bounding box's middle
    corner_fill: float  # how much of the bounding box's four corner patches the shape covers


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - rgb[None]) ** 2).sum(1)))]


def _nearest_other_distance(name: str) -> float:
    ref = np.array(COLORS[name], dtype=np.float64)
    return min(float(np.sqrt(((np.array(c, dtype=np.float64) - ref) ** 2).sum())) for n, c in COLORS.items()
               if n != name)


def classify_kind(fill: float, bottom_share: float, corner_fill: float) -> str:
    """Square, circle or triangle from the bounding-box fill, the bottom-half share and the corner fill.

    An upright triangle keeps about three quarters of its area below its middle (and fills half its box);
    a square fills its box's corners, a circle leaves them empty. Blurred edges round squares and triangles
    off, so the corners decide between square and circle rather than the fill alone.
    """
    if bottom_share > 0.58 or fill < 0.6:
        return "triangle"
    return "square" if corner_fill > 0.42 or fill > 0.865 else "circle"


def read_image(image: np.ndarray) -> Reading:
    """Analyse ``uint8 [H, W, 3]`` (64 x 64 as the model draws; other sizes are scaled by the anchors)."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = nearest_color(bg)
    distance = np.sqrt(((img - bg) ** 2).sum(-1))
    mask = largest_component(distance > FOREGROUND_SHARE * _nearest_other_distance(background))
    area = int(mask.sum())
    if area < MIN_AREA:
        return Reading(background, None, None, None, area, 0.0, 0.0, 0.0)
    ys, xs = np.nonzero(mask)
    color = nearest_color(np.median(img[mask], axis=0))
    cx, cy = xs.mean() / w * IMAGE_SIZE, ys.mean() / h * IMAGE_SIZE
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] * IMAGE_SIZE - cx) ** 2
                   + (ANCHORS[p][1] * IMAGE_SIZE - cy) ** 2)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = area / float((y1 - y0 + 1) * (x1 - x0 + 1))
    bottom_share = float((ys > (y0 + y1) / 2).sum() + 0.5 * (ys == (y0 + y1) / 2).sum()) / area
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    ch, cw = max(1, round(CORNER * box.shape[0])), max(1, round(CORNER * box.shape[1]))
    corner_fill = float(np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(),
                                 box[-ch:, -cw:].mean()]))
    return Reading(background, color, classify_kind(fill, bottom_share, corner_fill), position, area, fill,
                   bottom_share, corner_fill)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (stray pixels elsewhere are not the shape)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        current += 1
        labels[y, x] = current
        stack, size = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask
