"""Noise schedules for the SD3 discrete-flow models.

The flow models see ``x_sigma = (1 - sigma) * x0 + sigma * noise``; ``shift`` bends the schedule towards
high noise: ``sigma(t) = shift * t / (1 + (shift - 1) * t)`` for ``t`` in ``(0, 1]``, and the model is
given the timestep ``sigma * 1000``.

``reference`` reproduces the Stability reference's ``SD3Inferencer.get_sigmas`` over its
``ModelSamplingDiscreteFlow`` bit for bit: the same float32 torch operations in the same order.
``normal``, ``simple``, ``sgm_uniform`` and ``beta`` reproduce ComfyUI's schedulers of those names
for SD3 models (multiplier 1000), so a user can match native ComfyUI results as well. ComfyUI's
``normal`` is the reference's computation (its sigma table is built as ``(arange / 1000) * 1000 / 1000``
instead of ``arange / 1000``, which does not change the two end points the linspace uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..validation import check_finite, check_int

NUM_TIMESTEPS = 1000
TIMESTEP_MULTIPLIER = 1000


def check_steps(steps: int) -> int:
    """``steps`` as an int (numpy integers accepted); ValueError unless it is a whole number >= 1."""
    return check_int("steps", int(steps) if isinstance(steps, np.integer) else steps, 1)


def check_shift(shift: float) -> float:
    """``shift`` as a float; ValueError unless it is a finite number > 0."""
    return check_finite("shift", shift, above=0.0)


def check_denoise(denoise: float) -> float:
    """``denoise`` as a float; ValueError unless it is a finite number in (0, 1]."""
    return check_finite("denoise", denoise, hi=1.0, above=0.0)


# --------------------------------------------------------------------------------------------------
# the flow curve


def flow_sigma(t, shift: float):
    """The shifted flow schedule ``shift * t / (1 + (shift - 1) * t)`` for ``t`` in ``[0, 1]``.

    Works on floats and tensors alike; ``shift == 1`` returns ``t`` untouched, as both the reference and
    ComfyUI do.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def percent_to_sigma(percent: float, shift: float) -> float:
    """ComfyUI's ``percent_to_sigma`` for flow models: 0 % of sampling is sigma 1, 100 % is sigma 0.

    Used for timestep ranges on conditioning and for the sigma-window variant of skip-layer guidance.
    """
    shift = check_shift(shift)
    percent = float(percent)
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return flow_sigma(1.0 - percent, shift)


# --------------------------------------------------------------------------------------------------
# schedules


def _reference_sigma(timestep: torch.Tensor, shift: float) -> torch.Tensor:
    # ModelSamplingDiscreteFlow.sigma of the reference, operation for operation.
    timestep = timestep / 1000.0
    if shift == 1.0:
        return timestep
    return shift * timestep / (1 + (shift - 1) * timestep)


def reference_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The reference's sigmas: ``steps`` values linearly spaced in timestep from ``sigma_max`` to
    ``sigma_min`` of its 1000-entry table, mapped through ``sigma()``, then a final 0 (float32, CPU)."""
    steps = check_steps(steps)
    shift = check_shift(shift)
    table = _reference_sigma(torch.arange(1, NUM_TIMESTEPS + 1, 1), shift)
    start = table[-1] * 1000
    end = table[0] * 1000
    timesteps = torch.linspace(start, end, steps)
    sigs = [_reference_sigma(timesteps[i], shift) for i in range(len(timesteps))]
    return torch.tensor([float(s) for s in sigs] + [0.0], dtype=torch.float32)


def _comfy_sigma(timestep: torch.Tensor, shift: float) -> torch.Tensor:
    # ComfyUI ModelSamplingDiscreteFlow.sigma: time_snr_shift(shift, timestep / multiplier).
    return flow_sigma(timestep / TIMESTEP_MULTIPLIER, shift)


def comfy_sigma_table(shift: float) -> torch.Tensor:
    """ComfyUI's 1000-entry sigma table for a flow model with ``shift`` (float32)."""
    shift = check_shift(shift)
    t = (torch.arange(1, NUM_TIMESTEPS + 1, 1) / NUM_TIMESTEPS) * TIMESTEP_MULTIPLIER
    return _comfy_sigma(t, shift)


def normal_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ``normal`` scheduler (equal to the reference's schedule)."""
    return _comfy_linear(steps, shift, sgm=False)


def sgm_uniform_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ``sgm_uniform`` scheduler: ``steps + 1`` timesteps, the last one dropped, then 0."""
    return _comfy_linear(steps, shift, sgm=True)


def _comfy_linear(steps: int, shift: float, sgm: bool) -> torch.Tensor:
    steps = check_steps(steps)
    table = comfy_sigma_table(shift)
    start = table[-1] * TIMESTEP_MULTIPLIER
    end = table[0] * TIMESTEP_MULTIPLIER
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        # ComfyUI lets a schedule whose last timestep already means sigma ~ 0 end there instead of
        # appending one more 0 (only reachable with tiny shifts).
        if math.isclose(float(_comfy_sigma(end, shift)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(_comfy_sigma(timesteps[i], shift)) for i in range(len(timesteps))]
    if append_zero:
        sigs.append(0.0)
    return torch.tensor(sigs, dtype=torch.float32)


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ``simple`` scheduler: evenly strided entries of the sigma table from the top, then 0."""
    steps = check_steps(steps)
    table = comfy_sigma_table(shift)
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def beta_sigmas(steps: int, shift: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's ``beta`` scheduler (arXiv 2407.12173): table indices at Beta(alpha, beta) quantiles.

    Repeated indices are dropped, so a large ``steps`` can give fewer than ``steps`` sampling steps,
    exactly as in ComfyUI.
    """
    steps = check_steps(steps)
    table = comfy_sigma_table(shift)
    total = len(table) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(np.array([beta_ppf(float(q), alpha, beta) for q in quantiles]) * total)
    sigs: list[float] = []
    last = -1.0
    for t in ts:
        if t != last:
            sigs.append(float(table[int(t)]))
        last = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Beta distribution quantiles without scipy (sd35_core keeps to torch/numpy)


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz), double precision.
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)``: the CDF of Beta(a, b) at ``x``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection on :func:`beta_cdf` (to double precision)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------
# public entry


SCHEDULES: dict[str, Callable[[int, float], torch.Tensor]] = {
    "reference": reference_sigmas,
    "normal": normal_sigmas,
    "simple": simple_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "beta": beta_sigmas,
}


def sigmas_for(schedule: str, steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas to sample with: the ``steps``-step ``schedule`` then, for img2img, the reference's
    truncation: the first ``int(steps * (1 - denoise))`` sigmas are dropped.

    At least one sampling step always remains (only ``beta``, which can merge steps, could otherwise
    drop them all).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    steps = check_steps(steps)
    shift = check_shift(shift)
    denoise = check_denoise(denoise)
    sigmas = SCHEDULES[schedule](steps, shift)
    drop = int(steps * (1 - denoise))
    drop = min(drop, len(sigmas) - 2)
    return sigmas[drop:]
