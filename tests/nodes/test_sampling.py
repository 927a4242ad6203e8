"""Text encode -> sampler -> decode through the node classes, against the plain sd35_core pipeline."""

import pytest
import torch

SIZE = 32  # pixels: a 4x4 latent keeps every run to a fraction of a second per step
LARGE = "tiny-sd3.5_large.safetensors"  # 4 joint blocks
MEDIUM = "tiny-sd3.5_medium.safetensors"  # 10 joint blocks, SD3.5 Medium layout


def sampler_inputs(**overrides):
    inputs = dict(seed=7, steps=3, cfg=4.0, sampler="euler", schedule="reference", shift=0.0, denoise=1.0,
                  slg_layers="", slg_scale=0.0, slg_start=0.01, slg_end=0.2, slg_window="steps")
    inputs.update(overrides)
    return inputs


@pytest.fixture
def parts(run_node):
    """(model, vae, positive, negative) for the tiny Large-like model, from the nodes."""
    model, _, vae = run_node("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="default")
    (clip,) = run_node("SD35TextEncoderLoader", clip_l_name="clip_l.safetensors", clip_g_name="clip_g.safetensors",
                       t5xxl_name="t5xxl_fp16.safetensors", device="default")
    (pos,) = run_node("SD35TextEncode", clip=clip, text="a lighthouse at dusk, (oil painting:1.2)")
    (neg,) = run_node("SD35TextEncode", clip=clip, text="blurry")
    return model, vae, pos, neg


def entries(conditioning):
    from comfyui_sd35.sd35_core.sampling.guidance import CondEntry

    return [CondEntry(c, o["pooled_output"], o.get("strength", 1.0), o.get("start_percent", 0.0),
                      o.get("end_percent", 1.0)) for c, o in conditioning]


def test_text_encode_sample_decode(run_node, parts):
    model, vae, pos, neg = parts
    assert pos[0][0].shape == (1, 77 + 77, model.config.context_dim)
    assert pos[0][1]["pooled_output"].shape == (1, model.config.pooled_dim)
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=48, batch_size=2)
    assert latent["samples"].shape == (2, 16, 6, 4)
    (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    samples = out["samples"]
    assert samples.shape == (2, 16, 6, 4) and samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert not torch.equal(samples[0], samples[1])  # one noise draw for the batch
    (image,) = run_node("SD35VAEDecode", samples=out, vae=vae)
    assert image.shape == (2, 48, SIZE, 3) and 0 <= image.min() and image.max() <= 1


def test_sampler_node_equals_the_pipeline(run_node, parts):
    from comfyui_sd35.sd35_core.sampling import pipeline
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    settings = sampler_inputs(sampler="dpmpp_2m", slg_layers="1, 2", slg_scale=2.5, slg_start=0.0, slg_end=0.7)
    (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **settings)
    request = SampleRequest(steps=3, cfg=4.0, sampler="dpmpp_2m", shift=3.0, seed=7,
                            slg=SkipLayerGuidance(layers=(1, 2), scale=2.5, start=0.0, end=0.7))
    expected = pipeline.txt2img(model.mmdit, entries(pos), entries(neg), request, width=SIZE, height=SIZE)
    assert torch.equal(out["samples"], expected)
    (plain,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                        **sampler_inputs(sampler="dpmpp_2m"))
    assert not torch.equal(plain["samples"], out["samples"])  # SLG changed the result


def test_comfyui_timestep_ranges_and_combine_are_honoured(run_node, parts):
    from comfyui_sd35.sd35_core.sampling import pipeline
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest

    model, _, pos, neg = parts
    (other,) = run_node("SD35TextEncode", clip=run_node("SD35TextEncoderLoader", clip_l_name="clip_l.safetensors",
                                                       clip_g_name="clip_g.safetensors", t5xxl_name="none",
                                                       device="cpu")[0], text="a forest")
    # What ConditioningSetTimestepRange and ConditioningCombine produce: options copied, lists concatenated.
    early = [[pos[0][0], {**pos[0][1], "start_percent": 0.0, "end_percent": 0.5}]]
    late = [[other[0][0], {**other[0][1], "start_percent": 0.5, "end_percent": 1.0, "strength": 0.7}]]
    combined = early + late
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    (out,) = run_node("SD35Sampler", model=model, positive=combined, negative=neg, latent=latent,
                      **sampler_inputs(steps=4))

    # No T5: the context is only as wide as CLIP; the sampler pads it to the model's width, as the reference.
    late_ctx = late[0][0]
    assert late_ctx.shape[-1] < model.config.context_dim
    padded = torch.nn.functional.pad(late_ctx, (0, model.config.context_dim - late_ctx.shape[-1]))
    want = entries(early) + entries([[padded, late[0][1]]])
    request = SampleRequest(steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=7)
    expected = pipeline.txt2img(model.mmdit, want, entries(neg), request, width=SIZE, height=SIZE)
    assert torch.equal(out["samples"], expected)
    (only_pos,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                           **sampler_inputs(steps=4))
    assert not torch.equal(only_pos["samples"], out["samples"])


def test_slg_layer_out_of_range_is_a_clear_error(run_node, parts):
    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    with pytest.raises(ValueError, match=r"slg layers: 7 is out of range for a model with 4 joint blocks \(0..3\)"):
        run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                 **sampler_inputs(slg_layers="7,8,9", slg_scale=2.5))
    with pytest.raises(ValueError, match="slg_layers: expected comma-separated"):
        run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                 **sampler_inputs(slg_layers="seven", slg_scale=2.5))


