"""The latent preview map of a VAE trained here: least squares from latents to the pictures they encode.

SD3's preview factors describe SD3's VAE; a VAE trained from scratch spreads colour over its channels its own
way, so its map is fitted on the training pictures and shipped in the checkpoint's metadata
(:class:`sd35_core.models.latent.LatentPreview`), and ComfyUI's live previews show the shape being drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd35_core.models.latent import LatentPreview

DECIMALS = 4  # stored rounded: a different BLAS would change the last bits of the fit, not these


def fit_latent_preview(latents: torch.Tensor, images: torch.Tensor) -> LatentPreview:
    """The map (with bias) from model-space ``latents [N, 16, h, w]`` to ``images`` (``uint8 [N, H, W, 3]``)
    averaged over each latent position's pixels, in [-1, 1]."""
    n, channels, h, w = latents.shape
    pixels = images.permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1
    target = F.adaptive_avg_pool2d(pixels, (h, w)).permute(0, 2, 3, 1).reshape(-1, 3)
    inputs = latents.to(torch.float64).permute(0, 2, 3, 1).reshape(-1, channels)
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(inputs, target).solution.round(decimals=DECIMALS)
    factors = tuple(tuple(float(v) for v in row) for row in solution[:channels])
    return LatentPreview(factors, tuple(float(v) for v in solution[channels]))  # type: ignore[arg-type]
