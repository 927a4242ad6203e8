"""Noise masks for inpainting and outpainting, with ComfyUI's semantics.

A mask holds, per pixel, how much of the image is repainted: 1 = repaint, 0 = keep the input latent.
SD3.5 has no inpainting model, so masks act on the sampling (ComfyUI's ``KSamplerX0Inpaint``): before each
model call the kept part of the noisy latent is replaced by the input latent noised to the current sigma with
the run's own noise, and the model's denoised estimate is blended with the input latent by the mask. All of it
happens in the diffusion model's latent space (``process_in`` applied), where ComfyUI does it too.

What this module offers:

- :func:`load_mask` / :func:`mask_from_image`: a mask from a PNG as ComfyUI's ``LoadImage`` reads one (an image
  with transparency: ``1 - alpha``, the mask editor's convention) or, without transparency, its grey levels
  (white = repaint).
- :func:`grow_mask` and :func:`prepare_inpaint`: what ComfyUI's ``VAEEncodeForInpaint`` does before encoding
  (masked pixels set to grey, the mask rounded and grown).
- :func:`latent_mask`: a ``MASK`` / ``noise_mask`` resized to the latent bilinearly and broadcast over channels
  and batch (ComfyUI's ``prepare_mask``), with this pack's checks (batch 1 or the latent batch, no NaN, 0..1).
- :class:`NoiseMaskBlend`: the blend around a denoiser, in ``standard`` or ``differential`` mode (ComfyUI's
  Differential Diffusion rule: a pixel with mask value ``m`` is repainted only while the run's progress in
  timestep, ``t = (ts - ts_end) / (ts_start - ts_end)`` falling from 1 to 0, is at most ``m``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .schedule import TIMESTEP_MULTIPLIER, comfy_sigma_table

log = logging.getLogger(__name__)

MASK_MODES = ("standard", "differential")
VAE_DOWNSCALE = 8

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# masks from files


def mask_from_image(img, name: str = "mask") -> torch.Tensor:
    """A PIL image -> mask ``[1, H, W]`` float32 in 0..1 (1 = repaint).

    An image with transparency (an alpha channel that is not fully opaque, or a palette transparency) gives
    ``1 - alpha``, as ComfyUI's ``LoadImage`` MASK output (transparent = repaint); any other image gives its
    grey levels (white = repaint). 16-bit grey images keep their precision.
    """
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if "A" in img.getbands():
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            return torch.from_numpy(1.0 - alpha)[None].contiguous()
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        grey = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode == "F":
        grey = np.asarray(img, dtype=np.float32)
    else:
        grey = np.asarray(img.convert("L") if img.mode != "L" else img, dtype=np.float32) / 255.0
    return check_mask(torch.from_numpy(np.ascontiguousarray(grey))[None], name)[:, 0]


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a mask image file (PNG, JPEG, ...) as :func:`mask_from_image` does; ``[1, H, W]`` float32.

    ValueError naming the file when it is missing, empty or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"mask {path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"mask {path}: the file is empty (expected a PNG or other image; white = repaint)")
    try:
        with Image.open(path) as img:
            img.load()
            return mask_from_image(img, f"mask {path}")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"mask {path}: not a readable image ({e})") from None


# --------------------------------------------------------------------------------------------------
# checks and shapes


def check_mask(mask, name: str = "mask") -> torch.Tensor:
    """A ComfyUI ``MASK`` ``[B, H, W]`` / ``[H, W]`` or ``noise_mask`` ``[B, 1, H, W]`` -> ``[B, 1, H, W]`` float32.

    ValueError when it is not a tensor of that kind, is empty, holds NaN or infinities, or has values outside
    0..1 (ComfyUI's mask nodes keep to 0..1; anything else is a mistake upstream, not a stronger repaint).
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a MASK [B, H, W] or a noise mask [B, 1, H, W], got {shape}")
    if mask.numel() == 0:
        raise ValueError(f"{name}: the mask is empty ({tuple(mask.shape)})")
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:])).float()
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: expected values in 0..1 (1 = repaint), got {lo:g}..{hi:g}")
    return mask