def test_slg_on_the_medium_layout_with_the_reference_layers(run_node, parts):
    _, _, pos, neg = parts
    medium = run_node("SD35CheckpointLoader", ckpt_name=MEDIUM, weight_dtype="default")[0]
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    kw = dict(model=medium, positive=pos, negative=neg, latent=latent)
    (with_slg,) = run_node("SD35Sampler", **kw, **sampler_inputs(steps=4, slg_layers="7,8,9", slg_scale=2.5,
                                                                 slg_start=0.0, slg_end=1.0))
    (sigma_window,) = run_node("SD35Sampler", **kw, **sampler_inputs(steps=4, slg_layers="7,8,9", slg_scale=2.5,
                                                                     slg_start=0.0, slg_end=1.0, slg_window="sigma"))
    (without,) = run_node("SD35Sampler", **kw, **sampler_inputs(steps=4))
    assert torch.isfinite(with_slg["samples"]).all()
    assert not torch.equal(with_slg["samples"], without["samples"])
    assert not torch.equal(with_slg["samples"], sigma_window["samples"])


def test_conditioning_that_is_not_sd3_is_refused(run_node, parts):
    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    no_pooled = [[pos[0][0], {}]]
    with pytest.raises(ValueError, match=r"positive\[0\]: the conditioning has no pooled_output"):
        run_node("SD35Sampler", model=model, positive=no_pooled, negative=neg, latent=latent, **sampler_inputs())
    sdxl_like = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match=r"negative\[0\]"):
        run_node("SD35Sampler", model=model, positive=pos, negative=sdxl_like, latent=latent, **sampler_inputs())


def test_img2img_through_vae_encode_equals_the_pipeline(run_node, parts):
    from comfyui_sd35.sd35_core.sampling import pipeline
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest

    model, vae, pos, neg = parts
    image = torch.rand(1, SIZE + 5, SIZE + 3, 3, generator=torch.Generator().manual_seed(1))
    (latent,) = run_node("SD35VAEEncode", pixels=image, vae=vae)
    assert latent["samples"].shape == (1, 16, SIZE // 8, SIZE // 8)  # centre-cropped to a multiple of 16
    (again,) = run_node("SD35VAEEncode", pixels=image, vae=vae)
    assert torch.equal(latent["samples"], again["samples"])  # the mean: deterministic
    (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                      **sampler_inputs(steps=4, denoise=0.5))
    request = SampleRequest(denoise=0.5, steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=7)
    expected = pipeline.img2img(model.mmdit, entries(pos), entries(neg), request, init_latent=latent["samples"])
    assert torch.equal(out["samples"], expected)
    (unchanged,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                            **sampler_inputs(denoise=0.0))
    assert torch.equal(unchanged["samples"], latent["samples"])


def test_tiled_vae_matches_whole_vae(run_node, parts):
    _, vae, _, _ = parts
    latent = {"samples": torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(3))}
    (whole,) = run_node("SD35VAEDecode", samples=latent, vae=vae)
    (tiled,) = run_node("SD35VAEDecode", samples=latent, vae=vae, tiled=True, tile_size=64, overlap=16)
    assert tiled.shape == whole.shape == (1, 96, 80, 3)
    from comfyui_sd35.sd35_core.models.vae import vae_output_to_image

    assert torch.equal(tiled, vae_output_to_image(vae.vae.decode_tiled(latent["samples"], 64, 16)))
    assert not torch.equal(tiled, whole)  # it really went through tiles
    (one_tile,) = run_node("SD35VAEDecode", samples=latent, vae=vae, tiled=True, tile_size=128, overlap=16)
    assert torch.equal(one_tile, whole)


