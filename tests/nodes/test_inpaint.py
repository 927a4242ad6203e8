"""Inpainting through the nodes: SD3.5 VAE Encode (for Inpainting), and noise masks in SD3.5 Sampler."""

import pytest
import torch

from .test_sampling import entries, sampler_inputs

SIZE = 32
LARGE = "tiny-sd3.5_large.safetensors"


@pytest.fixture
def vae(run_node):
    return run_node("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="default")[2]


@pytest.fixture
def parts(run_node, vae):
    """(model, vae, positive, negative) for the tiny Large-like model, from the nodes."""
    model = run_node("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="default")[0]
    (clip,) = run_node("SD35TextEncoderLoader", clip_l_name="clip_l.safetensors", clip_g_name="clip_g.safetensors",
                       t5xxl_name="t5xxl_fp16.safetensors", device="default")
    (pos,) = run_node("SD35TextEncode", clip=clip, text="a vase of sunflowers")
    (neg,) = run_node("SD35TextEncode", clip=clip, text="blurry")
    return model, vae, pos, neg


def _image(b=1, h=SIZE, w=SIZE, seed=1):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_encode_for_inpaint_greys_the_masked_pixels_and_attaches_the_grown_mask(run_node, vae):
    image = _image(h=SIZE + 5, w=SIZE + 3)
    mask = torch.zeros(1, SIZE + 5, SIZE + 3)  # LoadImage's MASK layout [B, H, W]
    mask[:, 10:20, 12:22] = 1.0
    (latent,) = run_node("SD35VAEEncodeForInpaint", pixels=image, vae=vae, mask=mask, grow_mask_by=4)
    assert latent["samples"].shape == (1, 16, SIZE // 8, SIZE // 8)
    noise_mask = latent["noise_mask"]
    assert noise_mask.shape == (1, 1, SIZE, SIZE)  # the cropped image's size, as ComfyUI's node returns it
    # Centre crop 37x35 -> 32x32 starts at row 2, column 1; the mask grows by 4 (one more down/right).
    expected = torch.zeros(SIZE, SIZE)
    expected[8 - 1 : 18 + 2, 11 - 1 : 21 + 2] = 1
    assert torch.equal(noise_mask[0, 0], expected)
    # The latent is the plain encode of the image with the (ungrown) masked pixels set to grey.
    grey = image[:, 2 : 2 + SIZE, 1 : 1 + SIZE].clone()
    grey[:, 8:18, 11:21] = 0.5
    (plain,) = run_node("SD35VAEEncode", pixels=grey, vae=vae)
    torch.testing.assert_close(latent["samples"], plain["samples"], rtol=0, atol=1e-6)


def test_encode_for_inpaint_takes_an_outpaint_mask_for_a_batch(run_node, vae):
    # What ImagePadForOutpaint gives: the image padded with grey and a [1, H, W] mask with feathered edges.
    image = _image(b=2)
    mask = torch.ones(1, SIZE, SIZE)
    mask[:, :, :16] = torch.linspace(0.0, 0.9, 16)
    (latent,) = run_node("SD35VAEEncodeForInpaint", pixels=image, vae=vae, mask=mask, grow_mask_by=0)
    assert latent["samples"].shape == (2, 16, 4, 4)
    assert torch.equal(latent["noise_mask"][0, 0], mask[0].round())


def test_encode_for_inpaint_tiled_equals_the_tiled_plain_encode_of_the_greyed_image(run_node, vae):
    image = _image(h=96, w=80)
    mask = torch.zeros(1, 96, 80)
    mask[:, 30:60, 20:50] = 1.0
    tiles = dict(tiled=True, tile_size=64, overlap=16)
    (latent,) = run_node("SD35VAEEncodeForInpaint", pixels=image, vae=vae, mask=mask, grow_mask_by=0, **tiles)
    grey = image.clone()
    grey[:, 30:60, 20:50] = 0.5
    (plain,) = run_node("SD35VAEEncode", pixels=grey, vae=vae, **tiles)
    torch.testing.assert_close(latent["samples"], plain["samples"], rtol=0, atol=1e-6)
    assert torch.equal(latent["noise_mask"][0], mask)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.full((1, SIZE, SIZE), float("nan")), "NaN"),
        (torch.ones(3, SIZE, SIZE), r"mask batch \(3\) must be 1 or the image batch \(2\)"),
    ],
)
def test_encode_for_inpaint_bad_masks_are_node_errors(run_node, vae, mask, message):
    with pytest.raises(ValueError, match=r"SD3.5 VAE Encode \(for Inpainting\): .*" + message):
        run_node("SD35VAEEncodeForInpaint", pixels=_image(b=2), vae=vae, mask=mask, grow_mask_by=6)


