"""Area and mask conditioning in the Guider against ComfyUI's ``calc_cond_batch``, transcribed below from
``comfy/samplers.py`` (``resolve_areas_and_cond_masks_multidim``, ``create_cond_with_same_area_if_none``,
``get_area_and_mult``, the accumulation) as an independent computation over ComfyUI-style cond dicts, one model
call per entry. The model call is ComfyUI's MMDiT on a crop: circular padding to the patch size, the output cut
back. The ControlNet case fits the control latent to the crop, as ComfyUI's ControlNet resizes its hint."""

from __future__ import annotations

import math

import pytest
import torch

from sd35_core.sampling import pipeline
from sd35_core.sampling.control import ControlHint, controlnet_residuals, expand_residuals
from sd35_core.sampling.guidance import CondEntry, Guider
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

from .sampling_common import cond, controlnet, latent, model

SHIFT = 3.0
TOL = 2e-5  # batch-size round-off (our rows share batches; the transcription runs one entry per call)


def request(**settings) -> SampleRequest:
    return SampleRequest(sampler="euler", seed=0, shift=SHIFT, **settings)


def sigmas(value: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.float32)


def with_(entry: CondEntry, **kw) -> CondEntry:
    fields = dict(context=entry.context, pooled=entry.pooled, strength=entry.strength,
                  start_percent=entry.start_percent, end_percent=entry.end_percent)
    fields.update(kw)
    return CondEntry(**fields)


# ---- ComfyUI, transcribed ---------------------------------------------------------------------------------

def comfy_cond(e: CondEntry) -> dict:
    c = {"model_conds": {"c_crossattn": e.context, "y": e.pooled}, "strength": e.strength}
    if e.area is not None:
        c["area"] = e.area
    if e.mask is not None:
        c["mask"] = e.mask
        c["mask_strength"] = e.mask_strength
        c["set_area_to_bounds"] = e.set_area_to_bounds
    return c


def comfy_resolve(conditions, dims):
    for i, c in enumerate(conditions):
        if "area" in c and c["area"][0] == "percentage":
            a = c["area"][1:]
            area = tuple(max(1, round(a[d] * dims[d])) for d in range(2)) + tuple(round(a[d + 2] * dims[d])
                                                                                   for d in range(2))
            c = dict(c, area=area)
            conditions[i] = c
        if "mask" in c:
            mask = c["mask"]
            if mask.ndim == 2:
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[1:]) != tuple(dims):
                mask = torch.nn.functional.interpolate(mask.unsqueeze(1), size=tuple(dims), mode="bilinear").squeeze(1)
            c = dict(c, mask=mask)
            if c.get("set_area_to_bounds"):
                bounds = torch.max(torch.abs(mask), dim=0).values
                if torch.max(bounds != 0) == False:  # noqa: E712  (as ComfyUI writes it)
                    c["area"] = (8, 8, 0, 0)
                else:
                    y, x = torch.where(bounds)
                    h, w = int(y.max() - y.min() + 1), int(x.max() - x.min() + 1)
                    c["area"] = (max(8, h), max(8, w), int(y.min()), int(x.min()))
            conditions[i] = c


def comfy_same_area(conds, c):
    if "area" not in c:
        return

    def inside(a, cmp):
        return all(a[2 + i] >= cmp[2 + i] for i in range(2)) and all(a[i] + a[2 + i] <= cmp[i] + cmp[2 + i]
                                                                       for i in range(2))

    smallest = None
    for x in conds:
        if "area" in x:
            if inside(c["area"], x["area"]):
                if smallest is None or "area" not in smallest:
                    smallest = x
                elif math.prod(smallest["area"][:2]) > math.prod(x["area"][:2]):
                    smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or ("area" in smallest and smallest["area"] == c["area"]):
        return
    conds.append(dict(c, model_conds=smallest["model_conds"]))