def test_missing_vae_is_a_clear_error(run_node, parts):
    _, _, _, _ = parts
    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_medium-bare.safetensors",
                                weight_dtype="default")
    assert vae is None and clip is None
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    with pytest.raises(ValueError, match="SD3.5 VAE Decode: the vae input is empty.*SD3.5 VAE Loader"):
        run_node("SD35VAEDecode", samples=latent, vae=vae)
    with pytest.raises(ValueError, match="SD3.5 Text Encode: the clip input is empty.*SD3.5 Text Encoder Loader"):
        run_node("SD35TextEncode", clip=clip, text="x")


def test_empty_latent_rejects_sizes_the_model_cannot_take(run_node, parts):
    model = parts[0]
    with pytest.raises(ValueError, match="width 40 is not a positive multiple of 16"):
        run_node("SD35EmptyLatent", width=40, height=32, batch_size=1)
    largest = model.config.max_image_size
    run_node("SD35EmptyLatent", width=largest, height=16, batch_size=1, model=model)
    with pytest.raises(ValueError, match=f"at most {largest}x{largest} pixels"):
        run_node("SD35EmptyLatent", width=largest + 16, height=16, batch_size=1, model=model)


def test_progress_every_step_and_cancel_leaves_the_model_usable(run_node, parts, monkeypatch):
    from comfyui_sd35.nodes import host

    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    reports = []

    class Recording(host.Progress):
        def update(self, step, total=None, x0=None):
            super().update(step, total, x0)
            reports.append((self.current, self.total, None if self.last_preview is None else self.last_preview.shape))

    monkeypatch.setattr(host, "Progress", Recording)
    (first,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    assert reports == [(1, 3, (4, 4, 3)), (2, 3, (4, 4, 3)), (3, 3, (4, 4, 3))]

    class Cancelled(Exception):
        pass

    calls = []

    def cancel_on_second_step():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled()  # what ComfyUI's throw_exception_if_processing_interrupted does
        return False

    monkeypatch.setattr(host, "check_interrupt", cancel_on_second_step)
    with pytest.raises(Cancelled):
        run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    monkeypatch.setattr(host, "check_interrupt", lambda: False)
    (after,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    assert torch.equal(after["samples"], first["samples"])


def test_a_model_with_its_own_preview_map_is_previewed_with_it(run_node, monkeypatch):
    from comfyui_sd35.nodes import host
    from comfyui_sd35.sd35_core.models.latent import SD3_PREVIEW, latent_to_rgb_preview

    model, clip, _ = run_node("SD35CheckpointLoader", ckpt_name="tiny_shapes_sd35.safetensors", weight_dtype="default")
    assert model.preview != SD3_PREVIEW  # its VAE is its own, trained here
    (pos,) = run_node("SD35TextEncode", clip=clip, text="a red circle on the left of a blue background")
    (neg,) = run_node("SD35TextEncode", clip=clip, text="")
    (latent,) = run_node("SD35EmptyLatent", width=64, height=64, batch_size=1)
    shown = []

    class Recording(host.Progress):
        def update(self, step, total=None, x0=None):
            super().update(step, total, x0)
            shown.append(torch.equal(self.last_preview, latent_to_rgb_preview(x0, model.preview)))

    monkeypatch.setattr(host, "Progress", Recording)
    run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    assert shown == [True] * 3


def test_controlnet_apply_attaches_the_hint_and_the_sampler_runs_it(run_node, parts, models_env):
    from comfyui_sd35.sd35_core.image.control_image import prepare_control_image
    from comfyui_sd35.sd35_core.models.latent import process_in
    from comfyui_sd35.sd35_core.sampling import pipeline
    from comfyui_sd35.sd35_core.sampling.control import ControlHint
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest

    model, vae, pos, neg = parts
    (cn,) = run_node("SD35ControlNetLoader", model=model,
                     control_net_name="tiny-sd3.5_large_controlnet_canny.safetensors")
    photo = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(5))
    (edges,) = run_node("SD35CannyPreprocessor", image=photo, low_threshold=100, high_threshold=200)
    assert edges.shape == photo.shape and set(edges.unique().tolist()) <= {0.0, 1.0}
    cpos, cneg = run_node("SD35ControlNetApply", positive=pos, negative=neg, control_net=cn, vae=vae, image=edges,
                          strength=0.8, start_percent=0.0, end_percent=0.5)
    assert "sd35_control" in cpos[0][1] and cpos[0][1]["sd35_control"] == cneg[0][1]["sd35_control"]
    assert "sd35_control" not in pos[0][1]  # inputs are not modified
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    (out,) = run_node("SD35Sampler", model=model, positive=cpos, negative=cneg, latent=latent,
                      **sampler_inputs(steps=4))

    pixels = prepare_control_image(edges, SIZE, SIZE, "canny", resize_mode="crop")  # the node's default
    hint = ControlHint(cn.controlnet, process_in(vae.vae.encode(pixels)), 0.8, 0.0, 0.5)
    request = SampleRequest(steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=7, controls=[hint])
    expected = pipeline.txt2img(model.mmdit, entries(pos), entries(neg), request, width=SIZE, height=SIZE)
    assert torch.equal(out["samples"], expected)
    (plain,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent,
                        **sampler_inputs(steps=4))
    assert not torch.equal(plain["samples"], out["samples"])
    off = run_node("SD35ControlNetApply", positive=pos, negative=neg, control_net=cn, vae=vae, image=edges,
                   strength=0.0, start_percent=0.0, end_percent=1.0)
    assert off == (pos, neg)


def test_blur_and_depth_preprocessors_and_depth_controlnet(run_node, parts):
    model, vae, pos, neg = parts
    photo = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(6))
    (blurred,) = run_node("SD35BlurPreprocessor", image=photo, kernel_size=9)
    assert blurred.shape == photo.shape and blurred.std() < photo.std()
    depth_raw = torch.linspace(0.2, 0.6, 32).view(1, 32, 1, 1).expand(1, 32, 32, 3)
    (depth,) = run_node("SD35DepthNormalize", image=depth_raw, invert=False)
    assert depth.min() == 0 and depth.max() == 1
    (inverted,) = run_node("SD35DepthNormalize", image=depth_raw, invert=True)
    assert torch.allclose(inverted, 1 - depth)
    (cn,) = run_node("SD35ControlNetLoader", model=model,
                     control_net_name="tiny-sd3.5_large_controlnet_depth.safetensors")
    cpos, cneg = run_node("SD35ControlNetApply", positive=pos, negative=neg, control_net=cn, vae=vae, image=depth,
                          strength=1.0, start_percent=0.0, end_percent=1.0, depth_invert="on")
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    (out,) = run_node("SD35Sampler", model=model, positive=cpos, negative=cneg, latent=latent,
                      **sampler_inputs(steps=2))
    assert torch.isfinite(out["samples"]).all()


