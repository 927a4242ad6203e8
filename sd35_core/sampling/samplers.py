"""k-diffusion style samplers for the SD3 flow models.

Every sampler has the signature ``sample_<name>(model, x, sigmas, *, callback=None, generator=None)``:

- ``model(x, sigma_batch, step_index) -> denoised`` is the (guided) x0 prediction, float32;
  ``step_index`` is the sampling-step index ``i`` (samplers that call the model twice per step,
  like ``heun``, pass the same ``i`` both times, so guidance windows stay defined per step).
- ``sigmas`` is a 1-D float32 tensor ending in 0 (see :mod:`.schedule`).
- ``callback(StepInfo)`` is called once per step, after the step's first model call.
- ``generator`` seeds the stochastic samplers (``euler_ancestral``, ``dpmpp_2m_sde``): one
  ``torch.Generator`` for the whole batch, or one per image (noise for image ``i`` is drawn from
  ``generator[i]``), so that a run is reproducible and per-image seeds work. Noise is drawn on the
  generator's device in float32 and moved to ``x``'s device, so results do not depend on where the
  model runs. ``None`` draws from torch's global RNG.

``euler`` and ``dpmpp_2m`` are the Stability reference's functions, operation for operation.
``heun`` is Karras' second-order method. ``euler_ancestral`` and ``dpmpp_2m_sde`` are the flow
(rectified-flow, ComfyUI ``CONST``) forms: the re-noising keeps ``x = (1 - sigma) x0 + sigma noise``
consistent instead of the variance-exploding update, which would push a flow model off its path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class StepInfo:
    """What a sampler reports after each step's model call."""

    index: int  # step index, 0-based
    total: int  # number of steps of this run (len(sigmas) - 1)
    sigma: float  # noise level of the step's input
    x: torch.Tensor  # the noisy latent the model saw
    denoised: torch.Tensor  # the model's (guided) x0 estimate: for previews


def _report(callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(StepInfo(i, len(sigmas) - 1, float(sigmas[i]), x, denoised))


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    # Karras ODE derivative; for the flow models this is the velocity noise - x0.
    return (x - denoised) / _append_dims(sigma, x.ndim)


def noise_like(x: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` from ``generator`` (see module doc), float32 -> x's dtype."""
    if generator is None:
        return torch.randn(x.shape, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    if isinstance(generator, torch.Generator):
        n = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=generator.device)
        return n.to(device=x.device, dtype=x.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"generator: got {len(gens)} generators for a batch of {x.shape[0]}")
    rows = [torch.randn((1,) + tuple(x.shape[1:]), generator=g, dtype=torch.float32, device=g.device) for g in gens]
    return torch.cat([r.to(x.device) for r in rows]).to(x.dtype)


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, generator=None):
    """Euler steps of the probability-flow ODE (the reference's ``sample_euler``)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in, i)
        _report(callback, i, sigmas, x, denoised)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, generator=None):
    """DPM-Solver++(2M) (the reference's ``sample_dpmpp_2m``: ``t = -log(sigma)``)."""
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, i)
        _report(callback, i, sigmas, x, denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, generator=None):
    """Heun's method (Karras et al. 2022, Algorithm 2 without churn); Euler for the final step to 0.

    Two model calls per step (one on the last), both with the step's index.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in, i)
        _report(callback, i, sigmas, x, denoised)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, i)
            d_2 = _to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, generator=None, eta: float = 1.0
):
    """Ancestral Euler for flow models (ComfyUI's rectified-flow form, ``eta`` = 1 by default).

    Each step goes deterministically down to ``sigma_down = sigma_next * (1 + (sigma_next / sigma - 1)
    * eta)``, then rescales and adds fresh noise so the result is again a point of the flow path at
    ``sigma_next``. The last step (to 0) returns the denoised estimate.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, i)
        _report(callback, i, sigmas, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        alpha_next = 1 - sigma_next
        alpha_down = 1 - sigma_down
        renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
        ratio = sigma_down / sigma
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = (alpha_next / alpha_down) * x + noise_like(x, generator) * renoise
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, generator=None, eta: float = 1.0
):
    """DPM-Solver++(2M) SDE (midpoint) for flow models, in the half-log-SNR ``lambda = log((1-s)/s)``.

    Differences from ComfyUI, both deliberate: noise is plain Gaussian from ``generator`` (ComfyUI uses
    a torchsde Brownian tree, not a dependency here), and a first sigma of 1 is taken at its exact limit
    (``lambda = -inf``: the step fully re-noises, ``x = (1 - s') x0 + s' noise``) instead of being nudged
    below 1, so the model sees sigma 1 like every other sampler.
    """
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h = h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, i)
        _report(callback, i, sigmas, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = sigma.logit().neg(), sigma_next.logit().neg()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()  # = 1 - sigma_next
            # exp(-h * eta) written so that eta = 0 at sigma = 1 (h = inf) gives 1, not inf * 0 = nan
            decay = (-h * eta).exp() if eta > 0 else torch.ones_like(h)
            x = sigma_next / sigma * decay * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0:
                x = x + noise_like(x, generator) * sigma_next * (-2 * h * eta).expm1().neg().sqrt()
        old_denoised = denoised
        h_last = h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}

# Samplers that draw noise while sampling (their results depend on the generator, not only the seed noise).
STOCHASTIC_SAMPLERS = frozenset({"euler_ancestral", "dpmpp_2m_sde"})


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler called ``name``; ValueError listing the known ones otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {name!r}") from None
