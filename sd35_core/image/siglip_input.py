"""Pixels for the SigLIP vision tower, prepared as transformers' ``SiglipImageProcessor`` prepares them.

The processor squashes the picture to ``size x size`` (no crop, aspect ratio not kept) with PIL's bicubic
filter on 8-bit pixels, divides by 255 and normalises with mean 0.5 and std 0.5 (to -1..1). ComfyUI's
``IMAGE`` is float 0..1, so it is first rounded to 8 bits, as the processor's own conversion of a float
picture does; the same PIL resize then gives the same pixels as the processor.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..models.siglip import SiglipVisionTower

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def siglip_pixels(images: torch.Tensor | Image.Image, size: int) -> torch.Tensor:
    """``[B, 3, size, size]`` float32 pixels in -1..1 from a ComfyUI ``IMAGE`` ``[B, H, W, C]`` (0..1) or a
    PIL picture; an alpha channel is dropped and a grey picture repeated to RGB, as the processor does."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"SigLIP image size: expected a positive whole number, got {size!r}")
    if isinstance(images, Image.Image):
        pictures = [images.convert("RGB")]
    else:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"image: expected an IMAGE [B, H, W, 3] (or 1 or 4 channels), got {shape}")
        if images.shape[0] == 0:
            raise ValueError("image: expected at least one picture, got an empty batch")
        if not torch.isfinite(images).all():
            raise ValueError("image: contains NaN or infinite values")
        rgb = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:-1], 3)
        pictures = [Image.fromarray(_to_uint8(picture)) for picture in rgb]
    rows = []
    for picture in pictures:
        resized = np.asarray(picture.resize((size, size), resample=Image.Resampling.BICUBIC))
        # /255 in float64, then float32: the processor's rescale, to the bit
        rows.append(torch.from_numpy(resized.astype(np.float64) * (1.0 / 255.0)).float().permute(2, 0, 1))
    return (torch.stack(rows) - SIGLIP_MEAN) / SIGLIP_STD


def encode_image(tower: SiglipVisionTower, images: torch.Tensor | Image.Image) -> torch.Tensor:
    """The IP-Adapter's image features: ``hidden_states[-2]`` ``[B, tokens, width]`` (float32, CPU) of ``images``
    (see :func:`siglip_pixels`), run on the tower's device in its dtype."""
    with torch.no_grad():
        features = tower(siglip_pixels(images, tower.config.image_size))
    return features.float().cpu()