def latent_mask(mask, latent_shape, name: str = "noise_mask") -> torch.Tensor:
    """The mask the sampler blends with, ``[B, C, h, w]`` for a latent of ``latent_shape`` ``(B, C, h, w)``.

    As ComfyUI's ``prepare_mask``: bilinear resize to ``h x w`` (no corner alignment), repeated over the
    channels and the batch. Unlike ComfyUI, which repeats or truncates any mask batch to fit, a mask batch
    must be 1 or ``B`` (ValueError otherwise). A mask whose size is neither the image's (``8h x 8w``) nor the
    latent's is still resized (ComfyUI does the same), with a note in the log, since it is likely the mask
    of another image.
    """
    b, c, h, w = (int(v) for v in latent_shape)
    mask = check_mask(mask, name)
    mb, _, mh, mw = mask.shape
    if mb not in (1, b):
        raise ValueError(f"{name}: the mask batch ({mb}) must be 1 or the latent batch ({b})")
    if (mh, mw) not in ((h * VAE_DOWNSCALE, w * VAE_DOWNSCALE), (h, w)):
        log.info("sd35: %s of %dx%d resized to the %dx%d latent of a %dx%d image (bilinear, as ComfyUI)",
                 name, mw, mh, w, h, w * VAE_DOWNSCALE, h * VAE_DOWNSCALE)
    resized = F.interpolate(mask, size=(h, w), mode="bilinear")
    return resized.expand(b, c, h, w).contiguous()


# --------------------------------------------------------------------------------------------------
# preparing an image for inpainting (VAEEncodeForInpaint)


def grow_mask(mask: torch.Tensor, by: int) -> torch.Tensor:
    """Round ``[B, 1, H, W]`` to 0/1 and grow it by ``by`` pixels (a ``by x by`` box dilation, clamped to 1).

    ``by == 0`` returns the mask unrounded. As ComfyUI's ``VAEEncodeForInpaint``, an even ``by`` grows one
    pixel more towards the bottom and right; the result keeps the input's size.
    """
    if isinstance(by, bool) or not isinstance(by, int) or by < 0:
        raise ValueError(f"grow_mask_by: expected a whole number >= 0, got {by!r}")
    if by == 0:
        return mask
    h, w = mask.shape[-2:]
    kernel = torch.ones((1, 1, by, by), dtype=mask.dtype, device=mask.device)
    pad = math.ceil((by - 1) / 2)
    grown = F.conv2d(mask.round(), kernel, padding=pad).clamp(0, 1)
    return grown[..., :h, :w]


@dataclass(frozen=True)
class InpaintInput:
    """An image ready to be encoded for inpainting and the noise mask to attach to its latent."""

    pixels: torch.Tensor  # IMAGE [B, H', W', 3], masked pixels grey (0.5)
    noise_mask: torch.Tensor  # [Bm, 1, H', W'] of 0/1 (Bm = 1 or B), grown


