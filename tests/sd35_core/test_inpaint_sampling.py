"""Sampling with a noise mask (request.noise_mask, request.mask_mode): what is kept, what is repainted.

Parity with ComfyUI's own KSampler is in tests/host/test_inpaint_native.py; these tests pin the behaviour that
follows from the rule itself, on the tiny models and without a host.
"""

import pytest
import torch

from sd35_core.models.latent import SD3_LATENT_SHIFT, process_in
from sd35_core.sampling.control import ControlHint
from sd35_core.sampling.mask import differential_threshold
from sd35_core.sampling.pipeline import RunHooks, sample
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
from sd35_core.sampling.samplers import SAMPLERS

from .sampling_common import cond, controlnet, latent, model

SIZE = 8  # latent 8x8 = a 64x64 image


def request(**kw) -> SampleRequest:
    settings = dict(steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=11, schedule="reference")
    settings.update(kw)
    return SampleRequest(**settings)


def hard_mask() -> torch.Tensor:
    """A mask on the 16-pixel grid of a 64x64 image: rows 16..47, columns 32..63 are repainted."""
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 32:64] = 1.0
    return mask


def latent_region(mask: torch.Tensor) -> torch.Tensor:
    """Where the hard mask is 1, at latent resolution, as a boolean ``[h, w]``."""
    return mask[0, 4::8, 4::8].bool()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def parts():
    m = model("sd3.5_large")  # 4 joint blocks
    return m, cond(m, 1), cond(m, 2), latent(2, SIZE, seed=3)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_hard_mask_keeps_the_init_latent_outside_and_repaints_inside(parts, sampler):
    m, pos, neg, init = parts
    mask = hard_mask()
    out = sample(m, pos, neg, init, request(sampler=sampler, noise_mask=mask))
    inside = latent_region(mask)
    assert rel_diff(out[..., ~inside], init[..., ~inside]) < 1e-5  # float round-off of the last step
    assert (out[..., inside] - init[..., inside]).abs().max() > 0.5


def test_a_mask_of_zeros_returns_the_init_latent(parts):
    m, pos, neg, init = parts
    out = sample(m, pos, neg, init, request(sampler="dpmpp_2m", noise_mask=torch.zeros(1, 64, 64)))
    assert rel_diff(out, init) < 1e-5


@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_a_mask_of_ones_equals_sampling_without_a_mask(parts, denoise):
    m, pos, neg, init = parts
    plain = sample(m, pos, neg, init, request(denoise=denoise))
    masked = sample(m, pos, neg, init, request(denoise=denoise, noise_mask=torch.ones(2, 64, 64)))
    assert torch.equal(masked, plain)


def test_text_to_image_with_a_mask_of_ones_equals_plain_text_to_image(parts):
    m, pos, neg, _ = parts
    empty = torch.zeros(1, 16, SIZE, SIZE)
    plain = sample(m, pos, neg, empty, request())
    assert torch.equal(sample(m, pos, neg, empty, request(noise_mask=torch.ones(1, 64, 64))), plain)


def test_the_kept_part_of_an_empty_latent_stays_empty(parts):
    # ComfyUI does not shift an all-zero latent into model space: its kept part is model-space 0, which is
    # the SD3 latent shift in raw VAE space (the reference's empty latent is filled with that value too).
    m, pos, neg, _ = parts
    mask = hard_mask()
    out = sample(m, pos, neg, torch.zeros(1, 16, SIZE, SIZE), request(noise_mask=mask))
    kept = out[..., ~latent_region(mask)]
    torch.testing.assert_close(kept, torch.full_like(kept, SD3_LATENT_SHIFT), rtol=0, atol=1e-6)


def test_per_image_seeds_with_one_mask_equal_single_runs(parts):
    m, pos, neg, init = parts
    mask = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(4))
    both = sample(m, pos, neg, init, request(seed_mode="per_image", noise_mask=mask))
    second = sample(m, pos, neg, init[1:], request(seed=12, noise_mask=mask))
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-5)


