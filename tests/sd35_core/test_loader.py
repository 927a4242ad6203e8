"""Loading checkpoints: every official layout is found by key names and configured from tensor shapes."""

import pytest
import torch
from safetensors.torch import save_file

from sd35_core.errors import CheckpointError
from sd35_core.loading import loader, tiny
from sd35_core.models.clip import CLIPTextModel
from sd35_core.models.t5 import T5Encoder


def _inputs(config, batch=1, size=8, tokens=5):
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 16, size, size, generator=gen),
        torch.full((batch,), 700.0),
        torch.randn(batch, tokens, config.context_dim, generator=gen),
        torch.randn(batch, config.pooled_dim, generator=gen),
    )


@pytest.mark.parametrize("variant", tiny.VARIANTS)
def test_single_file_checkpoints_load_the_model_and_vae_and_detect_the_variant(tiny_models, variant):
    parts = loader.load_checkpoint(tiny_models.checkpoints[variant], dtype="fp32")
    assert parts.model.variant == variant
    assert parts.model.config == tiny.mmdit_config(variant)
    assert parts.vae is not None and parts.text_encoders is None
    reference = tiny.tiny_mmdit(variant, seed=0).requires_grad_(False)
    args = _inputs(parts.model.config)
    out, expected = parts.model.mmdit(*args), reference(*args)
    # Same weights; only BLAS kernel choice on memory-mapped storage may differ in the last bits.
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_large_is_reported_as_large_or_turbo_unless_metadata_says_turbo(tmp_path):
    plain = tiny.write_checkpoint(tmp_path / "a.safetensors", "sd3.5_large", vae=False)
    turbo = tiny.write_checkpoint(tmp_path / "b.safetensors", "sd3.5_large", vae=False,
                                  metadata={"modelspec.title": "Stable Diffusion 3.5 Large Turbo"})
    assert loader.load_checkpoint(plain).model.label == "SD3.5 Large or Large Turbo"
    assert loader.load_checkpoint(turbo).model.variant == "sd3.5_large_turbo"


def test_a_checkpoint_carries_its_latent_preview_map_in_the_packs_metadata(tmp_path):
    import json

    from sd35_core.models.latent import PACK_METADATA_KEY, SD3_PREVIEW, LatentPreview

    own = LatentPreview(tuple((0.1, 0.0, -0.1) for _ in range(16)), (0.0, 0.5, 0.0))
    with_map = tiny.write_checkpoint(tmp_path / "a.safetensors", vae=False,
                                     metadata={PACK_METADATA_KEY: json.dumps({"latent_preview": own.to_json()})})
    assert loader.load_checkpoint(with_map).model.preview == own
    plain = tiny.write_checkpoint(tmp_path / "b.safetensors", vae=False)
    assert loader.load_checkpoint(plain).model.preview == SD3_PREVIEW
    broken = tiny.write_checkpoint(tmp_path / "c.safetensors", vae=False,
                                   metadata={PACK_METADATA_KEY: json.dumps({"latent_preview": {"factors": [[1]]}})})
    with pytest.raises(CheckpointError, match=r"c\.safetensors: metadata 'sd35' field 'latent_preview'"):
        loader.load_checkpoint(broken)


def test_a_bare_diffusion_model_loads_without_vae(tiny_models):
    parts = loader.load_checkpoint(tiny_models.diffusion_model)
    assert parts.model.variant == "sd3.5_medium" and parts.vae is None


def test_checkpoints_bundling_text_encoders_load_all_three(tmp_path):
    path = tiny.write_checkpoint(tmp_path / "incl_clips_t5.safetensors", "sd3_medium", text_encoders=True)
    parts = loader.load_checkpoint(path)
    te = parts.text_encoders
    assert isinstance(te.clip_l, CLIPTextModel) and isinstance(te.t5, T5Encoder)
    assert te.clip_l.config == tiny.clip_config("clip_l") and te.clip_g.config == tiny.clip_config("clip_g")
    assert te.t5.config == tiny.t5_config()


@pytest.mark.parametrize("role", ["clip_l", "clip_g", "t5xxl"])
def test_hf_layout_text_encoder_files_load_in_their_role(tiny_models, role):
    model = loader.load_text_encoder(tiny_models.text_encoders[role], role, dtype="fp32")
    expected = {"clip_l": tiny.clip_config("clip_l"), "clip_g": tiny.clip_config("clip_g"), "t5xxl": tiny.t5_config()}
    assert model.config == expected[role]


def test_t5_files_with_only_encoder_embed_tokens_load_too(tmp_path):
    state = tiny.tiny_t5(seed=4).state_dict()
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    path = tiny.save_state(tmp_path / "t5.safetensors", {"": state})
    t5 = loader.load_text_encoder(path, "t5xxl")
    assert torch.equal(t5.shared.weight, state["encoder.embed_tokens.weight"])


@pytest.mark.parametrize("dtype,storage", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                           ("fp8_e4m3fn", torch.float8_e4m3fn)])
def test_weights_load_in_the_requested_storage_dtype_and_still_run(tiny_models, dtype, storage):
    parts = loader.load_checkpoint(tiny_models.checkpoints["sd3.5_large"], dtype=dtype)
    mmdit = parts.model.mmdit
    assert mmdit.joint_blocks[0].x_block.attn.qkv.weight.dtype == storage
    out = mmdit(*_inputs(parts.model.config))
    ref = tiny.tiny_mmdit("sd3.5_large").requires_grad_(False)(*_inputs(parts.model.config))
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.25 * ref.abs().max()


