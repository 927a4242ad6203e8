"""The compiled path: same results as eager, one compile per block kind and shape, eager fallback.

Most tests compile with torch's ``aot_eager`` backend (the real Dynamo capture and AOTAutograd graphs,
without generating C++), which takes seconds; one test runs the real inductor CPU backend (it builds C++
with the system compiler: about a minute on a shared two-core machine, hence the ``slow`` mark).
"""

import logging

import pytest
import torch

from sd35_core.loading.tiny import tiny_mmdit
from sd35_core.models.compile import compile_model, compiled_ok
from sd35_core.sampling.guidance import CondEntry, Guider
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

REL_TOL = 1e-4


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 8, 8, generator=g), torch.full((batch,), 700.0),
            torch.randn(batch, 7, 256, generator=g), torch.randn(batch, 192, generator=g))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_blocks_match_eager_and_do_not_recompile_across_steps():
    eager = tiny_mmdit("sd3.5_medium", depth=4)
    compiled = compile_model(tiny_mmdit("sd3.5_medium", depth=4), backend="aot_eager")
    slg = SkipLayerGuidance(layers=(1, 2), scale=2.0, start=0.0, end=1.0, window="sigma")
    request = SampleRequest(steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=0, slg=slg)
    x, _, ctx, y = _inputs(1)
    pos, neg = CondEntry(ctx, y), CondEntry(ctx.flip(-1), y.flip(-1))
    g_eager, g_comp = Guider(eager, pos, neg, request), Guider(compiled, pos, neg, request)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        first = g_comp(x, sigma, 1)  # warm-up: compiles the CFG batch and the skip-pass shapes
        torch._dynamo.config.error_on_recompile = True
        try:
            for step, s in enumerate((0.6, 0.5)):
                s = torch.tensor([s])
                assert _rel(g_comp(x * s, s, step), g_eager(x * s, s, step)) < REL_TOL
        finally:
            torch._dynamo.config.error_on_recompile = False
    assert _rel(first, g_eager(x, sigma, 1)) < REL_TOL
    assert compiled_ok(compiled)


def test_where_compiling_fails_the_model_runs_eagerly_after_one_warning(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler found")

    model = tiny_mmdit("sd3.5_medium", depth=3)
    expected = tiny_mmdit("sd3.5_medium", depth=3)(*_inputs())
    compile_model(model, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="sd35_core.models.compile"), torch.no_grad():
        outs = [model(*_inputs()) for _ in range(2)]
    warnings = [r for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler found" in warnings[0].getMessage()
    assert all(torch.equal(o, expected) for o in outs)
    assert not compiled_ok(model)


def test_a_genuine_error_is_raised_not_swallowed_by_the_fallback():
    model = compile_model(tiny_mmdit("sd3.5_medium", depth=2), backend="aot_eager")
    x, t, ctx, y = _inputs()
    with pytest.raises(RuntimeError), torch.no_grad():
        model(x, t, ctx[..., :100], y)  # context width does not match the model


def test_compiling_twice_is_a_no_op():
    model = compile_model(tiny_mmdit("sd3.5_medium", depth=2), backend="aot_eager")
    forwards = [b.forward for b in model.joint_blocks]
    assert compile_model(model) is model
    assert [b.forward for b in model.joint_blocks] == forwards


@pytest.mark.slow
def test_inductor_on_the_cpu_matches_eager_within_1e_4_relative():
    eager = tiny_mmdit("sd3.5_medium", depth=2)
    model = compile_model(tiny_mmdit("sd3.5_medium", depth=2))
    with torch.no_grad():
        expected = eager(*_inputs())
        got = model(*_inputs())
        torch._dynamo.config.error_on_recompile = True
        try:
            again = model(*_inputs(seed=1))
        finally:
            torch._dynamo.config.error_on_recompile = False
    assert compiled_ok(model)
    assert _rel(got, expected) < REL_TOL
    with torch.no_grad():
        expected_again = eager(*_inputs(seed=1))
    assert _rel(again, expected_again) < REL_TOL
