"""Reading a shapes picture back: background, the shape's colour, kind and position, by simple image analysis.

The background is the median colour of the border; the shape is every pixel far enough from it. Colours go
to the nearest palette entry; the position to the nearest anchor of :data:`~.data.ANCHORS`; the kind from
how much of its bounding box the shape fills (square ~1, circle ~pi/4, triangle ~1/2) and how its area
splits between the top and bottom halves (an upright triangle keeps three quarters below its middle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import ANCHORS, COLORS, IMAGE_SIZE

# A pixel belongs to the shape when its RGB distance from the background exceeds this share of the distance
# from the background's palette colour to the nearest other palette colour (orange and yellow are close).
FOREGROUND_SHARE = 0.5
MIN_AREA = 12  # pixels; fewer means no shape was drawn


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


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - rgb[None]) ** 2).sum(1)))]


def _nearest_other_distance(name: str) -> float:
    ref = np.array(COLORS[name], dtype=np.float64)
    return min(float(np.sqrt(((np.array(c, dtype=np.float64) - ref) ** 2).sum())) for n, c in COLORS.items()
               if n != name)


def classify_kind(fill: float, bottom_share: float) -> str:
    """Square, circle or triangle from the fill ratio and the bottom-half share of the area."""
    if fill < 0.66 or bottom_share > 0.64:
        return "triangle"
    return "square" if fill > 0.92 else "circle"


def read_image(image: np.ndarray) -> Reading:
    """Analyse ``uint8 [H, W, 3]`` (64 x 64 as the model draws; other sizes are scaled by the anchors)."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = nearest_color(bg)
    mask = np.sqrt(((img - bg) ** 2).sum(-1)) > FOREGROUND_SHARE * _nearest_other_distance(background)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Reading(background, None, None, None, area, 0.0, 0.0)
    ys, xs = np.nonzero(mask)
    color = nearest_color(np.median(img[mask], axis=0))
    cx, cy = xs.mean() / w * IMAGE_SIZE, ys.mean() / h * IMAGE_SIZE
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] * IMAGE_SIZE - cx) ** 2
                   + (ANCHORS[p][1] * IMAGE_SIZE - cy) ** 2)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = area / float((y1 - y0 + 1) * (x1 - x0 + 1))
    bottom_share = float((ys > (y0 + y1) / 2).sum() + 0.5 * (ys == (y0 + y1) / 2).sum()) / area
    return Reading(background, color, classify_kind(fill, bottom_share), position, area, fill, bottom_share)
