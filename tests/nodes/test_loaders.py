"""Loader nodes on tiny checkpoints: what they return, their cache, and their errors."""

import os
import shutil

import pytest
import torch


@pytest.fixture
def fresh_caches(node_classes):
    """Empty every loader cache before and after a test, so tests do not see each other's loads."""
    loaders = [node_classes[n] for n in ("SD35CheckpointLoader", "SD35TextEncoderLoader", "SD35VAELoader",
                                         "SD35ControlNetLoader")]
    for cls in loaders:
        cls._cache.clear()
    yield
    for cls in loaders:
        cls._cache.clear()


def test_checkpoint_with_vae_gives_model_and_vae_but_no_clip(run_node, fresh_caches):
    from comfyui_sd35.nodes.objects import SD35VAE, SD35Model

    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_medium.safetensors",
                                weight_dtype="default")
    assert isinstance(model, SD35Model) and model.variant == "sd3.5_medium"
    assert model.mmdit.compute_dtype == torch.float32  # default on the CPU
    assert clip is None
    assert isinstance(vae, SD35VAE)


def test_the_compile_option_gives_a_separately_cached_model_with_compiled_blocks(run_node, fresh_caches):
    plain, _, _ = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_medium.safetensors", weight_dtype="default")
    compiled, _, _ = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_medium.safetensors",
                              weight_dtype="default", compile=True)
    assert compiled.mmdit is not plain.mmdit
    assert getattr(compiled.mmdit, "is_compiled", False) and not getattr(plain.mmdit, "is_compiled", False)
    # The compiled blocks wrap, not replace, the eager ones: same weights, same module names.
    assert compiled.mmdit.state_dict().keys() == plain.mmdit.state_dict().keys()


def test_bare_diffusion_model_from_diffusion_models_folder(run_node, fresh_caches):
    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_medium-bare.safetensors",
                                weight_dtype="bf16")
    assert model.variant == "sd3.5_medium" and clip is None and vae is None
    assert model.mmdit.compute_dtype == torch.bfloat16


def test_checkpoint_bundling_text_encoders_gives_clip(run_node, tiny_models, fresh_caches, tmp_path, monkeypatch):
    from comfyui_sd35.nodes.objects import SD35Clip

    from sd35_core.loading.tiny import write_checkpoint

    path = write_checkpoint(tmp_path / "with_te.safetensors", "sd3_medium", text_encoders=True)
    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name=str(path), weight_dtype="default")
    assert model.variant == "sd3_medium" and isinstance(clip, SD35Clip) and clip.t5 is not None
    (cond,) = run_node("SD35TextEncode", clip=clip, text="a red fox")
    assert cond[0][0].shape[-1] == model.config.context_dim


def test_loader_cache_returns_the_same_objects_and_notices_a_replaced_file(run_node, tiny_models, fresh_caches,
                                                                        node_classes):
    cls = node_classes["SD35CheckpointLoader"]
    first = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="default")
    hits = cls._cache.hits
    again = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="default")
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert cls._cache.hits == hits + 1
    token = cls.IS_CHANGED(ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="default")

    path = tiny_models.checkpoints["sd3.5_large"]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cls.IS_CHANGED(ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="default") != token
        reloaded = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="default")
        assert reloaded[0] is not first[0]
        assert len(cls._cache) == 1  # the stale entry was dropped
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_other_loaders_cache_too(run_node, fresh_caches, node_classes):
    a = run_node("SD35VAELoader", vae_name="tiny-sd3_vae.safetensors")[0]
    assert run_node("SD35VAELoader", vae_name="tiny-sd3_vae.safetensors")[0] is a
    kw = dict(clip_l_name="clip_l.safetensors", clip_g_name="clip_g.safetensors", t5xxl_name="none", device="default")
    c = run_node("SD35TextEncoderLoader", **kw)[0]
    assert run_node("SD35TextEncoderLoader", **kw)[0] is c and c.t5 is None
    model = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="default")[0]
    depth_file = "tiny-sd3.5_large_controlnet_depth.safetensors"
    cn = run_node("SD35ControlNetLoader", model=model, control_net_name=depth_file)[0]
    assert cn.control_type == "depth"
    assert run_node("SD35ControlNetLoader", model=model,
                    control_net_name="tiny-sd3.5_large_controlnet_depth.safetensors")[0] is cn
    # ComfyUI calls IS_CHANGED with the constant inputs only (never the linked model).
    cls = node_classes["SD35ControlNetLoader"]
    assert cls.IS_CHANGED(control_net_name="tiny-sd3.5_large_controlnet_depth.safetensors", weight_dtype="default")
    assert node_classes["SD35TextEncoderLoader"].IS_CHANGED(clip_l_name="clip_l.safetensors",
                                                            clip_g_name="clip_g.safetensors", t5xxl_name="none",
                                                            device="cpu")


