"""CFG variants (CFG-Zero*, APG) and a ComfyUI MODEL's CFG functions in the Guider.

ComfyUI's node functions are transcribed below (``comfy_extras/nodes_cfg.py``, ``nodes_apg.py``,
``nodes_model_advanced.py``) and run through the Guider's :class:`~sd35_core.sampling.cfg.ModelHooks`, called as
``comfy/samplers.py``'s ``sampling_function`` calls them; the request's own settings must give the same bits.
"""

from __future__ import annotations

import pytest
import torch

from sd35_core.sampling import pipeline
from sd35_core.sampling.cfg import APG, CFGZeroStar, ModelHooks
from sd35_core.sampling.guidance import Guider
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

from .sampling_common import cond, latent, model

SHIFT = 3.0


def request(**settings) -> SampleRequest:
    return SampleRequest(sampler="euler", seed=0, shift=SHIFT, **settings)


def sigmas(value: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.float32)


# ---- ComfyUI's nodes, transcribed -------------------------------------------------------------------------

def comfy_optimized_scale(positive, negative):
    positive_flat = positive.reshape(positive.shape[0], -1)
    negative_flat = negative.reshape(negative.shape[0], -1)
    dot_product = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)
    squared_norm = torch.sum(negative_flat ** 2, dim=1, keepdim=True) + 1e-8
    st_star = dot_product / squared_norm
    return st_star.reshape([positive.shape[0]] + [1] * (positive.ndim - 1))


def comfy_cfg_zero_star(args):
    guidance_scale = args["cond_scale"]
    x = args["input"]
    cond_p = args["cond_denoised"]
    uncond_p = args["uncond_denoised"]
    out = args["denoised"]
    alpha = comfy_optimized_scale(x - cond_p, x - uncond_p)
    return out + uncond_p * (alpha - 1.0) + guidance_scale * uncond_p * (1.0 - alpha)


def comfy_apg(eta, norm_threshold, momentum):
    running_avg = 0
    prev_sigma = None

    def project(v0, v1):
        v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])
        v0_parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
        return v0_parallel, v0 - v0_parallel

    def pre_cfg_function(args):
        nonlocal running_avg, prev_sigma
        if len(args["conds_out"]) == 1:
            return args["conds_out"]
        cond, uncond = args["conds_out"][0], args["conds_out"][1]
        sigma = args["sigma"][0]
        cond_scale = args["cond_scale"]
        if prev_sigma is not None and sigma > prev_sigma:
            running_avg = 0
        prev_sigma = sigma
        guidance = cond - uncond
        if momentum != 0:
            if not torch.is_tensor(running_avg):
                running_avg = guidance
            else:
                running_avg = momentum * running_avg + guidance
            guidance = running_avg
        if norm_threshold > 0:
            guidance_norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            scale = torch.minimum(torch.ones_like(guidance_norm), norm_threshold / guidance_norm)
            guidance = guidance * scale
        guidance_parallel, guidance_orthogonal = project(guidance, cond)
        modified_guidance = guidance_orthogonal + eta * guidance_parallel
        modified_cond = (uncond + modified_guidance) + (cond - uncond) / cond_scale
        return [modified_cond, uncond] + args["conds_out"][2:]

    return pre_cfg_function


