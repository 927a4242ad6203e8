"""ControlNets during sampling: :class:`ControlHint` (one ControlNet applied to a run) and the residuals it
adds after the joint blocks (:func:`controlnet_residuals`, spread over the blocks by :func:`expand_residuals`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..models.controlnet import PATH_8B, ControlNet, check_controlnet_fits
from ..models.mmditx import MMDiTX


def expand_residuals(outputs: Sequence[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """One residual per joint block: block ``i`` gets ``outputs[i // (depth // len(outputs))]`` (reference)."""
    n = len(outputs)
    if n == 0 or n > depth or (depth - 1) // (depth // n) >= n:
        raise ValueError(f"cannot spread {n} ControlNet outputs over {depth} joint blocks")
    interval = depth // n
    return [outputs[i // interval] for i in range(depth)]


def controlnet_residuals(
    model: MMDiTX,
    controlnet: ControlNet,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    pooled: torch.Tensor,
    cond_latent: torch.Tensor,
    strength: float = 1.0,
) -> list[torch.Tensor]:
    """ControlNet outputs for one model call, times ``strength`` (the reference's ``apply_model`` part).

    ``x`` is the diffusion model's input latent ``[B, C, H, W]`` (cond and uncond batched, as the reference
    runs them), ``sigma`` a scalar or ``[B]``, ``pooled`` ``[B, P]``, and ``cond_latent`` the control latent
    ``[n, C, H, W]`` in diffusion-model space, tiled over the batch (``n`` = 1 as in the reference, or the
    image batch when ``x`` stacks cond and uncond copies of it). Returns one tensor per ControlNet layer, in
    the model's compute dtype; spread them over the blocks with :func:`expand_residuals`.
    """
    path = check_controlnet_fits(controlnet.config, model.config)
    dtype = model.compute_dtype
    b = x.shape[0]
    if cond_latent.ndim != 4 or cond_latent.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"control latent of shape {tuple(cond_latent.shape)} does not fit the latent being sampled "
            f"{tuple(x.shape)}: the control image must be resized to the generation size before encoding"
        )
    n = cond_latent.shape[0]
    if n == 0 or b % n:
        raise ValueError(f"control latent batch {n}: expected 1 or a divisor of the model batch {b}")
    cond = cond_latent.to(device=x.device, dtype=dtype).repeat(b // n, 1, 1, 1)
    timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1) * 1000).expand(b)
    if path == PATH_8B:
        hidden = model.patch_embed(x)
        y = pooled.to(device=x.device, dtype=dtype)
    else:
        hidden = x.to(dtype)
        y = model.y_embedder(pooled.to(device=x.device, dtype=dtype))
    outputs = controlnet(hidden, cond, y, timestep)
    if strength != 1.0:
        outputs = [o * strength for o in outputs]
    return outputs


@dataclass
class ControlHint:
    """One ControlNet applied to a sampling run.

    ``cond_latent`` is the encoded control image in diffusion-model space (latent format applied),
    ``[1, 16, h, w]``. ``start``/``end`` are fractions of the sampling steps: step ``i`` of ``steps`` is
    controlled when ``start * steps <= i < end * steps`` (start inclusive, end exclusive), so the default
    0..1 covers every step and ``start == end`` none.

    ``encode(h, w)``, when given, returns the control latent for an area of ``h x w`` latent pixels: the control
    image fitted to that size and encoded, which is what an area conditioning entry's rows see (ComfyUI's
    ControlNet resizes its hint to the input it is given). Without it, area rows are refused.
    """

    controlnet: ControlNet
    cond_latent: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    encode: Callable[[int, int], torch.Tensor] | None = None
    _areas: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError(
                f"ControlNet window: expected 0 <= start <= end <= 1, got start={self.start}, end={self.end}"
            )
        if not math.isfinite(self.strength):
            raise ValueError(f"ControlNet strength: expected a finite number, got {self.strength}")

    def active(self, step_index: int, steps: int) -> bool:
        """Whether the ControlNet runs at ``step_index`` (0-based) of ``steps`` sampling steps.

        Never at strength 0: its residuals would be zeros, and skipping them keeps the result bit-identical
        to a run without the ControlNet.
        """
        return self.strength != 0.0 and self.start * steps <= step_index < self.end * steps

    def latent_for(self, hw: tuple[int, int], crop: tuple[int, int] | None) -> torch.Tensor:
        """The control latent for rows of latent size ``hw``: :attr:`cond_latent` for the whole latent; for an
        area of size ``crop`` (before padding to ``hw``), :attr:`encode` of that size, padded circularly to ``hw``
        as the rows are (cached per size)."""
        if crop is None:
            return self.cond_latent
        if crop not in self._areas:
            if self.encode is None:
                raise ValueError(f"ControlNet with area conditioning: the control image must be fitted to the area "
                                 f"({crop[1] * 8}x{crop[0] * 8} pixels) and this ControlHint has no encode function "
                                 "to do it")
            latent = self.encode(*crop)
            if latent.ndim != 4 or tuple(latent.shape[-2:]) != tuple(crop):
                raise ValueError(f"ControlHint.encode({crop[0]}, {crop[1]}): expected a latent [n, C, {crop[0]}, "
                                 f"{crop[1]}], got {tuple(latent.shape)}")
            self._areas[crop] = latent
        latent = self._areas[crop]
        ph, pw = hw[0] - crop[0], hw[1] - crop[1]
        if ph or pw:
            latent = torch.nn.functional.pad(latent, (0, pw, 0, ph), mode="circular")
        return latent