def test_depth_normalize_leaves_orientation_to_apply_controlnet_and_its_old_invert_input_still_works(
        node_classes, run_node):
    spec = node_classes["SD35DepthNormalize"].INPUT_TYPES()
    assert "invert" not in {**spec["required"], **spec.get("optional", {})}  # no second control in the editor
    assert "depth_invert" in node_classes["SD35ControlNetApply"].INPUT_TYPES()["optional"]
    depth_raw = torch.linspace(0.2, 0.6, 16).view(1, 16, 1, 1).expand(1, 16, 16, 3)
    (plain,) = run_node("SD35DepthNormalize", image=depth_raw)
    # An API prompt saved with the old widget still passes invert (ComfyUI hands hidden inputs over).
    (inverted,) = run_node("SD35DepthNormalize", image=depth_raw, invert=True)
    assert torch.allclose(inverted, 1 - plain)
    with pytest.raises(ValueError, match="invert: expected true or false"):
        run_node("SD35DepthNormalize", image=depth_raw, invert="yes")


def test_apply_controlnet_fits_a_control_image_of_another_aspect_by_resize_mode(node_classes, run_node, parts):
    optional = list(node_classes["SD35ControlNetApply"].INPUT_TYPES()["optional"])
    assert optional[-1] == "resize_mode"  # appended: saved workflows' widget values keep their places
    assert node_classes["SD35ControlNetApply"].INPUT_TYPES()["optional"]["resize_mode"][1]["default"] == "crop"
    model, vae, pos, neg = parts
    (cn,) = run_node("SD35ControlNetLoader", model=model,
                     control_net_name="tiny-sd3.5_large_controlnet_canny.safetensors")
    wide = torch.rand(1, SIZE, 3 * SIZE, 3, generator=torch.Generator().manual_seed(8))
    common = dict(positive=pos, negative=neg, control_net=cn, vae=vae, strength=1.0, start_percent=0.0,
                  end_percent=1.0)
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)

    def sample(image, **mode):
        cpos, cneg = run_node("SD35ControlNetApply", image=image, **common, **mode)
        (out,) = run_node("SD35Sampler", model=model, positive=cpos, negative=cneg, latent=latent,
                          **sampler_inputs(steps=1))
        return out["samples"]

    old_workflow = sample(wide)  # no resize_mode input: crop
    assert torch.equal(old_workflow, sample(wide[:, :, SIZE:2 * SIZE].contiguous()))  # the middle third
    assert not torch.equal(sample(wide, resize_mode="pad"), old_workflow)
    assert not torch.equal(sample(wide, resize_mode="stretch"), old_workflow)
    with pytest.raises(ValueError, match="resize_mode: expected one of crop, stretch, pad"):
        run_node("SD35ControlNetApply", image=wide, **common, resize_mode="fill")