# ---- the sampler with a noise mask -------------------------------------------------------------------------


def _request(mask, **kw):
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest

    settings = dict(steps=3, cfg=4.0, sampler="euler", shift=3.0, seed=7, skip_uncond_at_cfg1=True,
                    noise_mask=mask)
    settings.update(kw)
    return SampleRequest(**settings)


def test_inpainting_through_the_nodes_equals_the_pipeline_and_keeps_the_unmasked_part(run_node, parts):
    from comfyui_sd35.sd35_core.sampling import pipeline

    model, vae, pos, neg = parts
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 0:16, 16:32] = 1.0  # on the 16-pixel grid; grown by 0 it stays there
    (latent,) = run_node("SD35VAEEncodeForInpaint", pixels=_image(), vae=vae, mask=mask, grow_mask_by=0)
    (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    expected = pipeline.sample(model.mmdit, entries(pos), entries(neg), latent["samples"],
                               _request(latent["noise_mask"]))
    assert torch.equal(out["samples"], expected)
    assert out["noise_mask"] is latent["noise_mask"]  # left on the latent, as ComfyUI's KSampler does
    kept = torch.ones(4, 4, dtype=torch.bool)
    kept[0:2, 2:4] = False
    torch.testing.assert_close(out["samples"][..., kept], latent["samples"][..., kept], rtol=1e-5, atol=1e-5)
    assert (out["samples"][..., ~kept] - latent["samples"][..., ~kept]).abs().max() > 0.1


def test_set_latent_noise_mask_with_img2img_and_the_differential_mode(run_node, parts):
    from comfyui_sd35.sd35_core.sampling import pipeline

    model, vae, pos, neg = parts
    (latent,) = run_node("SD35VAEEncode", pixels=_image(), vae=vae)
    soft = torch.linspace(0, 1, SIZE).expand(1, SIZE, SIZE).contiguous()
    masked = {**latent, "noise_mask": soft.reshape(-1, 1, SIZE, SIZE)}  # what SetLatentNoiseMask makes
    inputs = sampler_inputs(denoise=0.6, steps=5)
    (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=masked, mask_mode="differential",
                      **inputs)
    expected = pipeline.sample(model.mmdit, entries(pos), entries(neg), latent["samples"],
                               _request(soft, steps=5, denoise=0.6, mask_mode="differential"))
    assert torch.equal(out["samples"], expected)
    (standard,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=masked, **inputs)
    assert not torch.equal(standard["samples"], out["samples"])


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.full((1, SIZE, SIZE), float("nan")), r"SD3.5 Sampler: the latent's noise_mask: contains NaN"),
        (torch.ones(3, SIZE, SIZE), r"SD3.5 Sampler: the latent's noise_mask: the mask batch \(3\) must be 1 or "
                                    r"the latent batch \(2\)"),
    ],
)
def test_the_sampler_names_a_bad_noise_mask(run_node, parts, mask, message):
    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=2)
    with pytest.raises(ValueError, match=message):
        run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent={**latent, "noise_mask": mask},
                 **sampler_inputs())


def test_a_mask_of_another_size_is_resized_with_a_note(run_node, parts, caplog):
    import logging

    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    with caplog.at_level(logging.INFO):
        (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg,
                          latent={**latent, "noise_mask": torch.ones(1, 50, 70)}, **sampler_inputs())
    assert "noise_mask of 70x50 resized to the 4x4 latent of a 32x32 image" in caplog.text
    (plain,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    assert torch.equal(out["samples"], plain["samples"])  # all ones: the whole image is generated
