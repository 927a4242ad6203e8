"""Plain-Python sampling API over loaded parts: :func:`txt2img` and :func:`img2img`.

Both return latents in raw VAE space (``process_out`` applied), ready for the VAE decoder or ComfyUI's
``LATENT`` type. What they do, step by step, is the Stability reference's ``do_sampling``:

1. noise ``[B, 16, h, w]`` from ``torch.Generator().manual_seed(seed)`` drawn on the CPU in float32 for
   the whole batch (the same numbers as the reference's ``torch.manual_seed(seed); torch.randn(...)``,
   without touching torch's global RNG); ``seed_mode="per_image"`` draws image ``i`` from its own
   generator seeded ``seed + i`` instead, so image ``i`` equals a batch-1 run with seed ``seed + i``;
2. sigmas from the schedule, img2img dropping the first ``int(steps * (1 - denoise))``;
3. ``x = sigma_0 * noise + (1 - sigma_0) * process_in(init_latent)`` (txt2img: an all-zero latent, which
   sigma_0 = 1 makes irrelevant);
4. the sampler over the :class:`~.guidance.Guider` (CFG, skip-layer guidance, ControlNet hints);
5. ``process_out``.

Everything runs on the model's device; noise and sigmas are made on the CPU in float32 and moved there.
Stochastic samplers keep drawing from the same generator(s), so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .guidance import CondEntry, Guider, SkipLayerGuidance
from .latent import process_in, process_out
from .samplers import StepInfo, get_sampler
from .schedule import SCHEDULES, sigmas_for

if TYPE_CHECKING:
    from .controlnet import ControlHint
    from .mmditx import MMDiTX

SEED_MODES = ("batch", "per_image")
MAX_SEED = 2**64 - 1


class Interrupted(Exception):
    """Raised when ``should_cancel()`` returns true during sampling."""


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected a whole number >= {lo}, got {value!r}")
    return value


def _check_cfg(cfg) -> float:
    try:
        v = float(cfg)
    except (TypeError, ValueError):
        raise ValueError(f"cfg: expected a finite number, got {cfg!r}") from None
    if isinstance(cfg, bool) or not math.isfinite(v):
        raise ValueError(f"cfg: expected a finite number, got {cfg!r}")
    return v


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: expected a whole number in 0..{MAX_SEED}, got {seed!r}")
    return seed


def make_noise(
    shape: Sequence[int], seed: int, seed_mode: str = "batch"
) -> tuple[torch.Tensor, torch.Generator | list[torch.Generator]]:
    """Initial noise (CPU float32) and the generator(s) the sampler continues with (see module doc)."""
    seed = _check_seed(seed)
    if seed_mode not in SEED_MODES:
        raise ValueError(f"seed_mode: expected one of {', '.join(SEED_MODES)}, got {seed_mode!r}")
    shape = tuple(shape)
    if seed_mode == "batch":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=torch.float32), gen
    gens = [torch.Generator().manual_seed((seed + i) % (MAX_SEED + 1)) for i in range(shape[0])]
    rows = [torch.randn((1,) + shape[1:], generator=g, dtype=torch.float32) for g in gens]
    return torch.cat(rows), gens


def _model_device(model: MMDiTX) -> torch.device:
    return model.context_embedder.weight.device


def _run(
    model: MMDiTX,
    positive,
    negative,
    *,
    latent: torch.Tensor,
    denoise: float,
    steps: int,
    cfg: float,
    sampler: str,
    shift: float,
    seed: int,
    schedule: str,
    slg: SkipLayerGuidance | None,
    controls: Sequence[ControlHint],
    seed_mode: str,
    callback: Callable[[StepInfo], None] | None,
    should_cancel: Callable[[], bool] | None,
    share_slg_prefix: bool,
    skip_uncond_at_cfg1: bool,
) -> torch.Tensor:
    steps = _check_int("steps", steps, 1)
    cfg = _check_cfg(cfg)
    sample = get_sampler(sampler)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    sigmas = sigmas_for(schedule, steps, shift, denoise)  # validates shift and denoise
    guider = Guider(
        model,
        positive,
        negative,
        cfg=cfg,
        steps=steps,
        shift=shift,
        slg=slg,
        controls=controls,
        share_slg_prefix=share_slg_prefix,
        skip_uncond_at_cfg1=skip_uncond_at_cfg1,
    )
    noise, generator = make_noise(latent.shape, seed, seed_mode)

    device = _model_device(model)
    sigmas = sigmas.to(device)
    noise = noise.to(device)
    latent = process_in(latent.to(device=device, dtype=torch.float32))

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, step_index: int) -> torch.Tensor:
        if should_cancel is not None and should_cancel():
            raise Interrupted(f"sampling cancelled at step {step_index + 1} of {len(sigmas) - 1}")
        return guider(x, sigma, step_index)

    with torch.no_grad():
        sigma0 = sigmas[0]
        x = sigma0 * noise + (1.0 - sigma0) * latent
        x = sample(denoiser, x, sigmas, callback=callback, generator=generator)
    return process_out(x)


def txt2img(
    model: MMDiTX,
    positive: CondEntry | Sequence[CondEntry],
    negative: CondEntry | Sequence[CondEntry],
    *,
    width: int,
    height: int,
    steps: int,
    cfg: float,
    sampler: str,
    shift: float,
    seed: int,
    schedule: str = "reference",
    batch_size: int = 1,
    slg: SkipLayerGuidance | None = None,
    controls: Sequence[ControlHint] = (),
    seed_mode: str = "batch",
    callback: Callable[[StepInfo], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    share_slg_prefix: bool = True,
    skip_uncond_at_cfg1: bool = False,
) -> torch.Tensor:
    """Generate ``batch_size`` latents of ``width`` x ``height`` pixels; raw VAE space ``[B, 16, h/8, w/8]``.

    ``callback`` receives a :class:`~.samplers.StepInfo` after each step's model call (its ``denoised``
    is the current x0 estimate, for previews); ``should_cancel`` is polled before every model call and a
    true result raises :class:`Interrupted`. ``share_slg_prefix`` and ``skip_uncond_at_cfg1`` are the
    :class:`~.guidance.Guider` options.
    """
    config = model.config
    step = 8 * config.patch_size
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step:
            raise ValueError(f"{name}: expected a positive multiple of {step} pixels, got {v!r}")
    config.check_image_size(width, height)
    batch_size = _check_int("batch_size", batch_size, 1)
    latent = torch.zeros((batch_size, config.in_channels, height // 8, width // 8), dtype=torch.float32)
    return _run(
        model,
        positive,
        negative,
        latent=latent,
        denoise=1.0,
        steps=steps,
        cfg=cfg,
        sampler=sampler,
        shift=shift,
        seed=seed,
        schedule=schedule,
        slg=slg,
        controls=controls,
        seed_mode=seed_mode,
        callback=callback,
        should_cancel=should_cancel,
        share_slg_prefix=share_slg_prefix,
        skip_uncond_at_cfg1=skip_uncond_at_cfg1,
    )


def img2img(
    model: MMDiTX,
    positive: CondEntry | Sequence[CondEntry],
    negative: CondEntry | Sequence[CondEntry],
    *,
    init_latent: torch.Tensor,
    denoise: float,
    steps: int,
    cfg: float,
    sampler: str,
    shift: float,
    seed: int,
    schedule: str = "reference",
    batch_size: int | None = None,
    slg: SkipLayerGuidance | None = None,
    controls: Sequence[ControlHint] = (),
    seed_mode: str = "batch",
    callback: Callable[[StepInfo], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    share_slg_prefix: bool = True,
    skip_uncond_at_cfg1: bool = False,
) -> torch.Tensor:
    """Re-noise ``init_latent`` (raw VAE space ``[B, 16, h, w]``) to the ``denoise`` point of the schedule
    and sample from there; ``denoise`` in (0, 1]. A single init latent with ``batch_size`` > 1 is
    repeated. Other arguments as :func:`txt2img`."""
    config = model.config
    if (
        not isinstance(init_latent, torch.Tensor)
        or init_latent.ndim != 4
        or init_latent.shape[1] != config.in_channels
        or init_latent.shape[0] < 1
    ):
        shape = tuple(init_latent.shape) if isinstance(init_latent, torch.Tensor) else type(init_latent).__name__
        raise ValueError(f"init_latent: expected a latent [B, {config.in_channels}, h, w], got {shape}")
    if not torch.isfinite(init_latent).all():
        raise ValueError("init_latent: contains NaN or infinite values")
    h, w = init_latent.shape[-2:]
    p = config.patch_size
    if h % p or w % p:
        raise ValueError(f"init_latent: expected height and width divisible by the patch size {p}, got {h}x{w}")
    config.check_image_size(w * 8, h * 8)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
        if init_latent.shape[0] == 1:
            init_latent = init_latent.expand(batch_size, -1, -1, -1)
        elif init_latent.shape[0] != batch_size:
            raise ValueError(f"batch_size: {batch_size} does not match the {init_latent.shape[0]} init latents")
    return _run(
        model,
        positive,
        negative,
        latent=init_latent,
        denoise=denoise,
        steps=steps,
        cfg=cfg,
        sampler=sampler,
        shift=shift,
        seed=seed,
        schedule=schedule,
        slg=slg,
        controls=controls,
        seed_mode=seed_mode,
        callback=callback,
        should_cancel=should_cancel,
        share_slg_prefix=share_slg_prefix,
        skip_uncond_at_cfg1=skip_uncond_at_cfg1,
    )
