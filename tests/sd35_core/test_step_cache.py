"""The step cache: off at 0, bit-identical while it never hits, fewer model evaluations above 0, with SLG and
ControlNets in the same decision as cond and uncond."""

import pytest
import torch

from sd35_core.sampling.control import ControlHint
from sd35_core.sampling.passes import PassStats
from sd35_core.sampling.pipeline import RunHooks, sample
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
from sd35_core.sampling.step_cache import relative_change
from tests.sd35_core.sampling_common import cond, controlnet, latent, model

STEPS = 12
# No relative change is this small between two different steps, so the cache runs every step in full.
NEVER_HITS = 1e-30


def _run(m, request, stats=None, hw=8):
    pos, neg = cond(m, 1), cond(m, 2)
    return sample(m, pos, neg, torch.zeros(1, 16, hw, hw), request, RunHooks(stats=stats))


def _request(**kw):
    base = dict(steps=STEPS, cfg=4.0, sampler="euler", shift=3.0, seed=7)
    return SampleRequest(**{**base, **kw})


SLG_FIRST = SkipLayerGuidance(layers=(0, 2), scale=2.0, start=0.0, end=1.0)  # fork at the embedding
SLG_LATER = SkipLayerGuidance(layers=(2, 3), scale=2.0, start=0.1, end=0.5)  # shared prefix, window inside the run


@pytest.mark.parametrize("variant, slg, with_controlnet", [
    ("sd3.5_medium", None, False),
    ("sd3.5_medium", SLG_FIRST, False),
    ("sd3.5_medium", SLG_LATER, False),
    ("sd3.5_large", SLG_LATER, True),  # ControlNet residuals: the separate skip pass
])
def test_a_cache_that_never_hits_is_bit_identical_to_no_cache(variant, slg, with_controlnet):
    m = model(variant, depth=4)
    controls = (ControlHint(controlnet(), latent(seed=11), strength=0.7),) if with_controlnet else ()
    plain = _run(m, _request(slg=slg, controls=controls))
    stats = PassStats()
    cached = _run(m, _request(slg=slg, controls=controls, cache_threshold=NEVER_HITS), stats)
    assert torch.equal(cached, plain)
    assert stats.cache_hits == 0


def test_threshold_zero_is_off():
    m = model("sd3.5_medium", depth=4)
    stats = PassStats()
    assert torch.equal(_run(m, _request(cache_threshold=0.0), stats), _run(m, _request()))
    assert stats.cache_hits == 0


def test_above_zero_steps_are_reused_and_the_result_stays_close():
    m = model("sd3.5_medium", depth=4)
    plain_stats, stats = PassStats(), PassStats()
    plain = _run(m, _request(steps=30), plain_stats)
    cached = _run(m, _request(steps=30, cache_threshold=0.6), stats)
    assert stats.cache_hits > 0
    assert stats.calls + stats.cache_hits == 30 and plain_stats.calls == 30
    assert stats.row_blocks < plain_stats.row_blocks
    rel = float((cached - plain).norm() / plain.norm())
    assert 0 < rel < 0.2


def test_slg_and_controlnet_rows_are_cached_together_with_cond_and_uncond():
    m = model("sd3.5_large", depth=4)
    hint = ControlHint(controlnet(), latent(seed=11), strength=0.7)
    slg = SkipLayerGuidance(layers=(2,), scale=2.0, start=0.0, end=1.0)
    plain = _run(m, _request(steps=30, slg=slg, controls=(hint,)))
    stats = PassStats()
    cached = _run(m, _request(steps=30, slg=slg, controls=(hint,), cache_threshold=0.6), stats)
    assert stats.cache_hits > 0
    # Every full step ran the CFG batch and its own skip pass (step 0 is outside the reference's SLG window,
    # start * steps < i); a hit ran neither (nor the ControlNet).
    assert stats.separate_skip_steps == 30 - stats.cache_hits - 1
    assert stats.calls == 1 + 2 * stats.separate_skip_steps
    assert torch.isfinite(cached).all()
    assert float((cached - plain).norm() / plain.norm()) < 0.2


def test_the_first_and_the_last_step_are_always_run_in_full():
    m = model("sd3.5_medium", depth=4)
    seen = []
    pos, neg = cond(m, 1), cond(m, 2)
    stats = PassStats()
    # A huge threshold would reuse every step it is allowed to.
    request = _request(steps=6, cache_threshold=1e9)
    sample(m, pos, neg, torch.zeros(1, 16, 8, 8), request,
           RunHooks(callback=lambda info: seen.append((info.index, stats.calls)), stats=stats))
    full_at = [i for k, (i, calls) in enumerate(seen) if calls > (seen[k - 1][1] if k else 0)]
    assert full_at == [0, 5]
    assert stats.cache_hits == 4


def test_relative_change_is_taken_over_all_rows_together():
    old = [torch.ones(2, 3), torch.full((1, 3), 3.0)]
    new = [torch.ones(2, 3), torch.full((1, 3), 4.0)]
    assert relative_change(new, old) == pytest.approx(3.0 / (6.0 + 9.0))


@pytest.mark.parametrize("value", [-0.1, float("nan"), True])
def test_a_bad_threshold_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="cache_threshold"):
        _request(cache_threshold=value)
