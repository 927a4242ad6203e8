"""Sampling with the IP-Adapter: diffusers' StableDiffusion3Pipeline end to end, weight 0 bit-identical to no
adapter, and every row the Guider batches carrying its own tokens (cond rows the picture's, uncond rows zeros,
the skip-layer pass the cond's) with SLG, a ControlNet, a noise mask, a LoRA, a batch of 2, two stacked
adapters and the step cache, each checked against a computation batched by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from sd35_core.image.siglip_input import encode_image
from sd35_core.loading.clip_vision import load_siglip_vision
from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.tiny import write_lora
from sd35_core.loading.tiny_ip_adapter import SIGLIP_TINY, write_siglip
from sd35_core.models.latent import process_out
from sd35_core.sampling.control import ControlHint, controlnet_residuals, expand_residuals
from sd35_core.sampling.guidance import Guider
from sd35_core.sampling.ip_adapter import IPAdapterHint
from sd35_core.sampling.passes import WholePasses
from sd35_core.sampling.pipeline import img2img, sample, txt2img
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
from sd35_core.sampling.schedule import sigmas_for

from .ip_adapter_common import adapter, diffusers_twin, features, hand_ip, large
from .sampling_common import assert_close, cond, controlnet, latent

SHIFT = 3.0


def _request(**kw) -> SampleRequest:
    return SampleRequest(**{"steps": 4, "cfg": 4.0, "sampler": "euler", "shift": SHIFT, "seed": 7, **kw})


def _hint(seed: int = 0, n: int = 1, weight: float = 0.8, **kw) -> IPAdapterHint:
    return IPAdapterHint(adapter(seed), features(n, seed=11 + seed), weight, **kw)


def _terms(hints):
    return [(h.adapter, h.features, h.weight) for h in hints]


def _hand_step(m, x, sigma, pos, neg, cfg, hints, slg=None, residuals=None):
    """One guided step batched by hand: [cond; uncond] with per-row IP input (and ControlNet residuals), and a
    separate skip pass of the cond rows with the cond's tokens and no residuals."""
    b = x.shape[0]
    t = sigma * 1000.0
    rows = [True] * b + [False] * b
    both = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([pos.context.expand(b, -1, -1), neg.context.expand(
        b, -1, -1)]), torch.cat([pos.pooled.expand(b, -1), neg.pooled.expand(b, -1)]), block_residuals=residuals,
        ip=hand_ip(_terms(hints), rows, torch.cat([sigma, sigma])))
    den = torch.cat([x, x]) - both * torch.cat([sigma, sigma]).view(-1, 1, 1, 1)
    c, u = den[:b], den[b:]
    out = u + (c - u) * cfg
    if slg is not None:
        skipped = m(x, t, pos.context.expand(b, -1, -1), pos.pooled.expand(b, -1), skip_layers=slg.layers,
                    ip=hand_ip(_terms(hints), [True] * b, sigma))
        out = out + (c - (x - skipped * sigma.view(-1, 1, 1, 1))) * slg.scale
    return out


# --- end to end against diffusers ------------------------------------------------------------------------