def comfy_area_and_mult(c, x_in):
    dims = x_in.shape[2:]
    area = list(c["area"]) if "area" in c else None
    input_x = x_in
    if area is not None:
        for i in range(2):
            area[i] = min(input_x.shape[i + 2] - area[2 + i], area[i])
            input_x = input_x.narrow(i + 2, area[2 + i], area[i])
    if "mask" in c:
        mask = c["mask"][: input_x.shape[0]]
        if area is not None:
            for i in range(2):
                mask = mask.narrow(i + 1, area[2 + i], area[i])
        mask = mask * c["mask_strength"]
        mask = mask.unsqueeze(1).repeat((input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1))
    else:
        mask = torch.ones_like(input_x)
    mult = mask * c["strength"]
    if "mask" not in c and area is not None:
        for i in range(2):
            rr = min(8, mult.shape[2 + i] // 4)
            if area[2 + i] != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if area[i] + area[2 + i] < dims[i]:
                for t in range(rr):
                    mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return input_x, mult, area


def comfy_apply_model(m, x, sigma, context, pooled, skip=(), control=None):
    """BaseModel.apply_model over ComfyUI's MMDiT: pad to the patch size, run, cut back; x - v * sigma."""
    h, w = x.shape[-2:]
    p = m.config.patch_size
    padded = torch.nn.functional.pad(x, (0, (-w) % p, 0, (-h) % p), mode="circular")
    residuals = control(padded, sigma, pooled, (h, w)) if control is not None else None
    b = x.shape[0]
    v = m(padded.to(m.compute_dtype), sigma * 1000, context.expand(b, -1, -1), pooled.expand(b, -1),
          skip_layers=skip, block_residuals=residuals).float()[:, :, :h, :w]
    return x - v * sigma.view(-1, 1, 1, 1)


def comfy_calc_cond_batch(m, conds, x_in, sigma, skip=(), control=None):
    out = torch.zeros_like(x_in)
    counts = torch.ones_like(x_in) * 1e-37
    for c in conds:
        input_x, mult, area = comfy_area_and_mult(c, x_in)
        mc = c["model_conds"]
        output = comfy_apply_model(m, input_x, sigma, mc["c_crossattn"], mc["y"], skip, control)
        if area is None:
            out += output * mult
            counts += mult
        else:
            out[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]] += output * mult
            counts[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]] += mult
    return out / counts


def comfy_conds(positive, negative, dims):
    conds = {"positive": [comfy_cond(e) for e in positive], "negative": [comfy_cond(e) for e in negative]}
    for k in conds:
        comfy_resolve(conds[k], dims)
    for k in conds:
        for c in conds[k]:
            for kk in conds:
                if k != kk:
                    comfy_same_area(conds[kk], c)
    return conds


def comfy_cfg(m, positive, negative, x, sigma, cfg, slg=None, control=None):
    conds = comfy_conds(positive, negative, tuple(x.shape[2:]))
    pos = comfy_calc_cond_batch(m, conds["positive"], x, sigma, control=control)
    neg = comfy_calc_cond_batch(m, conds["negative"], x, sigma, control=control)
    out = neg + (pos - neg) * cfg
    if slg is not None:  # ComfyUI's SkipLayerGuidanceSD3: calc_cond_batch of the cond with blocks skipped
        out = out + (pos - comfy_calc_cond_batch(m, conds["positive"], x, sigma, skip=slg.layers)) * slg.scale
    return out


# ---- the regions ------------------------------------------------------------------------------------------

def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int, batch: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, h, w)
    mask[:, y0:y1, x0:x1] = 1.0
    mask[:, y0:y1, x0] = 0.5  # a soft edge
    return mask


