"""SampleRequest: one validated object carries every sampling setting down to the guider."""

from dataclasses import FrozenInstanceError, replace

import pytest
import torch

from sd35_core.sampling.control import ControlHint
from sd35_core.sampling.guidance import Guider
from sd35_core.sampling.pipeline import img2img, sample, txt2img
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
from sd35_core.sampling.schedule import sigmas_for
from sd35_core.validation import MAX_SEED

from .sampling_common import cond, controlnet, latent, model

BASE = dict(steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=1)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(steps=0), "steps: expected a whole number >= 1, got 0"),
        (dict(steps=True), "steps: expected a whole number >= 1, got True"),
        (dict(cfg="high"), "cfg: expected a finite number, got 'high'"),
        (dict(cfg=float("nan")), "cfg: expected a finite number, got nan"),
        (dict(sampler="ddim"), "sampler: expected one of"),
        (dict(schedule="karras"), "schedule: expected one of"),
        (dict(shift=-1.0), "shift: expected a finite number > 0, got -1.0"),
        (dict(denoise=0.0), r"denoise: expected a finite number in \(0, 1\], got 0.0"),
        (dict(seed=MAX_SEED + 1), f"seed: expected a whole number in 0..{MAX_SEED}"),
        (dict(seed=1.0), "seed: expected a whole number"),
        (dict(seed_mode="random"), "seed_mode: expected one of batch, per_image, got 'random'"),
        (dict(slg=(7, 8, 9)), "slg: expected a SkipLayerGuidance or None, got tuple"),
        (dict(controls=[object()]), "controls: expected ControlHint items, got object"),
        (dict(controls=5), "controls: expected a list of ControlHint, got int"),
        (dict(share_slg_prefix=1), "share_slg_prefix: expected True or False, got 1"),
        (dict(skip_uncond_at_cfg1="yes"), "skip_uncond_at_cfg1: expected True or False, got 'yes'"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SampleRequest(**(BASE | settings))


def test_settings_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        SampleRequest(4, 4.0, "euler", 3.0, 1)
    request = SampleRequest(**BASE)
    with pytest.raises(FrozenInstanceError):
        request.cfg = 5.0


def test_values_are_normalised_and_replace_validates_again():
    hint = ControlHint(controlnet(), latent(1, seed=3))
    request = SampleRequest(steps=4, cfg=4, sampler="euler", shift=3, seed=1, denoise=1, controls=[hint])
    assert (type(request.cfg), type(request.shift), type(request.denoise)) == (float, float, float)
    assert request.controls == (hint,)
    assert replace(request, seed=2).seed == 2 and replace(request, seed=2).controls == (hint,)
    with pytest.raises(ValueError, match="^steps:"):
        replace(request, steps=-3)


@pytest.mark.parametrize("schedule, denoise", [("reference", 1.0), ("beta", 1.0), ("reference", 0.6)])
def test_sigmas_are_the_schedules(schedule, denoise):
    request = SampleRequest(**BASE, schedule=schedule, denoise=denoise)
    assert torch.equal(request.sigmas(), sigmas_for(schedule, 4, 3.0, denoise))


def test_txt2img_and_img2img_are_sample_over_their_latents():
    m = model("sd3.5_large", depth=2)
    pos, neg = cond(m, 1), cond(m, 2)
    request = SampleRequest(**BASE, slg=SkipLayerGuidance(layers=(1,), start=0.0, end=0.5))
    zeros = torch.zeros(2, 16, 8, 8)
    assert torch.equal(txt2img(m, pos, neg, request, width=64, height=64, batch_size=2),
                       sample(m, pos, neg, zeros, request))
    init = latent(1, seed=4)
    partial = replace(request, denoise=0.5)
    assert torch.equal(img2img(m, pos, neg, partial, init_latent=init, batch_size=2),
                       sample(m, pos, neg, init.expand(2, -1, -1, -1), partial))


def test_txt2img_refuses_a_partial_denoise_and_sample_a_bad_latent():
    m = model("sd3.5_large", depth=2)
    pos, neg = cond(m, 1), cond(m, 2)
    with pytest.raises(ValueError, match="^denoise: text-to-image starts from pure noise"):
        txt2img(m, pos, neg, SampleRequest(**BASE, denoise=0.5), width=64, height=64)
    with pytest.raises(ValueError, match=r"^latent: expected a latent \[B, 16, h, w\], got \(16, 8, 8\)"):
        sample(m, pos, neg, torch.zeros(16, 8, 8), SampleRequest(**BASE))


def test_the_request_is_the_only_settings_argument():
    m = model("sd3.5_large", depth=2)
    with pytest.raises(ValueError, match="^request: expected a SampleRequest, got dict"):
        Guider(m, cond(m, 1), cond(m, 2), dict(BASE))
    with pytest.raises(ValueError, match="^request: expected a SampleRequest, got dict"):
        sample(m, cond(m, 1), cond(m, 2), torch.zeros(1, 16, 8, 8), dict(BASE))
