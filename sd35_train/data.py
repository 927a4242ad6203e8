"""The shapes data set: seeded 64x64 pictures of one shape on a plain background, with captions.

Every picture is drawn from a :class:`ShapeSpec` (colours, shape, position, size and offset), and the spec
from a seed, so sample ``i`` of split seed ``s`` is the same everywhere. Captions follow
``"a {color} {shape} on the {position} of a {background} background"``; training also sees two rewordings
so the model keys on the words rather than on one exact sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth, deterministic edges

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
# Where each position puts the shape's centre, as fractions of the image side (x, y); 0.24 = the largest
# shape (HALF_SIZE) at the largest offset (JITTER) from it still stays inside the picture.
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.24, 0.5),
    "right": (0.76, 0.5),
    "top": (0.5, 0.24),
    "bottom": (0.5, 0.76),
    "center": (0.5, 0.5),
}
HALF_SIZE = (0.15, 0.20)  # half the shape's extent, as a fraction of the side (min, max)
JITTER = 0.04  # centre offset from the anchor, at most, as a fraction of the side
COLOR_JITTER = 8  # per-channel colour variation, at most

TEMPLATE = "a {color} {shape} on the {position} of a {background} background"
REWORDINGS = (
    "a {color} {shape} on the {position}, {background} background",
    "{color} {shape}, {position}, on a {background} background",
)


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one picture."""

    color: str
    shape: str
    position: str
    background: str
    half_size: float  # fraction of the side
    dx: float  # centre offset from the anchor, fraction of the side
    dy: float
    color_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the shape in pixels (x, y)."""
        ax, ay = ANCHORS[self.position]
        return (ax + self.dx) * IMAGE_SIZE, (ay + self.dy) * IMAGE_SIZE

    def caption(self, wording: int = 0) -> str:
        """The caption: wording 0 is the template; 1 and 2 are the rewordings used in training."""
        template = TEMPLATE if wording == 0 else REWORDINGS[wording - 1]
        return template.format(color=self.color, shape=self.shape, position=self.position,
                               background=self.background)


def _jitter_rgb(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def random_spec(rng: random.Random, color: str | None = None, shape: str | None = None,
                position: str | None = None, background: str | None = None) -> ShapeSpec:
    """Draw a spec from ``rng``; attributes given explicitly are kept (colour and background must differ)."""
    names = list(COLORS)
    color = color or rng.choice(names)
    background = background or rng.choice([c for c in names if c != color])
    if background == color:
        raise ValueError(f"background: must differ from the shape's colour; both are {color!r}")
    shape = shape or rng.choice(SHAPES)
    position = position or rng.choice(POSITIONS)
    return ShapeSpec(
        color=color,
        shape=shape,
        position=position,
        background=background,
        half_size=rng.uniform(*HALF_SIZE),
        dx=rng.uniform(-JITTER, JITTER),
        dy=rng.uniform(-JITTER, JITTER),
        color_rgb=_jitter_rgb(rng, COLORS[color]),
        background_rgb=_jitter_rgb(rng, COLORS[background]),
    )


def spec_for(split_seed: int, index: int) -> ShapeSpec:
    """Sample ``index`` of the split with seed ``split_seed`` (independent of every other sample)."""
    return random_spec(random.Random(f"shapes/{split_seed}/{index}"))


def _draw(draw: ImageDraw.ImageDraw, spec: ShapeSpec, fill) -> None:
    """Draw ``spec``'s shape at :data:`SUPERSAMPLE` times the picture's size."""
    s = IMAGE_SIZE * SUPERSAMPLE
    cx, cy = (v * SUPERSAMPLE for v in spec.centre)
    r = spec.half_size * s
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "square":
        # As wide as the circle: its corners, a fifth of its area, are all that tells the two apart
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "triangle":
        # Upright isosceles triangle with its bounding box centred on the centre.
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)}; got {spec.shape!r}")


def render(spec: ShapeSpec) -> np.ndarray:
    """The picture of ``spec`` as ``uint8 [64, 64, 3]``."""
    s = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("RGB", (s, s), spec.background_rgb)
    _draw(ImageDraw.Draw(img), spec, spec.color_rgb)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8)


def render_mask(spec: ShapeSpec) -> np.ndarray:
    """Where :func:`render` puts the shape: ``bool [64, 64]``, pixels at least half covered."""
    s = IMAGE_SIZE * SUPERSAMPLE
    img = Image.new("L", (s, s), 0)
    _draw(ImageDraw.Draw(img), spec, 255)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8) >= 128


def all_captions() -> list[str]:
    """Every caption the training set can contain (all attribute combinations, every wording), sorted."""
    out = []
    for color in COLORS:
        for background in COLORS:
            if background == color:
                continue
            for shape in SHAPES:
                for position in POSITIONS:
                    for wording in range(1 + len(REWORDINGS)):
                        spec = ShapeSpec(color, shape, position, background, 0.0, 0.0, 0.0, (0, 0, 0), (0, 0, 0))
                        out.append(spec.caption(wording))
    return sorted(out)