def test_the_vae_loads_from_a_checkpoint_or_its_own_file(tiny_models):
    a = loader.load_vae(tiny_models.checkpoints["sd3.5_medium"])
    b = loader.load_vae(tiny_models.vae)
    assert a.config == b.config == tiny.vae_config()


def test_a_controlnet_release_file_loads_with_its_control_type(tiny_models):
    model = loader.load_checkpoint(tiny_models.checkpoints["sd3.5_large"]).model
    cn = loader.load_controlnet(tiny_models.controlnets["depth"], model)
    assert cn.control_type_name == "depth"


# ---- bad input: each a CheckpointError naming the file and what was expected ----


def test_a_checkpoint_in_the_controlnet_slot_is_called_a_checkpoint(tiny_models):
    model = loader.load_checkpoint(tiny_models.checkpoints["sd3.5_large"]).model
    with pytest.raises(CheckpointError, match=r"an SD3/SD3\.5 checkpoint \(diffusion model, VAE\)") as info:
        loader.load_controlnet(tiny_models.checkpoints["sd3.5_large"], model)
    assert "a VAE" not in str(info.value)


def test_an_sdxl_layout_file_is_named_as_a_unet_checkpoint(tmp_path):
    path = str(tmp_path / "sd_xl_base_1.0.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"sd_xl_base_1\.0\.safetensors: expected an SD3/SD3\.5.*UNet"):
        loader.load_checkpoint(path)


def test_a_text_encoder_in_the_diffusion_model_slot_is_named_as_such(tiny_models):
    with pytest.raises(CheckpointError, match=r"clip_g\.safetensors: expected an SD3/SD3\.5.*CLIP text encoder"):
        loader.load_checkpoint(tiny_models.text_encoders["clip_g"])


def test_a_truncated_checkpoint_is_reported_before_loading(tiny_models, tmp_path):
    data = open(tiny_models.checkpoints["sd3_medium"], "rb").read()
    cut = tmp_path / "sd3_medium.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"sd3_medium\.safetensors.*truncated"):
        loader.load_checkpoint(cut)


def test_a_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04 zip pickle")
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*pickle"):
        loader.load_checkpoint(path)


def test_a_diffusion_model_is_not_accepted_as_a_text_encoder(tiny_models):
    with pytest.raises(CheckpointError, match=r"expected a T5 text encoder"):
        loader.load_text_encoder(tiny_models.diffusion_model, "t5xxl")
    with pytest.raises(CheckpointError, match=r"expected a CLIP text encoder for clip_l"):
        loader.load_text_encoder(tiny_models.diffusion_model, "clip_l")


def test_a_file_without_a_vae_is_refused_as_vae(tiny_models):
    with pytest.raises(CheckpointError, match=r"expected a VAE.*T5 text encoder"):
        loader.load_vae(tiny_models.text_encoders["t5xxl"])


def test_a_controlnet_for_another_width_is_refused_naming_both(tiny_models, tmp_path):
    model = loader.load_checkpoint(tiny_models.checkpoints["sd3.5_large"]).model
    wide = tiny.mmdit_config("sd3.5_large", hidden=192)
    from sd35_core.models.mmditx import MMDiTX

    other = loader.DiffusionModel(MMDiTX(wide, device="meta"), wide, "sd3.5_large", "x", model.policy)
    with pytest.raises(CheckpointError, match=r"controlnet_canny\.safetensors.*hidden width 128.*hidden width 192"):
        loader.load_controlnet(tiny_models.controlnets["canny"], other)


@pytest.mark.parametrize(("variant", "trait"), [("sd3.5_medium", r"a second self-attention in joint blocks 0\.\.4"),
                                                ("sd3_medium", "no qk-norm")])
def test_a_large_controlnet_on_a_model_of_the_same_width_but_another_structure_is_refused(tiny_models, variant,
                                                                                          trait):
    # The tiny Medium and SD3 Medium share the Large ControlNet's widths; only their structure tells them apart.
    model = loader.load_checkpoint(tiny_models.checkpoints[variant]).model
    large = loader.load_checkpoint(tiny_models.checkpoints["sd3.5_large"]).model
    assert (model.config.hidden_size, model.config.pooled_dim) == (large.config.hidden_size, large.config.pooled_dim)
    with pytest.raises(CheckpointError, match=rf"controlnet_depth\.safetensors: this is an SD3\.5 Large \(8b\) "
                                              rf"ControlNet.*-shaped \({trait}\).*SD3\.5 Large or Large Turbo"):
        loader.load_controlnet(tiny_models.controlnets["depth"], model)


def test_a_non_controlnet_file_is_refused_as_controlnet(tiny_models):
    model = loader.load_checkpoint(tiny_models.checkpoints["sd3.5_large"]).model
    with pytest.raises(CheckpointError, match=r"expected an SD3\.5 ControlNet.*VAE"):
        loader.load_controlnet(tiny_models.vae, model)
