"""Area and mask conditioning: where a conditioning entry acts, with ComfyUI's ``calc_cond_batch`` semantics.

A :class:`~.guidance.CondEntry` may carry an ``area``, a ``mask`` (with ``mask_strength``) and
``set_area_to_bounds``, as ComfyUI's *Conditioning (Set Area)*, *(Set Area with Percentage)* and *(Set Mask)*
write them. What ComfyUI does with them (``comfy/samplers.py``), and this module repeats:

- before sampling (``resolve_areas_and_cond_masks_multidim``): a percentage area becomes latent pixels
  (``max(1, round(size * dim))``, ``round(offset * dim)``); a mask goes to the latent size (bilinear) and, with
  ``set_area_to_bounds``, the area becomes the box around the mask's non-zero pixels (at least 8 x 8);
- every positive entry with an area gets a copy on the negative side with the same area, mask, strength and
  timestep range but the text of the smallest negative entry that encloses it (or the first negative without an
  area), and the other way round (``create_cond_with_same_area_if_none``): :func:`mirror_areas`;
- at every model call (``get_area_and_mult``): the entry's rows see the latent cropped to its area (clipped to
  the latent); its weight ``mult`` is ``mask * mask_strength * strength`` (the mask cropped too) or, without a
  mask, ``strength`` with the area's inner edges feathered over up to 8 latent pixels; the model sees the crop
  as a smaller image, so its position grid is the centre crop for the crop's size (ComfyUI's MMDiT), and a crop
  that is not a multiple of the patch size is padded circularly and the output cut back (its PatchEmbed);
- each side's prediction is ``sum(pred * mult) / (1e-37 + sum(mult))`` per latent pixel, each entry adding
  only inside its area: :func:`accumulate`.

Entries without area and mask keep the scalar-strength path of :mod:`.guidance`, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

FEATHER = 8  # ComfyUI's fuzz: area edges inside the latent fade in over up to this many latent pixels
MIN_BOUNDS = 8  # ComfyUI's smallest mask-bounds box (latent pixels)


def check_area(name: str, area) -> tuple | None:
    """``None``, ``(h, w, y, x)`` in latent pixels, or ``("percentage", h, w, y, x)`` as fractions of the
    latent (ComfyUI's two forms); ValueError naming ``name`` otherwise."""
    if area is None:
        return None
    try:
        items = tuple(area)
    except TypeError:
        raise ValueError(f"{name}: expected (height, width, y, x) or ('percentage', h, w, y, x), got {area!r}"
                         ) from None
    if items and items[0] == "percentage":
        values = items[1:]
        if len(values) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{name}: expected ('percentage', height, width, y, x) fractions, got {area!r}")
        if any(not math.isfinite(v) or v < 0.0 or v > 1.0 for v in values):
            raise ValueError(f"{name}: percentage areas are fractions of the image in 0..1, got {area!r}")
        return ("percentage",) + tuple(float(v) for v in values)
    if len(items) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in items):
        raise ValueError(f"{name}: expected (height, width, y, x) in latent pixels (whole numbers >= 0), got {area!r}")
    if items[0] < 1 or items[1] < 1:
        raise ValueError(f"{name}: an area needs a height and width of at least 1 latent pixel, got {area!r}")
    return items


def check_cond_mask(name: str, mask) -> torch.Tensor | None:
    """``None`` or a ComfyUI ``MASK`` ``[H, W]`` / ``[B, H, W]`` of finite values, as ``[B, H, W]`` float32."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or mask.numel() == 0:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a MASK [B, H, W], got {shape}")
    mask = mask.float()
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return mask if mask.ndim == 3 else mask.unsqueeze(0)


def mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """ComfyUI's mask-bounds area ``(h, w, y, x)`` of a latent-size mask ``[B, h, w]`` (``get_mask_aabb`` over
    the batch's largest magnitude; at least 8 x 8; an all-zero mask gives ``(8, 8, 0, 0)``)."""
    bounds = torch.max(torch.abs(mask), dim=0).values
    if not bool(torch.any(bounds != 0)):
        return (MIN_BOUNDS, MIN_BOUNDS, 0, 0)
    ys, xs = torch.where(bounds != 0)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    return (max(MIN_BOUNDS, y1 - y0 + 1), max(MIN_BOUNDS, x1 - x0 + 1), y0, x0)


@dataclass(frozen=True)
class Region:
    """Where an entry acts on a latent of one size: ``area`` ``(h, w, y, x)`` as ComfyUI resolves it (before
    clipping; what the area mirroring compares) and ``mask`` ``[B, h, w]`` at the latent size, or ``None``."""

    area: tuple[int, int, int, int] | None = None
    mask: torch.Tensor | None = None

    @property
    def spatial(self) -> bool:
        return self.area is not None or self.mask is not None


FULL = Region()


def resolve(entry, hw: tuple[int, int], device) -> Region:
    """The :class:`Region` of ``entry`` (a checked :class:`~.guidance.CondEntry`) on a latent of size ``hw``."""
    area, mask = entry.area, entry.mask
    if area is not None and area[0] == "percentage":
        a = area[1:]
        area = (max(1, round(a[0] * hw[0])), max(1, round(a[1] * hw[1])), round(a[2] * hw[0]), round(a[3] * hw[1]))
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)
        if tuple(mask.shape[1:]) != tuple(hw):
            mask = F.interpolate(mask.unsqueeze(1), size=tuple(hw), mode="bilinear").squeeze(1)
        if entry.set_area_to_bounds:
            area = mask_bounds(mask)
    return Region(area, mask) if area is not None or mask is not None else FULL