def test_sampling_matches_diffusers_sd3_pipeline(tmp_path):
    m, ip = large(), adapter()
    path = write_siglip(tmp_path / "sigclip.safetensors")
    c = SIGLIP_TINY
    encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")).eval()
    encoder.load_state_dict({k.removeprefix("vision_model."): v for k, v in load_file(path).items()}, strict=True)
    processor = SiglipImageProcessorPil(size={"height": c.image_size, "width": c.image_size}, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = StableDiffusion3Pipeline(
        transformer=diffusers_twin(m, ip, 0.8), scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, image_encoder=encoder,
        feature_extractor=processor)
    pipe.set_ip_adapter_scale(0.8)
    pipe.set_progress_bar_config(disable=True)
    pos, neg = cond(m, 1), cond(m, 2)
    picture = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    steps, seed = 5, 42
    sigmas = sigmas_for("reference", steps, SHIFT, 1.0)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = pipe(prompt_embeds=pos.context, pooled_prompt_embeds=pos.pooled, negative_prompt_embeds=neg.context,
                      negative_pooled_prompt_embeds=neg.pooled, guidance_scale=4.0, num_inference_steps=steps,
                      sigmas=sigmas[:-1].numpy(), latents=noise, output_type="latent",
                      ip_adapter_image=Image.fromarray(picture), height=64, width=64).images
    assert torch.equal(scheduler.sigmas, sigmas)
    feats = encode_image(load_siglip_vision(path, "fp32"), torch.from_numpy(picture.copy())[None].float() / 255.0)
    request = SampleRequest(steps=steps, cfg=4.0, sampler="euler", shift=SHIFT, seed=seed,
                            ip_adapters=[IPAdapterHint(ip, feats, 0.8)])
    ours = txt2img(m, pos, neg, request, width=64, height=64)
    print("pipeline max abs diff", assert_close(ours, process_out(theirs)))
    plain = txt2img(m, pos, neg, _request(steps=steps, seed=seed), width=64, height=64)
    assert (plain - ours).abs().max() > 1e-2


# --- bit-identity when the adapter does nothing ----------------------------------------------------------


def test_weight_zero_and_a_closed_window_are_bit_identical_to_no_adapter():
    m = large()
    pos, neg = cond(m, 1), cond(m, 2)
    slg = SkipLayerGuidance(layers=(2,), scale=2.0, start=0.0, end=1.0)
    plain = txt2img(m, pos, neg, _request(slg=slg), width=64, height=64, batch_size=2)
    for hint in (_hint(weight=0.0), _hint(start=0.5, end=0.5)):
        assert torch.equal(txt2img(m, pos, neg, _request(slg=slg, ip_adapters=[hint]), width=64, height=64,
                                   batch_size=2), plain)
    # a window over the second half only changes the result from there on
    half = txt2img(m, pos, neg, _request(ip_adapters=[_hint(start=0.5)]), width=64, height=64)
    assert (half - txt2img(m, pos, neg, _request(), width=64, height=64)).abs().max() > 1e-3


# --- every row with its own tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("share_prefix", [True, False])
def test_slg_skip_pass_sees_the_cond_tokens(share_prefix):
    m = large()
    pos, neg = cond(m, 1), cond(m, 2)
    slg = SkipLayerGuidance(layers=(2,), scale=2.5, start=0.0, end=1.0)
    hints = [_hint()]
    guider = Guider(m, pos, neg, _request(slg=slg, ip_adapters=hints, share_slg_prefix=share_prefix))
    x, sigma = latent(1, seed=5), torch.tensor([0.75])
    with torch.no_grad():
        ours = guider(x, sigma, 1)
        theirs = _hand_step(m, x, sigma, pos, neg, 4.0, hints, slg)
        # the diffusers bug this guards against: the skip pass with the uncond (zero-feature) tokens
        wrong = IPAdapterHint(hints[0].adapter, torch.zeros_like(hints[0].features), 0.8)
        mixed = _hand_step(m, x, sigma, pos, neg, 4.0, hints, None) + 2.5 * (
            _hand_step(m, x, sigma, pos, neg, 1.0, hints, None)
            - _hand_step(m, x, sigma, pos, neg, 1.0, [wrong], SkipLayerGuidance(layers=(2,), scale=1.0, start=0.0,
                                                                                  end=1.0)))
    print("slg hand-batched max abs diff", assert_close(ours, theirs, tol=1e-5))
    assert (ours - mixed).abs().max() > 1e-3
    assert (guider.stats.shared_prefix_steps, guider.stats.separate_skip_steps) == (
        (1, 0) if share_prefix else (0, 1))


def test_controlnet_a_batch_of_two_and_two_stacked_adapters():
    m, cn = large(), controlnet()
    pos, neg = cond(m, 1), cond(m, 2)
    hint_latent = latent(seed=11)
    control = ControlHint(cn, hint_latent, strength=0.7)
    slg = SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, end=1.0)
    hints = [_hint(0, n=2, weight=0.6), _hint(1, weight=-0.4)]  # two pictures in one, and a second adapter
    guider = Guider(m, pos, neg, _request(slg=slg, controls=[control], ip_adapters=hints))
    x, sigma = latent(2, seed=6), torch.tensor([0.6, 0.6])
    with torch.no_grad():
        ours = guider(x, sigma, 1)
        xs, ss = torch.cat([x, x]), torch.cat([sigma, sigma])
        ys = torch.cat([pos.pooled.expand(2, -1), neg.pooled.expand(2, -1)])
        residuals = expand_residuals(controlnet_residuals(m, cn, xs, ss, ys, hint_latent, 0.7), m.config.depth)
        theirs = _hand_step(m, x, sigma, pos, neg, 4.0, hints, slg, residuals)
        one = Guider(m, pos, neg, _request(slg=slg, controls=[control], ip_adapters=hints[:1]))(x, sigma, 1)
    print("controlnet + batch 2 + stacked max abs diff", assert_close(ours, theirs, tol=1e-5))
    assert (one - ours).abs().max() > 1e-3  # the second adapter adds its own term