def regional_entries(m):
    base, neg = cond(m, 1), cond(m, 2)
    area = with_(cond(m, 3), area=(6, 8, 0, 8), strength=1.0)  # 48x64 px at 64,0 of a 128x96 image
    odd = with_(cond(m, 4), area=(5, 7, 7, 1), strength=1.3)  # odd sizes: padded to the patch size
    pct = with_(cond(m, 5, tokens=12), area=("percentage", 0.45, 0.4, 0.5, 0.55), strength=0.7)
    masked = with_(cond(m, 6), mask=box_mask(96, 128, 8, 56, 16, 72), mask_strength=0.8)
    bounds = with_(cond(m, 7), mask=box_mask(48, 64, 30, 44, 40, 60), mask_strength=1.2, set_area_to_bounds=True)
    return base, neg, [area, odd, pct, masked, bounds]


@pytest.mark.parametrize("batch", [1, 2])
def test_areas_and_masks_equal_comfyuis_calc_cond_batch(batch):
    m = model("sd3.5_large")
    base, neg, regional = regional_entries(m)
    x = latent(batch, hw=12)[:, :, :, :].repeat(1, 1, 1, 2)[:, :, :, :16]  # 12 x 16 latent
    positive = regional + [base]
    guider = Guider(m, positive, neg, request(cfg=4.5, steps=4))
    for s in (0.95, 0.4):
        sig = sigmas(s, batch)
        ours = guider(x, sig, 0)
        theirs = comfy_cfg(m, positive, [neg], x, sig, 4.5)
        diff = (ours - theirs).abs().max().item()
        assert diff <= TOL, diff
    # the negative got a copy of every area entry (ComfyUI's create_cond_with_same_area_if_none)
    layout = guider._layouts[tuple(x.shape)]
    assert len(layout.negative) == 1 + 4  # area, odd, pct and bounds have areas; the default mask has none
    assert all(torch.equal(e.context, guider.negative[0].context) for e, _ in layout.negative)


def test_equal_crops_share_a_batch():
    m = model("sd3.5_large")
    base, neg = cond(m, 1), cond(m, 2)
    left = with_(cond(m, 3), area=(8, 8, 0, 0))
    right = with_(cond(m, 4), area=(8, 8, 0, 8))
    guider = Guider(m, [left, right, base], neg, request(cfg=3.0, steps=4))
    x = latent(1, hw=8).repeat(1, 1, 1, 2)
    guider(x, sigmas(0.7, 1), 0)
    # one batch for the whole-latent rows, one for the four 8x8 crops (two positive, two mirrored negative)
    assert guider.stats.calls == 2


def test_an_entry_without_area_or_mask_stays_on_the_scalar_path():
    m = model("sd3.5_large")
    a, b, n = cond(m, 1, strength=2.0), cond(m, 2), cond(m, 3)
    x, sig = latent(1), sigmas(0.5, 1)
    plain = Guider(m, [a, b], n, request(cfg=4.0, steps=4))(x, sig, 0)
    # a mask of ones at strength 1 weighs the same: ComfyUI's per-pixel sum gives the same numbers
    ones = with_(b, mask=torch.ones(1, 64, 64))
    assert torch.allclose(Guider(m, [a, ones], n, request(cfg=4.0, steps=4))(x, sig, 0), plain, atol=1e-6)


def test_areas_compose_with_skip_layer_guidance():
    # Hand-built: ComfyUI's SkipLayerGuidanceSD3 skip pass is calc_cond_batch of the positive with the same areas
    m = model("sd3.5_medium")
    base, neg, regional = regional_entries(m)
    positive = regional[:3] + [base]
    slg = SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.0, end=1.0, window="sigma")
    x = latent(1, hw=12).repeat(1, 1, 1, 2)[:, :, :, :16]
    for share in (True, False):
        guider = Guider(m, positive, neg, request(cfg=4.0, steps=4, slg=slg, share_slg_prefix=share))
        sig = sigmas(0.6, 1)
        diff = (guider(x, sig, 1) - comfy_cfg(m, positive, [neg], x, sig, 4.0, slg=slg)).abs().max().item()
        assert diff <= TOL, diff


