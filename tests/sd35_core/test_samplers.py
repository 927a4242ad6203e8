"""Samplers against a toy problem with a known exact answer, and against the reference's own loops.

Toy problem: data x0 ~ N(mu, s^2) independently per dimension, noised on the flow path
x_sigma = (1 - sigma) x0 + sigma eps. Then x_sigma ~ N((1 - sigma) mu, v), v = (1 - sigma)^2 s^2 + sigma^2,
the optimal denoiser is E[x0 | x_sigma] = mu + (1 - sigma) s^2 / v * (x_sigma - (1 - sigma) mu), and the
probability-flow ODE carries the noise z at sigma = 1 to x_sigma = (1 - sigma) mu + sqrt(v) z (for a
Gaussian it is the monotone map between the marginals), so its endpoint at sigma = 0 is mu + s z.
"""

import math

import pytest
import torch

from sd35_core.sampling.samplers import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    StepInfo,
    get_sampler,
    sample_dpmpp_2m,
    sample_euler,
)
from sd35_core.sampling.schedule import SCHEDULES, flow_sigma, reference_sigmas, sigmas_for

from .sampling_common import ref_sample_dpmpp_2m, ref_sample_euler

D = 64
_gen = torch.Generator().manual_seed(0)
MU = torch.randn(D, generator=_gen, dtype=torch.float64)
S = torch.rand(D, generator=_gen, dtype=torch.float64) * 1.5 + 0.2


def gaussian_denoiser(mu, s):
    def model(x, sigma, step_index):
        sg = sigma.view(-1, *([1] * (x.ndim - 1)))
        v = (1 - sg) ** 2 * s**2 + sg**2
        return mu + (1 - sg) * s**2 / v * (x - (1 - sg) * mu)

    return model


def exact_at(z, sigma_end, mu=MU, s=S):
    v = (1 - sigma_end) ** 2 * s**2 + sigma_end**2
    return (1 - sigma_end) * mu + v.sqrt() * z


def noise(batch=8, seed=1):
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def error(name, steps, sigmas_fn, z):
    sigmas = sigmas_fn(steps)
    out = SAMPLERS[name](gaussian_denoiser(MU, S), z.clone(), sigmas)
    return (out - exact_at(z, float(sigmas[-1]))).abs().max().item()


def partial_sigmas(steps):
    # 1 -> 0.05 evenly: every step is small in every time variable, so orders show cleanly
    return torch.linspace(1, 0.05, steps + 1, dtype=torch.float64)


def full_sigmas(steps):
    return flow_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64), 3.0)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order(name, order):
    z = noise()
    errs = [error(name, n, partial_sigmas, z) for n in (64, 128, 256)]
    measured = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    for m in measured:
        assert abs(m - order) < 0.1, (name, errs, measured)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_deterministic_samplers_reach_the_exact_ode_endpoint(name):
    z = noise()
    errs = [error(name, n, full_sigmas, z) for n in (8, 32, 128, 512)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    # within a small fraction of the data spread once steps are plentiful
    assert errs[-1] < 0.01 * S.max().item(), errs


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_on_every_schedule_the_deterministic_samplers_reach_the_exact_endpoint(name, order, schedule):
    # Each schedule's own sigmas carry the Gaussian's noise to its exact ODE endpoint, and eight times the
    # steps divide the error by roughly 8 ** order (less where a schedule spaces its first steps unevenly).
    z = noise()

    def err(steps):
        sigmas = sigmas_for(schedule, steps, 3.0).double()
        out = SAMPLERS[name](gaussian_denoiser(MU, S), z.clone(), sigmas)
        return (out - exact_at(z, 0.0)).abs().max().item()

    coarse, fine = err(10), err(80)
    assert coarse / fine > 0.2 * 8**order and fine < 0.1 * S.max().item(), (coarse, fine)


@pytest.fixture
def one_thread():
    # tens of thousands of tiny element-wise ops: thread hand-offs would cost more than the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_stochastic_samplers_reach_the_exact_distribution(name, one_thread):
    # Pathwise the answer is random, so compare the sampled distribution with N(mu, s^2).
    mu = torch.tensor([-1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.5, 0.3, 1.0], dtype=torch.float64)
    n = 20000

    def moments_error(steps):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        out = SAMPLERS[name](gaussian_denoiser(mu, s), x, full_sigmas(steps), generator=gen)
        mean_err = ((out.mean(0) - mu) / s).abs().max().item()
        std_err = (out.std(0) / s - 1).abs().max().item()
        return mean_err, std_err

    coarse, fine = moments_error(4), moments_error(400)
    standard_error = 1 / math.sqrt(n)
    assert fine[0] < 5 * standard_error + 0.01, fine
    assert fine[1] < 0.05, fine
    assert fine[1] < coarse[1] / 4, (coarse, fine)


def _nonlinear_denoiser():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(5)) / 4

    def model(x, sigma, *args):
        h = torch.einsum("bchw,dc->bdhw", x, w)
        return torch.tanh(h) * (1 - sigma.view(-1, 1, 1, 1)) + 0.1 * x

    return model