def test_slg_and_a_controlnet_work_with_a_mask(parts):
    m, pos, neg, init = parts
    mask = hard_mask()
    hint = ControlHint(controlnet(), latent(1, SIZE, seed=9), strength=0.8)
    slg = SkipLayerGuidance(layers=(2,), scale=2.0, start=0.0, end=1.0)
    plain = sample(m, pos, neg, init, request(noise_mask=mask))
    both = sample(m, pos, neg, init, request(noise_mask=mask, slg=slg, controls=(hint,)))
    inside = latent_region(mask)
    assert rel_diff(both[..., ~inside], init[..., ~inside]) < 1e-5
    assert (both[..., inside] - plain[..., inside]).abs().max() > 1e-3  # both guidance terms acted


def test_differential_mode_with_a_hard_mask_equals_standard(parts):
    m, pos, neg, init = parts
    standard = sample(m, pos, neg, init, request(sampler="dpmpp_2m", noise_mask=hard_mask()))
    differential = sample(m, pos, neg, init, request(sampler="dpmpp_2m", noise_mask=hard_mask(),
                                                     mask_mode="differential"))
    assert torch.equal(differential, standard)


def test_differential_mode_repaints_a_pixel_only_once_the_threshold_falls_to_its_value(parts):
    m, pos, neg, init = parts
    # Four bands of mask values 0, 1/3, 2/3 and 1 across the image (16 pixels = 2 latent columns each).
    mask = torch.zeros(1, 64, 64)
    for band, value in enumerate((0.0, 1 / 3, 2 / 3, 1.0)):
        mask[:, :, band * 16 : (band + 1) * 16] = value
    seen = []  # what the model gets at each call: the blended input
    hook = m.x_embedder.register_forward_pre_hook(lambda _, args: seen.append(args[0][:2].float().clone()))
    steps = []
    try:
        req = request(steps=6, cfg=1.0, skip_uncond_at_cfg1=True, noise_mask=mask, mask_mode="differential")
        out = sample(m, pos, neg, init, req, RunHooks(callback=steps.append))
    finally:
        hook.remove()
    assert len(seen) == len(steps) == 6
    sigmas = req.sigmas()
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(req.seed))
    values = mask[0, 0, 4::8]  # per latent column
    for i, (x_in, info) in enumerate(zip(seen, steps, strict=True)):
        threshold = float(differential_threshold(sigmas[i : i + 1], sigmas, req.shift))
        sigma = sigmas[i]
        noised_init = sigma * noise + (1 - sigma) * process_in(init)
        for col, value in enumerate(values.tolist()):
            got = x_in[..., col]
            if value >= threshold:  # repainted: the sampler's own latent
                torch.testing.assert_close(got, info.x[..., col], rtol=0, atol=1e-6)
            else:  # kept: the init latent noised to this sigma with the run's noise
                torch.testing.assert_close(got, noised_init[..., col], rtol=0, atol=1e-5)
    first_repaint = {v: next(i for i in range(6)
                             if v >= float(differential_threshold(sigmas[i : i + 1], sigmas, req.shift)))
                     for v in (1 / 3, 2 / 3, 1.0)}
    assert first_repaint[1.0] == 0 < first_repaint[2 / 3] < first_repaint[1 / 3]
    assert rel_diff(out[..., :2], init[..., :2]) < 1e-5  # mask value 0: never repainted


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(noise_mask=torch.full((1, 64, 64), float("nan"))), r"noise_mask: contains NaN"),
        (dict(noise_mask=torch.full((1, 64, 64), 2.0)), r"noise_mask: expected values in 0\.\.1"),
        (dict(noise_mask="mask.png"), r"noise_mask: expected a MASK"),
        (dict(noise_mask=torch.ones(1, 64, 64), mask_mode="soft"), r"mask_mode: expected one of standard, "
                                                                   r"differential"),
    ],
)
def test_bad_mask_settings_are_refused_by_the_request(settings, message):
    with pytest.raises(ValueError, match=message):
        request(**settings)


def test_a_mask_batch_that_fits_neither_way_is_refused(parts):
    m, pos, neg, init = parts
    with pytest.raises(ValueError, match=r"noise_mask: the mask batch \(3\) must be 1 or the latent batch \(2\)"):
        sample(m, pos, neg, init, request(noise_mask=torch.ones(3, 64, 64)))
