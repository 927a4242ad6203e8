import math

import mpmath
import numpy as np
import pytest
import torch

from sd35_core.sampling.schedule import (
    SCHEDULES,
    beta_cdf,
    beta_ppf,
    beta_sigmas,
    comfy_sigma_table,
    flow_sigma,
    normal_sigmas,
    percent_to_sigma,
    reference_sigmas,
    sgm_uniform_sigmas,
    sigmas_for,
    simple_sigmas,
)

STEPS = [1, 2, 4, 7, 28, 40, 50, 60]
SHIFTS = [1.0, 3.0, 0.5, 6.0]


# --- the Stability reference, transcribed line by line (sd3_impls.ModelSamplingDiscreteFlow and
# --- sd3_infer.SD3Inferencer.get_sigmas) as the independent computation to match bit for bit.
class _RefModelSamplingDiscreteFlow:
    def __init__(self, shift=1.0):
        self.shift = shift
        timesteps = 1000
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * 1000

    def sigma(self, timestep):
        timestep = timestep / 1000.0
        if self.shift == 1.0:
            return timestep
        return self.shift * timestep / (1 + (self.shift - 1) * timestep)


def _ref_get_sigmas(sampling, steps):
    start = sampling.timestep(sampling.sigma_max)
    end = sampling.timestep(sampling.sigma_min)
    timesteps = torch.linspace(start, end, steps)
    sigs = []
    for x in range(len(timesteps)):
        ts = timesteps[x]
        sigs.append(sampling.sigma(ts))
    sigs += [0.0]
    return torch.FloatTensor(sigs)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_reference_sigmas_are_bit_identical_to_the_reference(steps, shift):
    ours = reference_sigmas(steps, shift)
    ref = _ref_get_sigmas(_RefModelSamplingDiscreteFlow(shift), steps)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_comfyui_normal_equals_the_reference(steps, shift):
    # DESIGN.md: ComfyUI native matches the reference with its `normal` scheduler.
    assert torch.equal(normal_sigmas(steps, shift), reference_sigmas(steps, shift))


def test_schedules_start_at_one_end_at_zero_and_decrease():
    for name, fn in SCHEDULES.items():
        for steps in (1, 3, 20):
            s = fn(steps, 3.0)
            assert s[0] == 1.0, name
            assert s[-1] == 0.0, name
            assert (s[1:] < s[:-1]).all(), name
            if name != "beta":
                assert len(s) == steps + 1, name


def test_flow_sigma_curve():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        s = flow_sigma(t, shift)
        assert s[0] == 0 and s[-1] == 1
        assert (s[1:] > s[:-1]).all()
        # inverse of the shift: t = s / (shift - (shift - 1) s)
        assert torch.allclose(s / (shift - (shift - 1) * s), t, atol=1e-12)
    assert flow_sigma(t, 1.0) is t
    # a larger shift spends more of the schedule at high noise
    assert (flow_sigma(t[1:-1], 3.0) > t[1:-1]).all()


def test_comfy_table_is_the_flow_curve_on_the_timesteps():
    for shift in SHIFTS:
        table = comfy_sigma_table(shift).double()
        t = torch.arange(1, 1001, dtype=torch.float64) / 1000
        assert torch.allclose(table, flow_sigma(t, shift), rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 3, 10, 33])
def test_simple_takes_evenly_strided_table_entries_from_the_top(steps):
    table = comfy_sigma_table(3.0)
    s = simple_sigmas(steps, 3.0)
    for i in range(steps):
        index = len(table) - 1 - math.floor(i * len(table) / steps)
        assert s[i] == table[index]
    assert s[-1] == 0


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_sgm_uniform_drops_the_last_of_steps_plus_one_timesteps(steps):
    table = comfy_sigma_table(3.0)
    ts = torch.linspace(float(table[-1]) * 1000, float(table[0]) * 1000, steps + 1)[:-1].double() / 1000
    expected = flow_sigma(ts, 3.0)
    s = sgm_uniform_sigmas(steps, 3.0)
    assert torch.allclose(s[:-1].double(), expected, rtol=1e-6, atol=0)
    assert s[-1] == 0 and len(s) == steps + 1


def test_beta_quantiles_match_mpmath():
    for a, b in ((0.6, 0.6), (0.5, 2.0), (3.0, 1.5)):
        for q in np.linspace(0, 1, 41)[1:-1]:
            x = beta_ppf(float(q), a, b)
            # an independent regularised incomplete beta function
            assert abs(float(mpmath.betainc(a, b, 0, x, regularized=True)) - q) < 1e-12
            assert abs(beta_cdf(x, a, b) - q) < 1e-13


@pytest.mark.parametrize("steps", [1, 5, 20, 80])
def test_beta_schedule_picks_table_entries_at_beta_quantiles(steps):
    table = comfy_sigma_table(3.0)
    expected, last = [], None
    for i in range(steps):
        # quantile (checked against mpmath above) scaled to the 999 table intervals, rounded half-even
        index = int(np.rint(beta_ppf(1 - i / steps, 0.6, 0.6) * 999))
        if index != last:
            expected.append(float(table[index]))
        last = index
    s = beta_sigmas(steps, 3.0)
    assert s[:-1].tolist() == expected
    assert s[-1] == 0


def test_percent_to_sigma_follows_comfyui():
    assert percent_to_sigma(0.0, 3.0) == 1.0
    assert percent_to_sigma(-0.5, 3.0) == 1.0
    assert percent_to_sigma(1.0, 3.0) == 0.0
    for p in (0.01, 0.2, 0.5, 0.9):
        for shift in (1.0, 3.0):
            assert percent_to_sigma(p, shift) == flow_sigma(1.0 - p, shift)
    # later in sampling means lower sigma
    assert percent_to_sigma(0.2, 3.0) > percent_to_sigma(0.5, 3.0)


@pytest.mark.parametrize("denoise", [1.0, 0.75, 0.5, 0.3, 0.01])
def test_img2img_drops_the_first_sigmas_like_the_reference(denoise):
    steps = 10
    full = reference_sigmas(steps, 3.0)
    ours = sigmas_for("reference", steps, 3.0, denoise)
    # the reference's do_sampling: sigmas[int(steps * (1 - denoise)):]
    assert torch.equal(ours, full[int(steps * (1 - denoise)) :])
    assert len(ours) >= 2


def test_sigmas_for_every_schedule():
    for name in SCHEDULES:
        assert torch.equal(sigmas_for(name, 6, 3.0), SCHEDULES[name](6, 3.0))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=True), "steps"),
        (dict(denoise=0.0), "denoise"),
        (dict(denoise=1.5), "denoise"),
        (dict(denoise=float("nan")), "denoise"),
        (dict(shift=0.0), "shift"),
        (dict(shift=-1.0), "shift"),
        (dict(shift=float("inf")), "shift"),
        (dict(shift=float("nan")), "shift"),
        (dict(schedule="karras"), "schedule"),
    ],
)
def test_bad_settings_raise_value_errors_naming_the_field(kwargs, field):
    args = dict(schedule="reference", steps=4, shift=3.0, denoise=1.0) | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        sigmas_for(**args)

