import logging

import pytest
import torch

from sd35_core.sampling.control import ControlHint, controlnet_residuals, expand_residuals
from sd35_core.sampling.guidance import CondEntry, Guider
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
from sd35_core.sampling.schedule import percent_to_sigma, reference_sigmas

from .sampling_common import (
    RefBaseModel,
    RefCFGDenoiser,
    RefSkipLayerCFGDenoiser,
    assert_close,
    cond,
    controlnet,
    latent,
    model,
    ref_fix_cond,
)

SHIFT = 3.0


def request(**settings) -> SampleRequest:
    """A sampling request; the guider does not read its sampler or seed."""
    return SampleRequest(sampler="euler", seed=0, **settings)


def sigma_batch(value: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.float32)


@pytest.mark.parametrize("variant", ["sd3_medium", "sd3.5_medium", "sd3.5_large"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_equals_the_reference_denoiser_bit_for_bit(variant, batch):
    m = model(variant)
    pos, neg = cond(m, 1), cond(m, 2)
    guider = Guider(m, pos, neg, request(cfg=4.5, steps=10, shift=SHIFT))
    ref = RefCFGDenoiser(RefBaseModel(m, SHIFT))
    x = latent(batch)
    for s in reference_sigmas(4, SHIFT)[:-1]:
        sig = sigma_batch(float(s), batch)
        ours = guider(x, sig, 0)
        theirs = ref(x, sig, ref_fix_cond(pos, batch), ref_fix_cond(neg, batch), 4.5)
        assert torch.equal(ours, theirs)
    assert guider.stats.calls == 4  # one batched [cond; uncond] call per step


def _slg_run(guider, ref, x, sigmas, pos, neg, cfg):
    """Both denoisers over consecutive step indices; returns (ours, theirs) per step."""
    out = []
    for i, s in enumerate(sigmas):
        sig = sigma_batch(float(s), x.shape[0])
        out.append((guider(x, sig, i), ref(x, sig, ref_fix_cond(pos, x.shape[0]), ref_fix_cond(neg, x.shape[0]), cfg)))
    return out


def test_skip_layer_guidance_equals_the_reference():
    m = model("sd3.5_medium")
    pos, neg = cond(m, 1), cond(m, 2)
    steps = 10
    slg = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.4)
    sigmas = reference_sigmas(steps, SHIFT)[:-1]
    x = latent(2)
    naive = Guider(m, pos, neg, request(cfg=4.0, steps=steps, shift=SHIFT, slg=slg, share_slg_prefix=False))
    ref = RefSkipLayerCFGDenoiser(RefBaseModel(m, SHIFT), steps, dict(scale=2.5, start=0.01, end=0.4, layers=[7, 8, 9]))
    for ours, theirs in _slg_run(naive, ref, x, sigmas, pos, neg, 4.0):
        assert torch.equal(ours, theirs)
    # window 0.01*10 < i < 0.4*10: steps 1, 2, 3
    assert naive.stats.separate_skip_steps == 3

    shared = Guider(m, pos, neg, request(cfg=4.0, steps=steps, shift=SHIFT, slg=slg))
    ref = RefSkipLayerCFGDenoiser(RefBaseModel(m, SHIFT), steps, dict(scale=2.5, start=0.01, end=0.4, layers=[7, 8, 9]))
    for ours, theirs in _slg_run(shared, ref, x, sigmas, pos, neg, 4.0):
        # fp32 round-off only (the prefix ran at batch 4 instead of 2): ~1e-6 of the output scale
        assert_close(ours, theirs, tol=1e-5)
    assert shared.stats.shared_prefix_steps == 3 and shared.stats.separate_skip_steps == 0


@pytest.mark.parametrize("layers", [(0,), (3,), (7, 8, 9), (2, 9), (9,)])
@pytest.mark.parametrize("batch", [1, 2])
def test_shared_prefix_equals_three_separate_passes(layers, batch):
    m = model("sd3.5_medium")
    pos, neg = cond(m, 4), cond(m, 5)
    slg = SkipLayerGuidance(layers=layers, scale=3.0, start=0.0, end=1.0)
    x = latent(batch, seed=7)
    sig = sigma_batch(0.7, batch)
    shared = Guider(m, pos, neg, request(cfg=5.0, steps=4, shift=SHIFT, slg=slg))
    naive = Guider(m, pos, neg, request(cfg=5.0, steps=4, shift=SHIFT, slg=slg, share_slg_prefix=False))
    a, b = shared(x, sig, 1), naive(x, sig, 1)
    assert_close(a, b, tol=1e-5)
    # and the prefix is really shared: blocks before the first skipped one run once for the cond rows
    assert shared.stats.row_blocks == naive.stats.row_blocks - batch * min(layers)


def test_slg_sigma_window_is_comfyuis():
    m = model("sd3.5_medium")
    pos, neg = cond(m, 1), cond(m, 2)
    slg = SkipLayerGuidance(layers=(7,), scale=2.0, start=0.1, end=0.5, window="sigma")
    hi, lo = percent_to_sigma(0.1, SHIFT), percent_to_sigma(0.5, SHIFT)
    for sigma, expected in [(1.0, False), (hi + 1e-4, False), (hi, True), ((hi + lo) / 2, True), (lo, True),
                            (lo - 1e-4, False), (0.01, False)]:
        assert slg.active(0, 10, sigma, SHIFT) is expected, sigma
    # the guider applies it by sigma, whatever the step index
    guider = Guider(m, pos, neg, request(cfg=4.0, steps=10, shift=SHIFT, slg=slg))
    x = latent()
    guider(x, sigma_batch((hi + lo) / 2, 1), 0)
    guider(x, sigma_batch(0.99, 1), 5)
    assert guider.stats.shared_prefix_steps == 1


def test_slg_step_window_is_the_references():
    slg = SkipLayerGuidance()  # (7, 8, 9), 2.5, 0.01..0.2
    assert [i for i in range(50) if slg.active(i, 50, 0.5, SHIFT)] == [i for i in range(50) if 0.5 < i < 10]
    assert not SkipLayerGuidance(scale=0.0).active(3, 50, 0.5, SHIFT)


@pytest.mark.parametrize("depth", [2, 4])
def test_slg_layer_out_of_range_is_a_clear_error(depth):
    m = model("sd3.5_large", depth=depth)
    with pytest.raises(ValueError) as err:
        Guider(m, cond(m, 1), cond(m, 2), request(cfg=4.0, steps=4, shift=SHIFT, slg=SkipLayerGuidance(layers=(1, 99))))
    assert str(err.value) == (
        f"slg layers: 99 is out of range for a model with {depth} joint blocks (0..{depth - 1})"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=(-1,)), "slg layers"),
        (dict(layers=("7",)), "slg layers"),
        (dict(scale=float("nan")), "slg scale"),
        (dict(scale=-1.0), "slg scale"),
        (dict(start=1.5), "slg start"),
        (dict(end=float("inf")), "slg end"),
        (dict(window="percent"), "slg window"),
    ],
)
def test_bad_slg_settings(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SkipLayerGuidance(**kwargs)


@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), "high", None])
def test_bad_cfg_is_a_value_error(cfg):
    m = model("sd3.5_large")
    with pytest.raises(ValueError, match="^cfg:"):
        Guider(m, cond(m, 1), cond(m, 2), request(cfg=cfg, steps=4, shift=SHIFT))


