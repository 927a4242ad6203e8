"""The SD3 latent format: how raw VAE latents map to the space the diffusion model works in.

The SD3 VAE's latents are not centred at zero nor of unit spread; the diffusion model was trained on
``(latent - shift) * scale``. Samplers apply :func:`process_in` on the way in and :func:`process_out`
on the way out, so everything outside the sampler (the ``LATENT`` type, VAE encode/decode) holds raw
VAE-space latents, as ComfyUI does. Constants and preview factors are those of the reference's
``SD3LatentFormat``; a model with a VAE of its own carries its preview map (:class:`LatentPreview`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

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


PACK_METADATA_KEY = "sd35"  # the one safetensors metadata entry this pack writes: a JSON object


@dataclass(frozen=True)
class LatentPreview:
    """A linear map from the 16 model-space latent channels to approximate RGB in [-1, 1].

    SD3's VAE has the reference's factors (:data:`SD3_PREVIEW`); a model with a VAE of its own (the bundled
    tiny shapes model) carries its map in the ``latent_preview`` field of the pack's metadata entry.
    """

    factors: tuple[tuple[float, float, float], ...]  # one (r, g, b) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: str) -> LatentPreview | None:
        """The map in a file's metadata (``where`` names the file in errors), or ``None`` when it has none."""
        raw = metadata.get(PACK_METADATA_KEY)
        if not isinstance(raw, str):  # absent (GGUF metadata holds other types)
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            raise CheckpointError(f"{where}: metadata {PACK_METADATA_KEY!r} is not JSON") from None
        value = entry.get("latent_preview") if isinstance(entry, dict) else None
        if value is None:
            return None
        field = f"{where}: metadata {PACK_METADATA_KEY!r} field 'latent_preview'"
        try:
            factors = tuple(tuple(float(v) for v in row) for row in value["factors"])
            bias = tuple(float(v) for v in value.get("bias", (0.0, 0.0, 0.0)))
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{field}: expected {{'factors': 16 rows of 3 numbers, 'bias': 3 numbers}}") from None
        if len(factors) != len(LATENT_RGB_FACTORS) or any(len(r) != 3 for r in factors) or len(bias) != 3:
            raise CheckpointError(f"{field}: expected 16 rows of 3 factors and 3 biases; got "
                             f"{[len(r) for r in factors]} and {len(bias)}")
        return cls(factors, bias)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        return {"factors": [list(r) for r in self.factors], "bias": list(self.bias)}


SD3_PREVIEW = LatentPreview(LATENT_RGB_FACTORS)


def process_in(latent: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> diffusion-model latent space: ``(latent - shift) * scale``."""
    return (latent - SD3_LATENT_SHIFT) * SD3_LATENT_SCALE


def process_out(latent: torch.Tensor) -> torch.Tensor:
    """Diffusion-model latent space -> raw VAE latent: ``latent / scale + shift``."""
    return latent / SD3_LATENT_SCALE + SD3_LATENT_SHIFT


def latent_to_rgb_preview(x0: torch.Tensor, preview: LatentPreview = SD3_PREVIEW) -> torch.Tensor:
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
    factors = torch.tensor(preview.factors, dtype=torch.float32)
    rgb = x0.detach().to(device="cpu", dtype=torch.float32).permute(1, 2, 0) @ factors + torch.tensor(preview.bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