def prepare_inpaint(pixels: torch.Tensor, mask, grow_by: int, multiple: int = 16) -> InpaintInput:
    """ComfyUI's ``VAEEncodeForInpaint`` preparation for an ``IMAGE`` ``[B, H, W, C]`` and a mask.

    The mask is resized bilinearly to the image; image and mask are centre-cropped to a multiple of
    ``multiple`` pixels (16 for SD3: VAE 8 x patch 2; ComfyUI crops to 8 and its model pads); pixels where the
    rounded mask is 1 are set to grey, and the noise mask is the rounded mask grown by ``grow_by`` pixels.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] < 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels: expected an IMAGE [B, H, W, 3], got {shape}")
    b, h, w, _ = pixels.shape
    mask = check_mask(mask)
    if mask.shape[0] not in (1, b):
        raise ValueError(f"mask: the mask batch ({mask.shape[0]}) must be 1 or the image batch ({b})")
    hh, ww = h - h % multiple, w - w % multiple
    if hh == 0 or ww == 0:
        raise ValueError(f"pixels: the image ({w}x{h}) is smaller than {multiple} pixels")
    if tuple(mask.shape[-2:]) != (h, w):
        log.info("sd35: mask of %dx%d resized to the %dx%d image (bilinear, as ComfyUI)", mask.shape[-1],
                 mask.shape[-2], w, h)
    mask = F.interpolate(mask, size=(h, w), mode="bilinear")
    top, left = (h - hh) // 2, (w - ww) // 2
    if (hh, ww) != (h, w):
        log.info("sd35: cropping %dx%d to %dx%d for the VAE", w, h, ww, hh)
    pixels = pixels[:, top : top + hh, left : left + ww, :3].float()
    mask = mask[..., top : top + hh, left : left + ww]
    keep = (1.0 - mask.round()).squeeze(1)[..., None]  # [Bm, H', W', 1]
    grey = (pixels - 0.5) * keep + 0.5
    return InpaintInput(grey, grow_mask(mask, grow_by).round())


# --------------------------------------------------------------------------------------------------
# the blend around the denoiser (KSamplerX0Inpaint)


def differential_threshold(sigma: torch.Tensor, sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Differential Diffusion's threshold at ``sigma``: 1 at the run's first sigma, falling towards 0.

    ComfyUI's rule: timesteps are ``1000 * sigma``; the run goes from ``sigmas[0]`` to the model's smallest
    sigma (its 1000-entry table's first entry for ``shift``), or to ``sigmas[-1]`` when a run stops above it.
    """
    sigma_to = comfy_sigma_table(shift)[0].to(sigmas.device)
    if sigmas[-1] > sigma_to:
        sigma_to = sigmas[-1]
    ts_from = sigmas[0] * TIMESTEP_MULTIPLIER
    ts_to = sigma_to * TIMESTEP_MULTIPLIER
    return (sigma.reshape(-1)[0] * TIMESTEP_MULTIPLIER - ts_to) / (ts_from - ts_to)


class NoiseMaskBlend:
    """``denoiser(x, sigma, step)`` with a noise mask applied as ComfyUI's ``KSamplerX0Inpaint`` does.

    ``mask`` ``[B, C, h, w]`` (from :func:`latent_mask`), ``latent`` the input latent and ``noise`` the run's
    initial noise, both in model space ``[B, C, h, w]``; ``sigmas`` the run's schedule; ``shift`` its shift
    (for the differential rule). Every row the wrapped denoiser evaluates (cond, uncond, skip pass, ControlNet)
    sees the blended input, because the blend happens before the guider batches them.
    """

    def __init__(self, denoiser: Denoiser, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
                 sigmas: torch.Tensor, shift: float, mode: str = "standard") -> None:
        if mask.shape != latent.shape or noise.shape != latent.shape:
            raise ValueError(f"noise mask {tuple(mask.shape)}, latent {tuple(latent.shape)} and noise "
                             f"{tuple(noise.shape)} must have one shape")
        self.denoiser, self.mask, self.latent, self.noise = denoiser, mask, latent, noise
        self.sigmas, self.shift, self.mode = sigmas, shift, mode

    def mask_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The mask in effect at ``sigma``: the mask itself, or in differential mode ``mask >= threshold``."""
        if self.mode == "standard":
            return self.mask
        threshold = differential_threshold(sigma, self.sigmas, self.shift)
        return (self.mask >= threshold).to(self.mask.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step_index: int) -> torch.Tensor:
        mask = self.mask_at(sigma)
        keep = 1.0 - mask
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        # Same operations in the same order as ComfyUI (noise_scaling of a flow model, then the mix).
        x = x * mask + (s * self.noise + (1.0 - s) * self.latent) * keep
        out = self.denoiser(x, sigma, step_index)
        return out * mask + self.latent * keep