def test_conditioning_of_the_wrong_width_is_a_clear_error():
    m = model("sd3.5_large")
    bad = CondEntry(torch.zeros(1, 8, 100), torch.zeros(1, m.config.pooled_dim))
    with pytest.raises(ValueError, match=r"^positive\[0\] context: expected a tensor \[1, tokens, 256\]"):
        Guider(m, bad, cond(m, 2), request(cfg=4.0, steps=4, shift=SHIFT))
    bad = CondEntry(torch.zeros(1, 8, 256), torch.zeros(1, 7))
    with pytest.raises(ValueError, match=r"^negative\[0\] pooled"):
        Guider(m, cond(m, 1), bad, request(cfg=4.0, steps=4, shift=SHIFT))
    with pytest.raises(ValueError, match="^negative: expected at least one"):
        Guider(m, cond(m, 1), [], request(cfg=4.0, steps=4, shift=SHIFT))


def _single(m, entry, x, sig):
    """An entry's denoised prediction on its own (cfg 1 of cond against itself)."""
    return Guider(m, entry, entry, request(cfg=1.0, steps=4, shift=SHIFT, skip_uncond_at_cfg1=True))(x, sig, 0)


def test_combined_entries_are_a_strength_weighted_average():
    m = model("sd3.5_large")
    x, sig = latent(), sigma_batch(0.6, 1)
    a, b, n = cond(m, 1, strength=1.0), cond(m, 2, strength=3.0), cond(m, 3)
    guider = Guider(m, [a, b], n, request(cfg=5.0, steps=4, shift=SHIFT))
    pa, pb, pn = (_single(m, e, x, sig) for e in (a, b, n))
    pos = (pa * 1.0 + pb * 3.0) / 4.0
    assert_close(guider(x, sig, 0), pn + (pos - pn) * 5.0, tol=1e-5)
    assert guider.stats.calls == 1  # three entries of equal length: one batch


def test_entries_of_different_lengths_run_separately():
    m = model("sd3.5_large")
    x, sig = latent(2), sigma_batch(0.6, 2)
    a, b, n = cond(m, 1, tokens=8), cond(m, 2, tokens=12), cond(m, 3, tokens=5)
    guider = Guider(m, [a, b], n, request(cfg=3.0, steps=4, shift=SHIFT))
    pa, pb, pn = (_single(m, e, x, sig) for e in (a, b, n))
    assert_close(guider(x, sig, 0), pn + ((pa + pb) / 2 - pn) * 3.0, tol=1e-5)
    assert guider.stats.calls == 3