def test_areas_compose_with_a_controlnet_fitted_to_each_area():
    # Hand-built: the area rows' ControlNet input is the control image fitted to the area (here: the control
    # latent resized), padded to the patch size as the rows are.
    m = model("sd3.5_large")
    cn = controlnet()
    full = latent(1, hw=12, seed=11).repeat(1, 1, 1, 2)[:, :, :, :16]

    def encode(h, w):
        return torch.nn.functional.interpolate(full, size=(h, w), mode="bilinear")

    hint = ControlHint(cn, full, strength=0.8, encode=encode)
    base, neg, regional = regional_entries(m)
    positive = regional[:2] + [base]
    guider = Guider(m, positive, neg, request(cfg=4.0, steps=4, controls=[hint]))
    x, sig = latent(1, hw=12).repeat(1, 1, 1, 2)[:, :, :, :16], sigmas(0.8, 1)

    def control(xb, sigma, pooled, hw):
        cl = full if tuple(hw) == tuple(full.shape[-2:]) else encode(*hw)
        cl = torch.nn.functional.pad(cl, (0, xb.shape[-1] - hw[1], 0, xb.shape[-2] - hw[0]), mode="circular")
        return expand_residuals(controlnet_residuals(m, cn, xb, sigma, pooled, cl, 0.8), m.config.depth)

    diff = (guider(x, sig, 0) - comfy_cfg(m, positive, [neg], x, sig, 4.0, control=control)).abs().max().item()
    assert diff <= TOL, diff
    # without an encode function an area row cannot have its ControlNet input
    bare = Guider(m, positive, neg, request(cfg=4.0, steps=4, controls=[ControlHint(cn, full, 0.8)]))
    with pytest.raises(ValueError, match="fitted to the area"):
        bare(x, sig, 0)


def test_areas_compose_with_the_step_cache_and_a_noise_mask():
    m = model("sd3.5_medium")
    base, neg, regional = regional_entries(m)
    positive = regional + [base]
    init = latent(1, hw=12, seed=5).repeat(1, 1, 1, 2)[:, :, :, :16]
    keep = torch.zeros(1, 96, 128)
    keep[:, :, 64:] = 1.0  # repaint the right half
    settings = dict(cfg=4.0, steps=6, slg=SkipLayerGuidance(scale=2.0, start=0.0, end=0.5), noise_mask=keep)
    plain = pipeline.sample(m, positive, neg, init, request(**settings))
    never = pipeline.sample(m, positive, neg, init, request(cache_threshold=1e-12, **settings))
    assert torch.equal(plain, never)  # a cache that never hits is the guider's own steps
    stats = pipeline.PassStats()
    cached = pipeline.sample(m, positive, neg, init, request(cache_threshold=5.0, **settings),
                             pipeline.RunHooks(stats=stats))
    assert stats.cache_hits > 0 and torch.isfinite(cached).all()
    # the kept half is the input
    assert torch.allclose(plain[..., :8], init[..., :8], atol=1e-5)


@pytest.mark.parametrize("entry, message", [
    (dict(area=(4, 4, 12, 0)), "starts outside"),
    (dict(area=(0, 4, 0, 0)), "at least 1 latent pixel"),
    (dict(area=("percentage", 0.5, 1.5, 0.0, 0.0)), "fractions of the image"),
    (dict(area="left"), "expected"),
    (dict(mask=torch.ones(2, 64, 64)), "mask batch of 2"),
    (dict(mask=torch.full((1, 8, 8), float("nan"))), "NaN"),
])
def test_bad_regions_are_clear_errors(entry, message):
    m = model("sd3.5_large")
    guider_args = (m, [with_(cond(m, 1), **entry)], cond(m, 2), request(cfg=3.0, steps=4))
    x = latent(3, hw=12)
    with pytest.raises(ValueError, match=message):
        Guider(*guider_args)(x, sigmas(0.5, 3), 0)
