"""The SD3 latent format: how raw VAE latents map to the space the diffusion model works in.

The SD3 VAE's latents are not centred at zero nor of unit spread; the diffusion model was trained on
``(latent - shift) * scale``. Samplers apply :func:`process_in` on the way in and :func:`process_out`
on the way out, so everything outside the sampler (the ``LATENT`` type, VAE encode/decode) holds raw
VAE-space latents, as ComfyUI does. Constants and preview factors are those of the reference's
``SD3LatentFormat``.
"""

from __future__ import annotations

import torch

SD3_LATENT_SCALE = 1.5305
SD3_LATENT_SHIFT = 0.0609

# Linear map from the 16 latent channels to approximate RGB in [-1, 1], row per channel.
LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.0645, 0.0177, 0.1052),
    (0.0028, 0.0312, 0.0650),
    (0.1848, 0.0762, 0.0360),
    (0.0944, 0.0360, 0.0889),
    (0.0897, 0.0506, -0.0364),
    (-0.0020, 0.1203, 0.0284),
    (0.0855, 0.0118, 0.0283),
    (-0.0539, 0.0658, 0.1047),
    (-0.0057, 0.0116, 0.0700),
    (-0.0412, 0.0281, -0.0039),
    (0.1106, 0.1171, 0.1220),
    (-0.0248, 0.0682, -0.0481),
    (0.0815, 0.0846, 0.1207),
    (-0.0120, -0.0055, -0.0867),
    (-0.0749, -0.0634, -0.0456),
    (-0.1418, -0.1457, -0.1259),
)


def process_in(latent: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> diffusion-model latent space: ``(latent - shift) * scale``."""
    return (latent - SD3_LATENT_SHIFT) * SD3_LATENT_SCALE


def process_out(latent: torch.Tensor) -> torch.Tensor:
    """Diffusion-model latent space -> raw VAE latent: ``latent / scale + shift``."""
    return latent / SD3_LATENT_SCALE + SD3_LATENT_SHIFT


def latent_to_rgb_preview(x0: torch.Tensor) -> torch.Tensor:
    """Quick RGB approximation of a model-space latent, for live previews during sampling.

    ``x0`` is ``[16, h, w]`` in the diffusion model's latent space (``process_in`` applied), such as
    the denoised estimate a sampler reports; a ``[B, 16, h, w]`` batch previews its first image.
    Returns a CPU ``uint8`` tensor ``[h, w, 3]``, one pixel per latent position, computed like the
    reference's ``decode_latent_to_preview`` (values truncated, not rounded, to 0..255).
    """
    if x0.ndim == 4:
        x0 = x0[0]
    if x0.ndim != 3 or x0.shape[0] != len(LATENT_RGB_FACTORS):
        raise ValueError(
            f"latent preview: expected a latent of shape [{len(LATENT_RGB_FACTORS)}, h, w]; got {tuple(x0.shape)}"
        )
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = x0.detach().to(device="cpu", dtype=torch.float32).permute(1, 2, 0) @ factors
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
