"""Whole-pipeline latents on tiny models against independent computations.

- diffusers' FlowMatchEulerDiscreteScheduler with the same sigmas, driving our MMDiTX with CFG (and SLG)
  done the diffusers way, on velocities, each conditioning in its own call: euler.
- diffusers' DPMSolverMultistepScheduler (2nd order, dpmsolver++, midpoint): dpmpp_2m, see
  test_dpmpp_2m_against_diffusers_dpmsolver for where its flow mode differs from the reference.
- the reference's do_sampling, transcribed line by line: bit-for-bit equality.
"""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from sd35_core.errors import Interrupted
from sd35_core.models.latent import SD3_LATENT_SCALE, SD3_LATENT_SHIFT
from sd35_core.sampling.pipeline import RunHooks, img2img, make_noise, txt2img
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
from sd35_core.sampling.samplers import SAMPLERS, StepInfo
from sd35_core.sampling.schedule import SCHEDULES, reference_sigmas, sigmas_for

from .sampling_common import (
    RefBaseModel,
    RefCFGDenoiser,
    RefModelSamplingDiscreteFlow,
    RefSkipLayerCFGDenoiser,
    assert_close,
    cond,
    latent,
    model,
    ref_fix_cond,
    ref_sample_dpmpp_2m,
    ref_sample_euler,
)

SIZE = 64  # pixels: an 8x8 latent


def _in(lat):
    return (lat - SD3_LATENT_SHIFT) * SD3_LATENT_SCALE


def _out(lat):
    return lat / SD3_LATENT_SCALE + SD3_LATENT_SHIFT


def _guided_velocity(m, x, t, pos, neg, cfg, slg, i, steps):
    """CFG (+SLG) on velocities as diffusers' SD3 pipeline does, one model call per conditioning."""
    b = x.shape[0]

    def v(entry, skip=()):
        return m(x, t.expand(b), entry.context.expand(b, -1, -1), entry.pooled.expand(b, -1), skip_layers=skip)

    vc, vu = v(pos), v(neg)
    out = vu + cfg * (vc - vu)
    if slg is not None and slg.start * steps < i < slg.end * steps:
        out = out + (vc - v(pos, slg.layers)) * slg.scale
    return out