@pytest.mark.parametrize("ours, ref", [(sample_euler, ref_sample_euler), (sample_dpmpp_2m, ref_sample_dpmpp_2m)])
@pytest.mark.parametrize("steps, shift", [(1, 3.0), (2, 3.0), (7, 3.0), (30, 1.0)])
def test_euler_and_dpmpp_2m_equal_the_reference_loops_bit_for_bit(ours, ref, steps, shift):
    model = _nonlinear_denoiser()
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(6))
    sigmas = reference_sigmas(steps, shift)
    for sig in (sigmas, sigmas[steps // 2 :]):
        assert torch.equal(ours(model, x, sig), ref(model, x, sig))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_reports_every_step_with_its_x0_estimate(name):
    model = _nonlinear_denoiser()
    sigmas = reference_sigmas(5, 3.0)
    seen: list[StepInfo] = []
    calls: list[int] = []

    def counting(x, sigma, i):
        calls.append(i)
        return model(x, sigma, i)

    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(7))
    SAMPLERS[name](counting, x, sigmas, callback=seen.append, generator=torch.Generator().manual_seed(8))
    assert [s.index for s in seen] == list(range(5))
    assert all(s.total == 5 for s in seen)
    assert [s.sigma for s in seen] == sigmas[:-1].tolist()
    assert all(s.denoised.shape == x.shape for s in seen)
    assert sorted(set(calls)) == list(range(5))
    if name == "heun":
        # two calls a step, both with the step's index; the last step (to 0) is Euler
        assert calls == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    else:
        assert calls == list(range(5))


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_stochastic_samplers_are_reproducible_and_per_image_generators_work(name):
    model = _nonlinear_denoiser()
    sigmas = reference_sigmas(6, 3.0)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    run = SAMPLERS[name]
    a = run(model, x, sigmas, generator=torch.Generator().manual_seed(1))
    b = run(model, x, sigmas, generator=torch.Generator().manual_seed(1))
    c = run(model, x, sigmas, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # one generator per image: row i equals a batch-1 run with that generator
    per_image = run(model, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
    for i, seed in enumerate((10, 11)):
        single = run(model, x[i : i + 1], sigmas, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(per_image[i : i + 1], single, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="generator"):
        run(model, x, sigmas, generator=[torch.Generator()])


def test_deterministic_samplers_ignore_the_generator():
    model = _nonlinear_denoiser()
    sigmas = reference_sigmas(4, 3.0)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    for name in set(SAMPLERS) - STOCHASTIC_SAMPLERS:
        a = SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(1))
        b = SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b), name


def test_unknown_sampler_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match="sampler: expected one of euler, .*dpmpp_2m.*got 'ddim'"):
        get_sampler("ddim")
    assert get_sampler("heun") is SAMPLERS["heun"]