def test_timestep_ranges_switch_entries(caplog):
    m = model("sd3.5_large")
    x = latent()
    early, late, n = cond(m, 1, start=0.0, end=0.5), cond(m, 2, start=0.5, end=1.0), cond(m, 3)
    guider = Guider(m, [early, late], n, request(cfg=2.0, steps=4, shift=SHIFT))
    boundary = percent_to_sigma(0.5, SHIFT)
    for sigma, active in [(0.95, early), (0.3, late)]:
        sig = sigma_batch(sigma, 1)
        pe, pn = _single(m, active, x, sig), _single(m, n, x, sig)
        assert_close(guider(x, sig, 0), pn + (pe - pn) * 2.0, tol=1e-5)
    # at the boundary both are active (ComfyUI's ranges are inclusive)
    sig = sigma_batch(boundary, 1)
    both = (_single(m, early, x, sig) + _single(m, late, x, sig)) / 2
    pn = _single(m, n, x, sig)
    assert_close(guider(x, sig, 0), pn + (both - pn) * 2.0, tol=1e-5)

    # no active positive entry: that side predicts 0, as in ComfyUI, with a warning
    only_late = Guider(m, late, n, request(cfg=2.0, steps=4, shift=SHIFT))
    sig = sigma_batch(0.95, 1)
    with caplog.at_level(logging.WARNING, logger="sd35_core.sampling.guidance"):
        out = only_late(x, sig, 0)
    pn = _single(m, n, x, sig)
    assert_close(out, pn + (torch.zeros_like(pn) - pn) * 2.0, tol=1e-6)
    assert "no conditioning entry is active" in caplog.text


def test_cfg_one_can_leave_out_the_negative():
    m = model("sd3.5_large")
    pos, neg = cond(m, 1), cond(m, 2)
    x, sig = latent(), sigma_batch(0.5, 1)
    full = Guider(m, pos, neg, request(cfg=1.0, steps=4, shift=SHIFT))
    fast = Guider(m, pos, neg, request(cfg=1.0, steps=4, shift=SHIFT, skip_uncond_at_cfg1=True))
    assert_close(fast(x, sig, 0), full(x, sig, 0), tol=1e-6)
    assert fast.stats.row_blocks * 2 == full.stats.row_blocks


def test_controlnet_residuals_feed_the_cfg_batch_but_not_the_skip_pass():
    m = model("sd3.5_large")  # depth 4, ControlNet with 2 layers (block interval 2)
    cn = controlnet()
    pos, neg = cond(m, 1), cond(m, 2)
    hint_latent = latent(seed=11)
    hint = ControlHint(cn, hint_latent, strength=0.8)
    slg = SkipLayerGuidance(layers=(2,), scale=2.0, start=0.0, end=1.0)
    guider = Guider(m, pos, neg, request(cfg=4.0, steps=4, shift=SHIFT, slg=slg, controls=[hint]))
    x, sig = latent(2), sigma_batch(0.8, 2)

    def control(xb, sigma, y):
        return expand_residuals(controlnet_residuals(m, cn, xb, sigma, y, hint_latent, 0.8), m.config.depth)

    # reference: residuals for the [cond; uncond] batch, none for the skip-layer pass
    ref = RefSkipLayerCFGDenoiser(RefBaseModel(m, SHIFT, control), 4, dict(scale=2.0, start=0.0, end=1.0, layers=[2]))
    ref.step = 1
    theirs = ref(x, sig, ref_fix_cond(pos, 2), ref_fix_cond(neg, 2), 4.0, controlnet_cond=hint_latent)
    ours = guider(x, sig, 1)
    assert torch.equal(ours, theirs)
    # with residuals the prefixes differ, so the skip pass runs on its own
    assert guider.stats.separate_skip_steps == 1 and guider.stats.shared_prefix_steps == 0
    # and the ControlNet does change the result
    plain = Guider(m, pos, neg, request(cfg=4.0, steps=4, shift=SHIFT, slg=slg))(x, sig, 1)
    assert (plain - ours).abs().max() > 1e-3


def test_two_controlnets_sum_and_respect_their_step_windows():
    m = model("sd3.5_large")
    cn1, cn2 = controlnet(seed=1), controlnet(seed=2)
    l1, l2 = latent(seed=12), latent(seed=13)
    pos, neg = cond(m, 1), cond(m, 2)
    hints = [ControlHint(cn1, l1, 1.0, 0.0, 0.5), ControlHint(cn2, l2, 0.5, 0.0, 1.0)]
    guider = Guider(m, pos, neg, request(cfg=3.0, steps=4, shift=SHIFT, controls=hints))
    x, sig = latent(), sigma_batch(0.5, 1)
    depth = m.config.depth

    def residuals(step):
        def control(xb, sigma, y):
            total = None
            for cn, lat, strength, active in ((cn1, l1, 1.0, step < 2), (cn2, l2, 0.5, True)):
                if not active:
                    continue
                r = expand_residuals(controlnet_residuals(m, cn, xb, sigma, y, lat, strength), depth)
                total = r if total is None else [a + b for a, b in zip(total, r, strict=True)]
            return total

        return control

    for step in (0, 3):
        ref = RefCFGDenoiser(RefBaseModel(m, SHIFT, residuals(step)))
        theirs = ref(x, sig, ref_fix_cond(pos, 1), ref_fix_cond(neg, 1), 3.0, controlnet_cond=l1)
        assert torch.equal(guider(x, sig, step), theirs)