def _diffusers_euler(m, pos, neg, *, steps, cfg, shift, seed, batch, slg=None, init=None, denoise=1.0):
    sigmas = sigmas_for("reference", steps, shift, denoise)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    assert torch.equal(sched.sigmas, sigmas)
    noise = torch.randn((batch, 16, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
    if init is None:
        x = noise
    else:
        x = sched.scale_noise(_in(init), sched.timesteps[:1], noise)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = _guided_velocity(m, x, t, pos, neg, cfg, slg, i, steps)
            x = sched.step(v, t, x).prev_sample
    return _out(x)


@pytest.mark.parametrize(
    "variant, batch, use_slg, denoise",
    [
        ("sd3.5_large", 1, False, 1.0),
        ("sd3.5_medium", 2, True, 1.0),
        ("sd3.5_medium", 2, False, 1.0),
        ("sd3_medium", 2, False, 0.5),
        ("sd3.5_medium", 1, True, 0.5),
    ],
)
def test_euler_matches_diffusers_flow_match_euler(variant, batch, use_slg, denoise):
    m = model(variant)
    pos, neg = cond(m, 1), cond(m, 2)
    shift = 1.0 if variant == "sd3_medium" else 3.0
    slg = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.5) if use_slg else None
    steps = 6
    request = SampleRequest(steps=steps, cfg=4.0, sampler="euler", shift=shift, seed=42, slg=slg, denoise=denoise)
    if denoise == 1.0:
        ours = txt2img(m, pos, neg, request, width=SIZE, height=SIZE, batch_size=batch)
        init = None
    else:
        init = latent(batch, seed=21)
        ours = img2img(m, pos, neg, request, init_latent=init)
    theirs = _diffusers_euler(m, pos, neg, steps=steps, cfg=4.0, shift=shift, seed=42, batch=batch, slg=slg,
                              init=init, denoise=denoise)
    assert ours.shape == (batch, 16, SIZE // 8, SIZE // 8)
    assert_close(ours, theirs)


def test_slg_changes_the_result():
    m = model("sd3.5_medium")
    pos, neg = cond(m, 1), cond(m, 2)
    off_request = SampleRequest(steps=6, cfg=4.0, sampler="euler", shift=3.0, seed=1)
    on_request = replace(off_request, slg=SkipLayerGuidance(layers=(7, 8, 9), start=0.01, end=0.5))
    on = txt2img(m, pos, neg, on_request, width=SIZE, height=SIZE)
    off = txt2img(m, pos, neg, off_request, width=SIZE, height=SIZE)
    assert (on - off).abs().max() > 1e-2


class _VEParamDPMSolver(DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver++ with lambda = -log(sigma) (alpha_t = 1, sigma_t = sigma): the reference's
    time variable for sample_dpmpp_2m."""

    def _sigma_to_alpha_sigma_t(self, sigma):
        return torch.ones_like(sigma), sigma


def _diffusers_dpm(scheduler_cls, m, pos, neg, *, steps, cfg, shift, seed):
    sigmas = reference_sigmas(steps, shift)
    sched = scheduler_cls(
        num_train_timesteps=1000,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    sched.sigmas = sigmas.clone()  # the reference's sigmas instead of diffusers' own flow spacing
    sched.set_begin_index(0)
    x = torch.randn((1, 16, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i in range(steps):
            t = sigmas[i] * 1000
            v = _guided_velocity(m, x, t, pos, neg, cfg, None, i, steps)
            x = sched.step(v, sched.timesteps[i], x).prev_sample
    return _out(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 notice in set_timesteps
def test_dpmpp_2m_against_diffusers_dpmsolver():
    """The reference's dpmpp_2m is DPM-Solver++(2M) in the time variable -log(sigma), i.e. it treats
    x as x0 + sigma * eps (VE). diffusers' flow mode instead uses the flow half-log-SNR
    lambda = log((1 - sigma) / sigma). Their first-order steps coincide exactly (both are
    x' = sigma'/sigma x + (1 - sigma'/sigma) x0, since alpha' (1 - e^-h) = 1 - sigma'/sigma in both),
    and both second-order updates read x0 + (x0 - x0_prev) / (2 r); only the step ratio r = h_last / h
    differs with the time variable. So: diffusers with lambda = -log(sigma) must match us to the parity
    bar; stock flow mode differs, by an amount that shrinks at second order as steps grow."""
    m = model("sd3.5_large")
    pos, neg = cond(m, 1), cond(m, 2)
    kw = dict(cfg=4.5, shift=3.0, seed=7)

    def ours(steps):
        return txt2img(m, pos, neg, SampleRequest(steps=steps, sampler="dpmpp_2m", **kw), width=SIZE, height=SIZE)

    o6 = ours(6)
    assert_close(o6, _diffusers_dpm(_VEParamDPMSolver, m, pos, neg, steps=6, **kw))
    assert_close(ours(2), _diffusers_dpm(DPMSolverMultistepScheduler, m, pos, neg, steps=2, **kw))  # 1st order only
    flow6 = _diffusers_dpm(DPMSolverMultistepScheduler, m, pos, neg, steps=6, **kw)
    flow24 = _diffusers_dpm(DPMSolverMultistepScheduler, m, pos, neg, steps=24, **kw)
    d6 = (o6 - flow6).abs().max().item()
    d24 = (ours(24) - flow24).abs().max().item()
    assert d6 > 1e-3  # a real difference, far above the parity bar
    assert d24 < d6 / 4  # the two second-order methods converge to the same solution


# --- the reference's SD3Inferencer.get_empty_latent / get_noise / do_sampling, transcribed --------------
def _ref_do_sampling(m, pos, neg, *, latent, seed, steps, cfg, sampler, shift, denoise, skip_layer_config):
    sampling = RefModelSamplingDiscreteFlow(shift)
    base = RefBaseModel(m, shift)
    with torch.random.fork_rng():
        generator = torch.manual_seed(seed)
        noise = torch.randn(latent.size(), dtype=torch.float32, layout=latent.layout, generator=generator,
                            device="cpu").to(latent.dtype)
    sigmas = reference_sigmas(steps, shift)  # proven bit-identical to get_sigmas in test_schedule.py
    sigmas = sigmas[int(steps * (1 - denoise)) :]
    b = latent.shape[0]
    extra_args = {"cond": ref_fix_cond(pos, b), "uncond": ref_fix_cond(neg, b), "cond_scale": cfg}
    noise_scaled = sampling.noise_scaling(sigmas[0], noise, latent)
    sample_fn = {"euler": ref_sample_euler, "dpmpp_2m": ref_sample_dpmpp_2m}[sampler]
    if skip_layer_config.get("scale", 0) > 0:
        denoiser = RefSkipLayerCFGDenoiser(base, steps, skip_layer_config)
    else:
        denoiser = RefCFGDenoiser(base, steps, skip_layer_config)
    with torch.no_grad():
        out = sample_fn(denoiser, noise_scaled, sigmas, extra_args=extra_args)
    return _out(out)


def _ref_empty_latent(batch_size, width, height, seed):
    shape = (batch_size, 16, height // 8, width // 8)
    latents = torch.zeros(shape)
    for i in range(shape[0]):
        prng = torch.Generator().manual_seed(int(seed + i))
        latents[i] = torch.randn(shape[1:], generator=prng)
    return latents


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("variant, use_slg, denoise, batch", [
    ("sd3.5_medium", True, 1.0, 1),
    ("sd3.5_medium", False, 1.0, 2),
    ("sd3.5_large", False, 0.5, 1),
    ("sd3.5_medium", True, 0.6, 2),
])
def test_pipeline_equals_the_reference_bit_for_bit(sampler, variant, use_slg, denoise, batch):
    m = model(variant)
    pos, neg = cond(m, 3), cond(m, 4)
    steps, cfg, shift, seed = 8, 5.0, 3.0, 123
    slg_cfg = dict(scale=2.5, start=0.01, end=0.6, layers=[7, 8, 9]) if use_slg else {}
    slg = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.6) if use_slg else None
    request = SampleRequest(steps=steps, cfg=cfg, sampler=sampler, shift=shift, seed=seed, slg=slg, denoise=denoise,
                            share_slg_prefix=False)
    if denoise == 1.0:
        ours = txt2img(m, pos, neg, request, width=SIZE, height=SIZE, batch_size=batch)
        ref_latent = _ref_empty_latent(batch, SIZE, SIZE, seed)
    else:
        init = latent(batch, seed=5)
        ours = img2img(m, pos, neg, request, init_latent=init)
        ref_latent = _in(init)
    theirs = _ref_do_sampling(m, pos, neg, latent=ref_latent, seed=seed, steps=steps, cfg=cfg, sampler=sampler,
                              shift=shift, denoise=denoise, skip_layer_config=slg_cfg)
    assert torch.equal(ours, theirs)
    if use_slg:
        # the shared SLG prefix: same result to fp32 round-off
        shared_request = replace(request, share_slg_prefix=True)
        shared = (txt2img(m, pos, neg, shared_request, width=SIZE, height=SIZE, batch_size=batch)
                  if denoise == 1.0 else
                  img2img(m, pos, neg, shared_request, init_latent=init))
        assert_close(shared, theirs, tol=1e-5)


def test_noise_equals_the_references_global_seeded_noise():
    with torch.random.fork_rng():
        torch.manual_seed(99)
        expected = torch.randn((2, 16, 4, 4), dtype=torch.float32)
    state = torch.random.get_rng_state()
    noise, _ = make_noise((2, 16, 4, 4), 99)
    assert torch.equal(noise, expected)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def _run(m, *, width=SIZE, height=SIZE, batch_size=1, callback=None, should_cancel=None, **settings):
    pos, neg = cond(m, 1), cond(m, 2)
    request = SampleRequest(**(dict(steps=3, cfg=4.0, sampler="euler", shift=3.0, seed=5) | settings))
    return txt2img(m, pos, neg, request, width=width, height=height, batch_size=batch_size,
                   hooks=RunHooks(callback=callback, should_cancel=should_cancel))


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_determinism_and_per_image_seeds(sampler):
    m = model("sd3.5_large")
    a, b = _run(m, seed=5, batch_size=2, sampler=sampler), _run(m, seed=5, batch_size=2, sampler=sampler)
    assert torch.equal(a, b)
    c = _run(m, seed=6, batch_size=2, sampler=sampler)
    assert (a - c).abs().max() > 1e-2
    # batch mode: one generator for the whole batch, so the images differ from each other
    assert (a[0] - a[1]).abs().max() > 1e-2
    per_image = _run(m, seed=5, batch_size=2, seed_mode="per_image", sampler=sampler)
    for i in range(2):
        single = _run(m, seed=5 + i, batch_size=1, sampler=sampler)
        # equal up to the round-off of a batch-2 vs batch-1 model call
        assert_close(per_image[i : i + 1], single, tol=1e-5)
    assert torch.equal(per_image[0:1], _run(m, seed=5, batch_size=2, seed_mode="per_image", sampler=sampler)[0:1])


def test_callback_and_cancellation():
    m = model("sd3.5_large")
    seen: list[StepInfo] = []
    _run(m, steps=4, callback=seen.append)
    assert [s.index for s in seen] == [0, 1, 2, 3] and all(s.total == 4 for s in seen)
    assert all(s.denoised.shape == (1, 16, 8, 8) and torch.isfinite(s.denoised).all() for s in seen)
    polls = []

    def cancel_at_third():
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Interrupted, match="step 3 of 4"):
        _run(m, steps=4, should_cancel=cancel_at_third)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_walks_its_schedules_sigmas(sampler, schedule):
    # What each sampler computes on each schedule is pinned in test_samplers (closed-form denoiser); here the
    # pipeline must hand the sampler exactly the schedule's sigmas and the model each one as sigma * 1000.
    m = model("sd3.5_large", depth=2)
    seen, timesteps = [], []
    hook = m.t_embedder.register_forward_pre_hook(lambda _, args: timesteps.append(float(args[0][0])))
    try:
        _run(m, sampler=sampler, schedule=schedule, steps=4, callback=lambda info: seen.append(info.sigma))
    finally:
        hook.remove()
    sigmas = sigmas_for(schedule, 4, 3.0)
    assert seen == [float(x) for x in sigmas[: len(seen)]] and len(seen) == 4
    assert set(timesteps) <= {float(x * 1000) for x in sigmas[:-1]} | {float(x * 1000) for x in sigmas[1:-1]}


def test_img2img_repeats_one_init_latent_and_keeps_low_denoise_close():
    m = model("sd3.5_large", depth=2)
    pos, neg = cond(m, 1), cond(m, 2)
    init = latent(1, seed=9)
    request = SampleRequest(steps=10, cfg=2.0, sampler="euler", shift=3.0, seed=1)
    out = img2img(m, pos, neg, replace(request, denoise=0.1), init_latent=init, batch_size=2)
    assert out.shape == (2, 16, 8, 8)
    strong = img2img(m, pos, neg, request, init_latent=init)
    # one step from sigma ~0.03 barely moves the image; a full run does
    assert (out[0] - init[0]).abs().mean() < (strong[0] - init[0]).abs().mean() / 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.0), "steps"),
        (dict(cfg=float("nan")), "cfg"),
        (dict(cfg=float("inf")), "cfg"),
        (dict(shift=0.0), "shift"),
        (dict(sampler="ddim"), "sampler"),
        (dict(schedule="karras"), "schedule"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(seed_mode="random"), "seed_mode"),
        (dict(batch_size=0), "batch_size"),
        (dict(width=60), "width"),
        (dict(height=0), "height"),
    ],
)
def test_bad_txt2img_settings(kwargs, field):
    m = model("sd3.5_large", depth=2)
    with pytest.raises(ValueError, match=f"^{field}:"):
        _run(m, **kwargs)


@pytest.mark.parametrize("depth", [2, 4])
def test_slg_layer_99_on_a_small_model(depth):
    m = model("sd3.5_large", depth=depth)
    with pytest.raises(ValueError, match=rf"^slg layers: 99 is out of range for a model with {depth} joint blocks"):
        _run(m, slg=SkipLayerGuidance(layers=(99,)))


def test_too_large_image_names_the_limit():
    m = model("sd3.5_large", depth=2)
    largest = m.config.max_image_size
    with pytest.raises(ValueError, match=f"at most {largest}x{largest}"):
        _run(m, width=largest + 16)


@pytest.mark.parametrize("denoise", [0.0, -0.5, 1.5, float("nan")])
def test_bad_denoise(denoise):
    m = model("sd3.5_large", depth=2)
    with pytest.raises(ValueError, match="^denoise:"):
        img2img(m, cond(m, 1), cond(m, 2), SampleRequest(denoise=denoise, steps=4, cfg=4.0, sampler="euler",
                                                         shift=3.0, seed=0), init_latent=latent())


def test_bad_init_latent():
    m = model("sd3.5_large", depth=2)
    request = SampleRequest(denoise=0.5, steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=0)
    with pytest.raises(ValueError, match=r"^init_latent: expected a latent \[B, 16, h, w\]"):
        img2img(m, cond(m, 1), cond(m, 2), request, init_latent=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="^init_latent: contains NaN"):
        img2img(m, cond(m, 1), cond(m, 2), request, init_latent=torch.full((1, 16, 8, 8), math.nan))
    with pytest.raises(ValueError, match="^batch_size"):
        img2img(m, cond(m, 1), cond(m, 2), request, init_latent=latent(2), batch_size=3)