def test_noise_mask_keeps_outside_and_the_adapter_repaints_inside():
    m = large()
    pos, neg = cond(m, 1), cond(m, 2)
    init = latent(1, seed=3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0
    request = _request(ip_adapters=[_hint()], noise_mask=mask)
    out = img2img(m, pos, neg, request, init_latent=init)
    plain = img2img(m, pos, neg, _request(noise_mask=mask), init_latent=init)
    kept = (slice(None), slice(None), slice(None), slice(0, 4))
    assert ((out[kept] - init[kept]).abs().max() / init[kept].abs().max()) < 1e-5
    assert (out[..., 4:] - plain[..., 4:]).abs().max() > 1e-3


def test_lora_applies_inside_the_blocks_the_adapter_attends_from(tmp_path):
    m = large()
    lora = load_lora(write_lora(tmp_path / "lora.safetensors", "sd3.5_large", text_encoders=False), mmdit=m).model
    pos, neg = cond(m, 1), cond(m, 2)
    hints = [_hint()]
    x, sigma = latent(1, seed=8), torch.tensor([0.5])
    with torch.no_grad(), applied(m, [(lora, 0.9)]):
        ours = Guider(m, pos, neg, _request(ip_adapters=hints))(x, sigma, 0)
        theirs = _hand_step(m, x, sigma, pos, neg, 4.0, hints)
    with torch.no_grad():
        without = Guider(m, pos, neg, _request(ip_adapters=hints))(x, sigma, 0)
    print("lora max abs diff", assert_close(ours, theirs, tol=1e-5))
    assert (ours - without).abs().max() > 1e-3


def test_step_cache_with_the_adapter():
    m = large()
    pos, neg = cond(m, 1), cond(m, 2)
    hints = [_hint()]
    plain = txt2img(m, pos, neg, _request(steps=6, ip_adapters=hints), width=64, height=64)
    never = txt2img(m, pos, neg, _request(steps=6, ip_adapters=hints, cache_threshold=1e-12), width=64, height=64)
    assert torch.equal(never, plain)  # a cache that never hits runs the guider's own steps
    cached = txt2img(m, pos, neg, _request(steps=6, ip_adapters=hints, cache_threshold=10.0), width=64, height=64)
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()


# --- refusals --------------------------------------------------------------------------------------------


class _Whole(WholePasses):
    def forward(self, x, timestep, context, pooled, skip_layers, residuals):
        return self.model(x, timestep, context, pooled, skip_layers=skip_layers, block_residuals=residuals)


def test_whole_passes_and_misfits_are_refused_by_name():
    m = large()
    pos, neg = cond(m, 1), cond(m, 2)
    with pytest.raises(ValueError, match="IP-Adapter.*only whole passes"):
        sample(_Whole(m), pos, neg, latent(1), _request(ip_adapters=[_hint()]))
    medium = cond(large(), 1)
    with pytest.raises(ValueError, match="IP-Adapter does not fit.*10 joint blocks"):
        from .sampling_common import model

        sample(model("sd3.5_medium"), medium, medium, latent(1), _request(ip_adapters=[_hint()]))
    with pytest.raises(ValueError, match="image features"):
        IPAdapterHint(adapter(), torch.zeros(1, 16, 1152))
    with pytest.raises(ValueError, match="IP-Adapter window"):
        _hint(start=0.8, end=0.2)
    with pytest.raises(ValueError, match="ip_adapters: expected IPAdapterHint"):
        _request(ip_adapters=["picture.png"])


def test_half_precision_follows_float32():
    """bf16 activations (as on GPUs): the adapter runs in the model's compute dtype, near the float32 result."""
    import copy

    m = copy.deepcopy(large())
    pos, neg = cond(m, 1), cond(m, 2)
    x, sigma = latent(1, seed=4), torch.tensor([0.8])
    hints = [_hint()]
    with torch.no_grad():
        full = Guider(m, pos, neg, _request(ip_adapters=hints))(x, sigma, 0)
        m.compute_dtype = torch.bfloat16
        half = Guider(m, pos, neg, _request(ip_adapters=hints))(x, sigma, 0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert ((half - full).abs().max() / full.abs().max()).item() < 5e-2
