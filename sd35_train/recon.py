"""Reading a shape back without the evaluator's thresholds, and the VAE's reconstruction check.

:func:`binarise` splits a picture into shape and background by two-means clustering of its colours, seeded
with the border's median (background) and the pixel farthest from it (shape), so no palette distance or
share of it enters; the shape is the largest connected region of the shape cluster. :func:`fill_class` reads
the kind from the one number a shape's geometry fixes: its area over its bounding box's area (square 1,
circle pi/4 = 0.785, triangle 0.5), nearest reference wins. :func:`iou` compares a binarised picture with
the renderer's own mask (:func:`~.data.render_mask`).

:func:`reconstruction_check` encodes and decodes held-out pictures (split :data:`RECON_SPLIT`, neither the
training split nor the evaluator's) through the VAE alone and scores both; the recipe stops when fewer
than ``RecipeConfig.recon_min_class_kept`` of them keep their class.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .analysis import largest_component
from .data import SHAPES, render, render_mask, spec_for

RECON_SPLIT = 2  # the training set is split 0, the evaluator's prompts split 1
RECON_IMAGES = 192
FILL_REFERENCE = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


def binarise(image: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Shape mask of ``uint8 [H, W, 3]``: two-means over the pixels' colours, started at the border's median
    colour and at the pixel farthest from it; the largest connected region of the second cluster is the
    shape (a stray pixel elsewhere would stretch its bounding box)."""
    img = np.asarray(image, dtype=np.float64)
    pixels = img.reshape(-1, 3)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    fg = pixels[int(np.argmax(((pixels - bg) ** 2).sum(1)))]
    for _ in range(iterations):
        shape = ((pixels - fg) ** 2).sum(1) < ((pixels - bg) ** 2).sum(1)
        if not shape.any() or shape.all():
            break
        bg, fg = pixels[~shape].mean(0), pixels[shape].mean(0)
    mask = (((pixels - fg) ** 2).sum(1) < ((pixels - bg) ** 2).sum(1)).reshape(img.shape[:2])
    return largest_component(mask) if mask.any() else mask


def fill_ratio(mask: np.ndarray) -> float:
    """Area of ``mask`` over the area of its bounding box (0 for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return 0.0
    return float(ys.size) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def fill_class(mask: np.ndarray) -> str | None:
    """The kind whose reference fill ratio is nearest to ``mask``'s (``None`` for an empty mask)."""
    if not mask.any():
        return None
    f = fill_ratio(mask)
    return min(SHAPES, key=lambda s: abs(FILL_REFERENCE[s] - f))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def read_independent(image: np.ndarray) -> str | None:
    """The shape's kind by :func:`binarise` and :func:`fill_class`."""
    return fill_class(binarise(image))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """VAE output ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``uint8 [B, H, W, 3]``."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def reconstruct(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Encode to the mean and decode ``uint8 [N, H, W, 3]`` through ``vae`` (an :class:`sd35_core.models.vae.VAE`: its
    ``encoder`` gives mean and log-variance, its ``decoder`` takes ``config.z_channels`` channels)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
            x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            z = vae.encoder(x)[:, : vae.config.z_channels]
            out.append(to_uint8(vae.decoder(z)))
    return np.concatenate(out)


def reconstruction_check(vae, n: int = RECON_IMAGES, split: int = RECON_SPLIT) -> dict:
    """Reconstruct ``n`` held-out pictures and read them back independently.

    Returns ``class_kept`` (share whose fill-ratio class is still the drawn kind), ``mean_iou`` and
    ``min_iou`` (binarised reconstruction vs the renderer's mask), ``class_kept_originals`` (the same reader
    on the pictures themselves) and the kept share per kind.
    """
    specs = [spec_for(split, i) for i in range(n)]
    originals = np.stack([render(s) for s in specs])
    recon = reconstruct(vae, originals)
    kept, kept_orig, ious = [], [], []
    per_kind: dict[str, list[bool]] = {s: [] for s in SHAPES}
    for spec, orig, rec in zip(specs, originals, recon, strict=True):
        mask = binarise(rec)
        ok = fill_class(mask) == spec.shape
        kept.append(ok)
        per_kind[spec.shape].append(ok)
        kept_orig.append(read_independent(orig) == spec.shape)
        ious.append(iou(mask, render_mask(spec)))
    return {"images": n, "split": split, "class_kept": round(float(np.mean(kept)), 4),
            "class_kept_originals": round(float(np.mean(kept_orig)), 4),
            "mean_iou": round(float(np.mean(ious)), 4), "min_iou": round(float(np.min(ious)), 4),
            "class_kept_per_kind": {k: round(float(np.mean(v)), 4) if v else None for k, v in per_kind.items()}}
