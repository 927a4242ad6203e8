"""The training loss curves as a PNG, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 360, 260, 46
TITLES = {"vae": "VAE (shape-weighted L1 + L2 + KL)", "mmdit": "MMDiT-X (rectified flow)",
          "controlnet": "ControlNet (flow, base frozen)"}


def _smooth(values: Sequence[float], k: int = 4) -> list[float]:
    """Centred moving average over ``2k + 1`` points (fewer at the ends)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k) : i + k + 1]
        out.append(sum(window) / len(window))
    return out


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, points: Sequence[tuple[int, float]]) -> None:
    left, top, right, bottom = x0 + MARGIN, MARGIN - 16, x0 + PANEL_W - 12, PANEL_H - 30
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    draw.text((left, 6), title, fill=(20, 20, 20))
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(150, 0, 0))
        return
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = min(steps), max(steps)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (loss - lo) / (hi - lo) * (bottom - top))

    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = bottom - frac * (bottom - top)
        draw.line([left - 4, y, left, y], fill=(90, 90, 90))
        draw.text((x0 + 4, y - 6), f"{value:.3f}", fill=(60, 60, 60))
    for frac in (0.0, 0.5, 1.0):
        step = s0 + frac * (s1 - s0)
        x = left + frac * (right - left)
        draw.line([x, bottom, x, bottom + 4], fill=(90, 90, 90))
        draw.text((x - 12, bottom + 6), f"{int(step)}", fill=(60, 60, 60))
    draw.text((right - 40, bottom + 16), "step", fill=(60, 60, 60))
    draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
    draw.line([xy(s, v) for s, v in zip(steps, _smooth(losses), strict=True)], fill=(20, 60, 200), width=2)


def draw_loss_curves(losses: dict[str, Sequence[tuple[int, float]]], path: str) -> str:
    """One panel per stage (``vae``, ``mmdit``, ``controlnet``): the logged losses and their moving average."""
    names = [n for n in TITLES if n in losses]
    img = Image.new("RGB", (PANEL_W * len(names), PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(names):
        _panel(draw, i * PANEL_W, TITLES[name], [tuple(p) for p in losses[name]])
    img.save(path)
    return path