def test_cache_threshold_is_an_optional_input_that_reaches_the_request(run_node, parts, caplog):
    import logging

    from comfyui_sd35.sd35_core.sampling import pipeline
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest

    model, _, pos, neg = parts
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    kw = dict(model=model, positive=pos, negative=neg, latent=latent)
    (old_workflow,) = run_node("SD35Sampler", **kw, **sampler_inputs(steps=10))  # no cache_threshold input
    (off,) = run_node("SD35Sampler", **kw, **sampler_inputs(steps=10), cache_threshold=0.0)
    assert torch.equal(off["samples"], old_workflow["samples"])
    with caplog.at_level(logging.INFO):
        (cached,) = run_node("SD35Sampler", **kw, **sampler_inputs(steps=10), cache_threshold=0.6)
    request = SampleRequest(steps=10, cfg=4.0, sampler="euler", shift=3.0, seed=7, skip_uncond_at_cfg1=True,
                            cache_threshold=0.6)
    expected = pipeline.txt2img(model.mmdit, entries(pos), entries(neg), request, width=SIZE, height=SIZE)
    assert torch.equal(cached["samples"], expected)
    assert any("model evaluations saved" in r.getMessage() for r in caplog.records)


def _copy_with_a_nan(src: str, dst) -> str:
    """``src`` with one value of a joint block's MLP set to NaN, as a broken merge leaves a checkpoint."""
    from safetensors.torch import load_file, save_file

    state = load_file(src)
    state["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"][0, 0] = float("nan")
    save_file(state, str(dst))
    return str(dst)


def test_nan_weights_are_a_sampler_error_naming_the_step(run_node, parts, tiny_models, tmp_path):
    from comfyui_sd35.sd35_core.models.numerics import NonFiniteError

    _, vae, pos, neg = parts
    damaged = _copy_with_a_nan(tiny_models.checkpoints["sd3.5_large"], tmp_path / "damaged.safetensors")
    model = run_node("SD35CheckpointLoader", ckpt_name=damaged, weight_dtype="default")[0]
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 holds NaN .*weights float32.*bf16 or fp32"):
        run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    # A NaN latent from elsewhere (a sampler without this check) is refused by the decoder, not saved as black.
    nan_latent = {"samples": torch.full((1, 16, 4, 4), float("nan"))}
    with pytest.raises(NonFiniteError, match=r"VAE decode: the latent to decode holds NaN \(256 of 256 values\)"):
        run_node("SD35VAEDecode", samples=nan_latent, vae=vae)
