"""Plain-Python sampling API over loaded parts: :func:`sample`, and :func:`txt2img` / :func:`img2img` over it.

Each takes the model, the conditioning and a :class:`~.request.SampleRequest` (every other setting of
the run) and returns latents in raw VAE space (``process_out`` applied), ready for the VAE decoder or
ComfyUI's ``LATENT`` type. What :func:`sample` does, step by step, is the Stability reference's
``do_sampling``:

1. noise ``[B, 16, h, w]`` from ``torch.Generator().manual_seed(seed)`` drawn on the CPU in float32 for
   the whole batch (the same numbers as the reference's ``torch.manual_seed(seed); torch.randn(...)``,
   without touching torch's global RNG); ``seed_mode="per_image"`` draws image ``i`` from its own
   generator seeded ``seed + i`` instead, so image ``i`` equals a batch-1 run with seed ``seed + i``;
2. sigmas from the schedule, dropping the first ``int(steps * (1 - denoise))`` (img2img);
3. ``x = sigma_0 * noise + (1 - sigma_0) * process_in(init_latent)`` (txt2img: an all-zero latent, which
   sigma_0 = 1 makes irrelevant; as in ComfyUI an all-zero latent is not shifted, it stays 0 in model space);
4. the sampler over the :class:`~.guidance.Guider` (CFG, skip-layer guidance, ControlNet hints), with the
   request's noise mask applied around it as ComfyUI's ``KSamplerX0Inpaint`` does (:mod:`.mask`);
5. ``process_out``.

Everything runs on the model's device; noise and sigmas are made on the CPU in float32 and moved there.
Stochastic samplers keep drawing from the same generator(s), so runs are reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import Interrupted
from ..models.latent import process_in, process_out
from ..models.numerics import check_denoised
from ..validation import MAX_SEED, check_int
from .guidance import CondEntry, Guider
from .mask import NoiseMaskBlend, latent_mask
from .passes import ModelPasses, PassStats, WholePasses
from .request import SampleRequest
from .samplers import StepInfo, get_sampler

if TYPE_CHECKING:
    from ..models.mmditx import MMDiTConfig, MMDiTX

log = logging.getLogger(__name__)

__all__ = ["RunHooks", "SampleRequest", "img2img", "make_noise", "sample", "txt2img"]


def make_noise(
    shape: Sequence[int], seed: int, seed_mode: str = "batch"
) -> tuple[torch.Tensor, torch.Generator | list[torch.Generator]]:
    """Initial noise (CPU float32) and the generator(s) the sampler continues with (see module doc); ``seed``
    and ``seed_mode`` as a :class:`~.request.SampleRequest` checked them."""
    shape = tuple(shape)
    if seed_mode == "batch":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float32), gen
    gens = [torch.Generator().manual_seed((seed + i) % (MAX_SEED + 1)) for i in range(shape[0])]
    rows = [torch.randn((1,) + shape[1:], generator=g, dtype=torch.float32) for g in gens]
    return torch.cat(rows), gens


@dataclass(frozen=True)
class RunHooks:
    """What a caller hears of a run and how it stops one, travelling together.

    ``callback`` receives a :class:`~.samplers.StepInfo` after each step's model call (its ``denoised`` is the
    current x0 estimate, for previews); ``should_cancel`` is polled before every model call and a true result
    raises :class:`~..errors.Interrupted`; ``stats``, when given, is filled in with what the run computed
    (model passes, step-cache hits).
    """

    callback: Callable[[StepInfo], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    stats: PassStats | None = None


NO_HOOKS = RunHooks()


def _check_latent(name: str, latent, config: MMDiTConfig) -> None:
    if (
        not isinstance(latent, torch.Tensor)
        or latent.ndim != 4
        or latent.shape[1] != config.in_channels
        or latent.shape[0] < 1
    ):
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"{name}: expected a latent [B, {config.in_channels}, h, w], got {shape}")
    if not torch.isfinite(latent).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    h, w = latent.shape[-2:]
    p = config.patch_size
    if h % p or w % p:
        raise ValueError(f"{name}: expected height and width divisible by the patch size {p}, got {h}x{w}")
    config.check_image_size(w * 8, h * 8)


def sample(
    model: MMDiTX | ModelPasses | WholePasses,
    positive: CondEntry | Sequence[CondEntry],
    negative: CondEntry | Sequence[CondEntry],
    latent: torch.Tensor,
    request: SampleRequest,
    hooks: RunHooks = NO_HOOKS,
) -> torch.Tensor:
    """Sample ``request`` from ``latent`` (raw VAE space ``[B, 16, h, w]``; at ``denoise`` 1 its content
    does not matter, an all-zero latent is the usual text-to-image start); returns ``[B, 16, h, w]``.

    ``model`` is our MMDiT-X or passes over a model (:mod:`.passes`); ``hooks`` see :class:`RunHooks`. A run
    with the step cache logs how many evaluations it saved.
    """
    if not isinstance(request, SampleRequest):
        raise ValueError(f"request: expected a SampleRequest, got {type(request).__name__}")
    guider = Guider(model, positive, negative, request)
    passes = guider.passes
    _check_latent("latent", latent, passes.config)
    sampler = get_sampler(request.sampler)
    sigmas = request.sigmas()
    if hooks.stats is not None:
        guider.stats = hooks.stats
    noise, generator = make_noise(latent.shape, request.seed, request.seed_mode)

    device = passes.device
    sigmas = sigmas.to(device)
    noise = noise.to(device)
    mask = None if request.noise_mask is None else latent_mask(request.noise_mask, latent.shape).to(device)
    latent = latent.to(device=device, dtype=torch.float32)
    # As ComfyUI: an all-zero latent is the empty latent and stays 0 in model space (the reference's empty
    # latent, filled with the latent shift, maps there too); it only matters where a noise mask keeps it.
    if torch.count_nonzero(latent) > 0:
        latent = process_in(latent)

    steps = len(sigmas) - 1
    weights = passes.weights
    should_cancel = hooks.should_cancel

    def guided(x: torch.Tensor, sigma: torch.Tensor, step_index: int) -> torch.Tensor:
        if should_cancel is not None and should_cancel():
            raise Interrupted(f"sampling cancelled at step {step_index + 1} of {steps}")
        denoised = guider(x, sigma, step_index)
        # NaN weights or an fp16 overflow would otherwise run to the end and save a black image.
        check_denoised(denoised, step_index + 1, steps, weights, passes.compute_dtype)
        return denoised

    # The noise mask acts around the guider, in model space, as ComfyUI's KSamplerX0Inpaint: every row the
    # guider batches (cond, uncond, the skip pass, ControlNet residuals) sees the blended latent.
    denoiser = guided
    if mask is not None:
        denoiser = NoiseMaskBlend(guided, mask, latent, noise, sigmas, request.shift, request.mask_mode)

    with torch.no_grad():
        sigma0 = sigmas[0]
        x = sigma0 * noise + (1.0 - sigma0) * latent
        x = sampler(denoiser, x, sigmas, callback=hooks.callback, generator=generator)
    if guider.cache is not None:
        log.info("step cache (threshold %g): %d of %d steps reused, %d model evaluations saved",
                 request.cache_threshold, guider.cache.cached_steps,
                 guider.cache.cached_steps + guider.cache.full_steps, guider.cache.cached_steps)
    return process_out(x)


def txt2img(
    model: MMDiTX | ModelPasses | WholePasses,
    positive: CondEntry | Sequence[CondEntry],
    negative: CondEntry | Sequence[CondEntry],
    request: SampleRequest,
    *,
    width: int,
    height: int,
    batch_size: int = 1,
    hooks: RunHooks = NO_HOOKS,
) -> torch.Tensor:
    """Generate ``batch_size`` latents of ``width`` x ``height`` pixels; raw VAE space ``[B, 16, h/8, w/8]``.

    :func:`sample` from an all-zero latent; ``request.denoise`` must be 1. Hooks as :func:`sample`.
    """
    if isinstance(request, SampleRequest) and request.denoise != 1.0:
        raise ValueError(f"denoise: text-to-image starts from pure noise (denoise 1), got {request.denoise!r}; "
                         "use img2img with an init latent")
    config = model.config
    step = 8 * config.patch_size
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step:
            raise ValueError(f"{name}: expected a positive multiple of {step} pixels, got {v!r}")
    batch_size = check_int("batch_size", batch_size, 1)
    latent = torch.zeros((batch_size, config.in_channels, height // 8, width // 8), dtype=torch.float32)
    return sample(model, positive, negative, latent, request, hooks)


def img2img(
    model: MMDiTX | ModelPasses | WholePasses,
    positive: CondEntry | Sequence[CondEntry],
    negative: CondEntry | Sequence[CondEntry],
    request: SampleRequest,
    *,
    init_latent: torch.Tensor,
    batch_size: int | None = None,
    hooks: RunHooks = NO_HOOKS,
) -> torch.Tensor:
    """Re-noise ``init_latent`` (raw VAE space ``[B, 16, h, w]``) to the ``request.denoise`` point of the
    schedule and sample from there. A single init latent with ``batch_size`` > 1 is repeated. Hooks as
    :func:`sample`."""
    _check_latent("init_latent", init_latent, model.config)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
        if init_latent.shape[0] == 1:
            init_latent = init_latent.expand(batch_size, -1, -1, -1)
        elif init_latent.shape[0] != batch_size:
            raise ValueError(f"batch_size: {batch_size} does not match the {init_latent.shape[0]} init latents")
    return sample(model, positive, negative, init_latent, request, hooks)