def comfy_rescale_cfg(multiplier):
    def rescale_cfg(args):
        cond, uncond, cond_scale = args["cond"], args["uncond"], args["cond_scale"]
        sigma = args["sigma"]
        sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
        x_orig = args["input"]
        x = x_orig / (sigma * sigma + 1.0)
        cond = ((x - (x_orig - cond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
        uncond = ((x - (x_orig - uncond)) * (sigma ** 2 + 1.0) ** 0.5) / (sigma)
        x_cfg = uncond + cond_scale * (cond - uncond)
        ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
        ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
        x_rescaled = x_cfg * (ro_pos / ro_cfg)
        x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
        return x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5)

    return rescale_cfg


def run_steps(guider, x, values):
    return [guider(x, sigmas(s, x.shape[0]), i) for i, s in enumerate(values)]


STEPS = (0.95, 0.8, 0.6, 0.99, 0.4)  # sigma rises once: APG's running average starts again, as in ComfyUI


# ---- tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_zero_star_equals_comfyuis_node(batch):
    m = model("sd3.5_large")
    pos, neg, x = cond(m, 1), cond(m, 2), latent(batch)
    ours = Guider(m, pos, neg, request(cfg=5.0, steps=5, cfg_zero_star=CFGZeroStar()))
    theirs = Guider(m, pos, neg, request(cfg=5.0, steps=5, model_hooks=ModelHooks(post_cfg=(comfy_cfg_zero_star,))))
    plain = Guider(m, pos, neg, request(cfg=5.0, steps=5))
    for a, b, c in zip(run_steps(ours, x, STEPS), run_steps(theirs, x, STEPS), run_steps(plain, x, STEPS),
                       strict=True):
        assert torch.equal(a, b)
        assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("apg", [APG(), APG(eta=0.5, norm_threshold=2.0, momentum=-0.5), APG(momentum=0.7,
                                                                                               norm_threshold=0.0)])
def test_apg_equals_comfyuis_node(apg):
    m = model("sd3.5_large")
    pos, neg, x = cond(m, 1), cond(m, 2), latent(2)
    ours = Guider(m, pos, neg, request(cfg=4.0, steps=5, apg=apg))
    hooks = ModelHooks(pre_cfg=(comfy_apg(apg.eta, apg.norm_threshold, apg.momentum),))
    theirs = Guider(m, pos, neg, request(cfg=4.0, steps=5, model_hooks=hooks))
    for a, b in zip(run_steps(ours, x, STEPS), run_steps(theirs, x, STEPS), strict=True):
        assert torch.equal(a, b)


def test_variants_compose_in_the_order_of_a_comfyui_graph():
    # model -> APG -> CFGZeroStar -> skip-layer guidance; the SLG term takes the cond as APG left it, as
    # ComfyUI's SkipLayerGuidanceSD3 reads cond_denoised.
    m = model("sd3.5_medium")
    pos, neg, x = cond(m, 1), cond(m, 2), latent(1)
    apg = APG(eta=0.3, norm_threshold=4.0, momentum=0.2)
    slg = SkipLayerGuidance(layers=(7, 8), scale=2.0, start=0.0, end=1.0, window="sigma")
    ours = Guider(m, pos, neg, request(cfg=4.0, steps=5, apg=apg, cfg_zero_star=CFGZeroStar(), slg=slg,
                                       share_slg_prefix=False))
    skip_only = Guider(m, pos, neg, request(cfg=1.0, steps=5, slg=slg, share_slg_prefix=False,
                                            skip_uncond_at_cfg1=True))

    def slg_post(args):  # what SkipLayerGuidanceSD3 adds, with the skip pass taken from a guider at cfg 1
        out_cfg1 = skip_only(args["input"], args["sigma"], 0)  # cond + (cond - skipped) * scale
        cond_plain = Guider(m, pos, neg, request(cfg=1.0, steps=5, skip_uncond_at_cfg1=True))(
            args["input"], args["sigma"], 0)
        skipped = cond_plain - (out_cfg1 - cond_plain) / slg.scale
        return args["denoised"] + (args["cond_denoised"] - skipped) * slg.scale

    hooks = ModelHooks(pre_cfg=(comfy_apg(apg.eta, apg.norm_threshold, apg.momentum),),
                       post_cfg=(comfy_cfg_zero_star, slg_post))
    theirs = Guider(m, pos, neg, request(cfg=4.0, steps=5, model_hooks=hooks))
    for a, b in zip(run_steps(ours, x, STEPS[:3]), run_steps(theirs, x, STEPS[:3]), strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_zero_init_predicts_zero_on_the_first_steps_without_the_model():
    m = model("sd3.5_large")
    pos, neg, x = cond(m, 1), cond(m, 2), latent(1)
    zero2 = Guider(m, pos, neg, request(cfg=5.0, steps=5, cfg_zero_star=CFGZeroStar(zero_init_steps=2)))
    star = Guider(m, pos, neg, request(cfg=5.0, steps=5, cfg_zero_star=CFGZeroStar()))
    a, b = run_steps(zero2, x, STEPS[:4]), run_steps(star, x, STEPS[:4])
    assert torch.equal(a[0], x) and torch.equal(a[1], x)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert zero2.stats.calls == 2
    # in a run: the first steps leave the noise where it is (denoised = x means velocity 0)
    out = pipeline.txt2img(m, pos, neg, request(cfg=5.0, steps=3, cfg_zero_star=CFGZeroStar(zero_init_steps=3)),
                           width=64, height=64)
    noise, _ = pipeline.make_noise(out.shape, 0)
    from sd35_core.models.latent import process_out

    assert torch.allclose(out, process_out(noise), atol=1e-6)


def test_model_cfg_function_gets_comfyuis_arguments_and_rescale_cfg_equals_its_formula():
    m = model("sd3.5_large")
    pos, neg, x = cond(m, 1), cond(m, 2), latent(2)
    seen = {}

    def record(kind):
        def fn(args):
            seen[kind] = set(args)
            return args["conds_out"] if kind == "pre" else args["denoised"]
        return fn

    sentinel = object()
    hooks = ModelHooks(pre_cfg=(record("pre"),), cfg_function=comfy_rescale_cfg(0.7), post_cfg=(record("post"),),
                       extra=lambda: {"model": sentinel, "model_options": {}, "cond": [], "uncond": []})
    theirs = Guider(m, pos, neg, request(cfg=6.0, steps=4, model_hooks=hooks))(x, sigmas(0.7, 2), 0)
    assert seen["pre"] == {"conds", "conds_out", "cond_scale", "timestep", "input", "sigma", "model",
                           "model_options"}
    assert seen["post"] == {"denoised", "cond", "uncond", "cond_scale", "model", "uncond_denoised", "cond_denoised",
                            "sigma", "model_options", "input"}
    plain = Guider(m, pos, neg, request(cfg=6.0, steps=4))(x, sigmas(0.7, 2), 0)
    assert (theirs - plain).abs().max() > 1e-3


def test_left_out_negative_predicts_zero_for_the_variants_as_in_comfyui():
    m = model("sd3.5_large")
    pos, neg, x = cond(m, 1), cond(m, 2), latent(1)
    apg = APG(eta=0.5)
    ours = Guider(m, pos, neg, request(cfg=1.0, steps=4, apg=apg, skip_uncond_at_cfg1=True))
    hooks = ModelHooks(pre_cfg=(comfy_apg(apg.eta, apg.norm_threshold, apg.momentum),))
    theirs = Guider(m, pos, neg, request(cfg=1.0, steps=4, model_hooks=hooks, skip_uncond_at_cfg1=True))
    assert torch.equal(ours(x, sigmas(0.5, 1), 0), theirs(x, sigmas(0.5, 1), 0))
    assert ours.stats.row_blocks == 4  # one row through the four joint blocks: the negative was left out


@pytest.mark.parametrize("settings, message", [
    (dict(apg=APG(), cfg=0.0), "apg: .*cfg above 0"),
    (dict(apg="on"), "apg: expected APG settings"),
    (dict(cfg_zero_star=True), "cfg_zero_star: expected CFGZeroStar settings"),
])
def test_bad_variant_settings_are_clear_errors(settings, message):
    settings = {"cfg": 3.0, **settings}
    with pytest.raises(ValueError, match=message):
        request(steps=4, **settings)


@pytest.mark.parametrize("make, message", [
    (lambda: CFGZeroStar(zero_init_steps=-1), "zero_init_steps"),
    (lambda: APG(momentum=2.0), "apg momentum"),
    (lambda: APG(norm_threshold=-1.0), "apg norm_threshold"),
    (lambda: APG(eta=float("nan")), "apg eta"),
])
def test_bad_variant_values_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