def mirror_areas(sides: list[list[tuple]]) -> None:
    """ComfyUI's ``create_cond_with_same_area_if_none`` over ``[positive, negative]``, in place.

    Each side is a list of ``(entry, region)``. For every entry with an area, the other side gets a copy of it
    (area, mask, strengths, timestep range) carrying the text of that side's smallest entry whose area encloses
    it, or of its first entry without an area, unless that entry's area is the same one. As in ComfyUI the
    lists grow while they are walked, positives first.
    """
    for k, side in enumerate(sides):
        for entry, region in side:  # the list may grow while walked; ComfyUI's loop sees the new items too
            if region.area is None:
                continue
            for kk, other in enumerate(sides):
                if kk != k:
                    _add_same_area(other, entry, region)


def _inside(a, cmp) -> bool:
    return a[2] >= cmp[2] and a[3] >= cmp[3] and a[0] + a[2] <= cmp[0] + cmp[2] and a[1] + a[3] <= cmp[1] + cmp[3]


def _add_same_area(side: list[tuple], entry, region: Region) -> None:
    smallest = None
    for cand in side:
        cand_area = cand[1].area
        if cand_area is not None:
            if _inside(region.area, cand_area):
                if smallest is None or smallest[1].area is None:
                    smallest = cand
                elif math.prod(smallest[1].area[:2]) > math.prod(cand_area[:2]):
                    smallest = cand
        elif smallest is None:
            smallest = cand
    if smallest is None or smallest[1].area == region.area:
        return
    side.append((replace(entry, context=smallest[0].context, pooled=smallest[0].pooled), region))


@dataclass(frozen=True)
class Placement:
    """What an entry's rows see at one latent shape: the ``crop`` ``(h, w, y, x)`` (clipped to the latent) or
    ``None`` for the whole latent, and the weight ``mult`` ``[B, C, h, w]`` (``None``: the scalar strength)."""

    crop: tuple[int, int, int, int] | None
    mult: torch.Tensor | None


def place(name: str, region: Region, strength: float, mask_strength: float, shape, device) -> Placement:
    """ComfyUI's ``get_area_and_mult`` for a latent of ``shape`` ``(B, C, H, W)`` (see the module doc)."""
    if not region.spatial:
        return Placement(None, None)
    b, c, hgt, wid = shape
    crop = None
    if region.area is not None:
        h, w, y, x = region.area
        if y >= hgt or x >= wid:
            raise ValueError(f"{name}: the area at x={x}, y={y} (latent pixels) starts outside the {wid}x{hgt} "
                             f"latent ({wid * 8}x{hgt * 8} pixels)")
        crop = (min(hgt - y, h), min(wid - x, w), y, x)
    if region.mask is not None:
        mask = region.mask[:b]
        if b % mask.shape[0]:
            raise ValueError(f"{name}: a mask batch of {region.mask.shape[0]} does not fit the latent batch {b}")
        if crop is not None:
            mask = mask[:, crop[2]:crop[2] + crop[0], crop[3]:crop[3] + crop[1]]
        mask = mask * mask_strength
        mask = mask.unsqueeze(1).repeat((b // mask.shape[0], c, 1, 1))
        return Placement(crop, mask * strength)
    h, w, y, x = crop
    mult = torch.ones((b, c, h, w), dtype=torch.float32, device=device) * strength
    for dim, (size, offset, full) in enumerate(((h, y, hgt), (w, x, wid))):
        rr = min(FEATHER, mult.shape[2 + dim] // 4)
        if offset != 0:
            for t in range(rr):
                mult.narrow(dim + 2, t, 1).mul_((1.0 / rr) * (t + 1))
        if size + offset < full:
            for t in range(rr):
                mult.narrow(dim + 2, size - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return Placement(crop, mult)


def crop_rows(x: torch.Tensor, crop: tuple[int, int, int, int] | None, patch: int) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` cut to ``crop``, padded circularly to a multiple of ``patch`` (ComfyUI's
    PatchEmbed does the same inside the model)."""
    if crop is None:
        return x
    h, w, y, x0 = crop
    rows = x[:, :, y:y + h, x0:x0 + w]
    return pad_to_patch(rows, patch)


def pad_to_patch(rows: torch.Tensor, patch: int) -> torch.Tensor:
    ph, pw = (-rows.shape[-2]) % patch, (-rows.shape[-1]) % patch
    if ph or pw:
        rows = F.pad(rows, (0, pw, 0, ph), mode="circular")
    return rows


def accumulate(out: torch.Tensor, counts: torch.Tensor, pred: torch.Tensor, strength: float,
               placement: Placement) -> None:
    """Add one entry's prediction to a side's sums, as ComfyUI's ``calc_cond_batch``: ``out += pred * mult``,
    ``counts += mult`` inside the entry's crop (``pred`` already cut back to the crop's size)."""
    if placement.mult is None:
        out += pred * strength
        counts += strength
        return
    if placement.crop is not None:
        h, w, y, x = placement.crop
        out = out[:, :, y:y + h, x:x + w]
        counts = counts[:, :, y:y + h, x:x + w]
    out += pred * placement.mult
    counts += placement.mult