def test_corrupt_checkpoint_raises_the_core_error_naming_the_file(run_node, tiny_models, fresh_caches):
    from comfyui_sd35.sd35_core.loading.checkpoint import CheckpointError

    from sd35_core.errors import CheckpointError as TopLevelCheckpointError

    bad = os.path.join(tiny_models.root, "checkpoints", "corrupt.safetensors")
    shutil.copy(tiny_models.checkpoints["sd3.5_medium"], bad)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    try:
        with pytest.raises(CheckpointError, match="corrupt.safetensors.*truncated"):
            run_node("SD35CheckpointLoader", ckpt_name="corrupt.safetensors", weight_dtype="default")
    finally:
        os.remove(bad)
    assert TopLevelCheckpointError is not CheckpointError  # the pack uses its own copy of the core


def test_a_vae_file_is_not_a_checkpoint(run_node, tiny_models, fresh_caches):
    with pytest.raises(ValueError, match="expected an SD3/SD3.5 checkpoint.*a VAE"):
        run_node("SD35CheckpointLoader", ckpt_name=tiny_models.vae, weight_dtype="default")


def test_missing_file_names_the_folders_searched(run_node, fresh_caches):
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*checkpoints/diffusion_models"):
        run_node("SD35CheckpointLoader", ckpt_name="nope.safetensors", weight_dtype="default")


def test_native_comfyui_objects_are_refused_with_a_clear_error(run_node):
    with pytest.raises(ValueError, match="expects the output of an SD3.5 loader"):
        run_node("SD35ControlNetLoader", model=object(), control_net_name="x.safetensors")


def test_gguf_diffusion_models_are_listed_and_load_with_their_weights_quantized(run_node, node_classes, fresh_caches,
                                                                               tmp_path, monkeypatch):
    from comfyui_sd35.nodes.loaders import bundled_files

    from bench.gguf_write import write_gguf
    from sd35_core.loading.tiny import tiny_mmdit

    state = tiny_mmdit("sd3.5_large").state_dict()
    write_gguf(tmp_path / "diffusion_models" / "sd35" / "tiny-Q8_0.gguf", state, "Q8_0")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a model")
    monkeypatch.setenv("SD35_MODELS_DIR", str(tmp_path))
    names = node_classes["SD35CheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    # The folder's model files first (the .gguf among them, the .txt not), then the pack's bundled ones.
    assert names == [os.path.join("sd35", "tiny-Q8_0.gguf"), *bundled_files("checkpoint")]
    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name=names[0], weight_dtype="default")
    assert model.variant == "sd3.5_large" and clip is None and vae is None
    qkv = model.mmdit.joint_blocks[0].x_block.attn.qkv
    assert qkv.weight.dtype == torch.uint8 and qkv.weight_quant.qtype.name == "Q8_0"
    assert model.mmdit.compute_dtype == torch.float32  # default on the CPU: dequantized into fp32


def test_text_encoder_slots_default_to_the_file_named_for_their_role(node_classes, models_env):
    # The folder lists clip_g.safetensors first; ComfyUI would put it in every slot without a default.
    required = node_classes["SD35TextEncoderLoader"].INPUT_TYPES()["required"]
    assert required["clip_l_name"][0][0] == "clip_g.safetensors"
    assert required["clip_l_name"][1]["default"] == "clip_l.safetensors"
    assert required["clip_g_name"][1]["default"] == "clip_g.safetensors"
    assert required["t5xxl_name"][1]["default"] == "t5xxl_fp16.safetensors"


def test_a_text_encoder_in_the_wrong_slot_is_refused_by_the_loader_node(run_node, fresh_caches):
    from comfyui_sd35.sd35_core.loading.text_roles import TextEncoderRoleError

    with pytest.raises(TextEncoderRoleError, match=r"clip_g\.safetensors: this file is CLIP-G .*the clip_l slot "
                                                    r"needs CLIP-L \(clip_l\.safetensors\)"):
        run_node("SD35TextEncoderLoader", clip_l_name="clip_g.safetensors", clip_g_name="clip_g.safetensors",
                 t5xxl_name="t5xxl_fp16.safetensors")


def test_the_bundled_tiny_shapes_files_are_listed_loaded_and_encode_with_their_own_tokenizers(
        run_node, fresh_caches, node_classes):
    from comfyui_sd35.sd35_train.bundled import tiny_shapes_checkpoint

    ckpt_names = node_classes["SD35CheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    cn_names = node_classes["SD35ControlNetLoader"].INPUT_TYPES()["required"]["control_net_name"][0]
    assert "tiny_shapes_sd35.safetensors" in ckpt_names
    assert "tiny_shapes_controlnet_canny.safetensors" in cn_names
    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name="tiny_shapes_sd35.safetensors",
                                weight_dtype="default")
    assert clip is not None and vae is not None and clip.source == tiny_shapes_checkpoint()
    (cond,) = run_node("SD35TextEncode", clip=clip, text="a red circle on the left of a blue background")
    assert cond[0][0].shape[-1] == model.config.context_dim
    (cn,) = run_node("SD35ControlNetLoader", model=model, control_net_name="tiny_shapes_controlnet_canny.safetensors")
    assert cn.controlnet.control_type_name == "canny"
