"""Text encoder files are recognised by their weights and refused at load time in a slot that wants another kind."""

import pytest
import torch
from safetensors.torch import save_file

from sd35_core.loading import loader, tiny
from sd35_core.loading.checkpoint import open_safetensors
from sd35_core.loading.text_roles import TextEncoderRoleError, check_text_encoder_files, identify, role_default


def _released_width_clip_header(path, width: int, projection: bool) -> str:
    """A CLIP file with a released width (768 or 1280) but a 16-token vocabulary and one small layer: only its
    header is read, since the role check runs before any weight is loaded."""
    state = {
        "text_model.embeddings.token_embedding.weight": torch.zeros(16, width, dtype=torch.float16),
        "text_model.embeddings.position_embedding.weight": torch.zeros(77, width, dtype=torch.float16),
        "text_model.encoder.layers.0.layer_norm1.weight": torch.ones(width, dtype=torch.float16),
        "text_model.final_layer_norm.weight": torch.ones(width, dtype=torch.float16),
    }
    if projection:
        state["text_projection.weight"] = torch.zeros(8, width, dtype=torch.float16)
    save_file(state, str(path))
    return str(path)


def test_each_released_file_layout_is_recognised(tiny_models):
    files = tiny_models.text_encoders
    ident = {role: identify(open_safetensors(files[role])) for role in ("clip_l", "clip_g", "t5xxl")}
    assert ident["clip_l"].family == "clip" and not ident["clip_l"].projection
    assert ident["clip_l"].width == tiny.clip_config("clip_l").hidden_size
    assert ident["clip_g"].family == "clip" and ident["clip_g"].projection
    assert ident["t5xxl"].family == "t5" and ident["t5xxl"].width == tiny.t5_config().d_model


def test_files_in_their_own_slots_pass(tiny_models):
    check_text_encoder_files(dict(tiny_models.text_encoders))
    te = loader.load_text_encoders(dict(tiny_models.text_encoders))
    assert te.clip_l.config == tiny.clip_config("clip_l") and te.t5 is not None


def test_clip_l_in_the_clip_g_slot_is_named_as_clip_l(tiny_models):
    files = tiny_models.text_encoders
    with pytest.raises(TextEncoderRoleError, match=r"clip_l\.safetensors: this file is CLIP-L \(width 64, 2 layers, "
                                                    r"no text_projection\), and CLIP-G's pooled output needs one; "
                                                    r"the clip_g slot needs CLIP-G "
                                                    r"\(clip_g\.safetensors\)"):
        loader.load_text_encoder(files["clip_l"], "clip_g")


def test_clip_g_in_both_clip_slots_is_named_as_clip_g_for_the_clip_l_slot(tiny_models):
    files = tiny_models.text_encoders
    with pytest.raises(TextEncoderRoleError, match=r"clip_g\.safetensors: this file is CLIP-G \(.*\), the same "
                                                    r"file as in the clip_g slot; the clip_l slot needs CLIP-L "
                                                    r"\(clip_l\.safetensors\)"):
        loader.load_text_encoders({"clip_l": files["clip_g"], "clip_g": files["clip_g"]})


def test_a_wider_clip_in_the_clip_l_slot_is_refused_even_when_its_width_is_not_a_released_one(tiny_models, tmp_path):
    import shutil

    other_g = shutil.copy(tiny_models.text_encoders["clip_g"], tmp_path / "another_clip.safetensors")
    expected = r"another_clip\.safetensors: this file is CLIP-G \(.*\), not narrower than the clip_g slot's "
    with pytest.raises(TextEncoderRoleError, match=expected + r"clip_g\.safetensors \(width 128\)"):
        check_text_encoder_files({"clip_l": str(other_g), "clip_g": tiny_models.text_encoders["clip_g"]})


def test_swapped_clip_files_are_refused_at_the_clip_g_slot(tiny_models):
    files = tiny_models.text_encoders
    with pytest.raises(TextEncoderRoleError, match=r"clip_l\.safetensors: this file is CLIP-L.*clip_g slot needs"):
        check_text_encoder_files({"clip_l": files["clip_g"], "clip_g": files["clip_l"]})


@pytest.mark.parametrize("role", ["clip_l", "clip_g"])
def test_t5_in_a_clip_slot_is_named_as_t5(tiny_models, role):
    label = {"clip_l": "CLIP-L", "clip_g": "CLIP-G"}[role]
    with pytest.raises(TextEncoderRoleError, match=rf"t5xxl_fp16\.safetensors: this file is T5-XXL \(a T5 encoder, "
                                                    rf"width 256, 2 blocks\); the {role} slot needs {label} "
                                                    rf"\({role}\.safetensors\)"):
        loader.load_text_encoder(tiny_models.text_encoders["t5xxl"], role)


def test_a_clip_in_the_t5_slot_is_named_as_that_clip(tiny_models):
    with pytest.raises(TextEncoderRoleError, match=r"clip_l\.safetensors: this file is CLIP-L .*the t5xxl slot needs "
                                                    r"T5-XXL \(t5xxl_fp16\.safetensors or t5xxl_fp8_e4m3fn"):
        loader.load_text_encoder(tiny_models.text_encoders["clip_l"], "t5xxl")


def test_released_widths_tell_clip_l_from_clip_g_on_their_own(tmp_path):
    wide = _released_width_clip_header(tmp_path / "big.safetensors", 1280, projection=True)
    with pytest.raises(TextEncoderRoleError, match=r"big\.safetensors: this file is CLIP-G \(width 1280, 1 layers, "
                                                    r"with text_projection\), by the released CLIP-G's width; "
                                                    r"the clip_l slot needs CLIP-L \(clip_l\.safetensors\)"):
        loader.load_text_encoder(wide, "clip_l")
    # CLIP-L files sometimes carry a projection; the width still says what it is.
    narrow = _released_width_clip_header(tmp_path / "small.safetensors", 768, projection=True)
    with pytest.raises(TextEncoderRoleError, match=r"small\.safetensors: this file is CLIP-L \(width 768.*the clip_g "
                                                    r"slot needs CLIP-G"):
        loader.load_text_encoder(narrow, "clip_g")


def test_a_checkpoint_bundling_the_text_encoders_serves_every_slot(tmp_path):
    path = str(tiny.write_checkpoint(tmp_path / "with_te.safetensors", "sd3_medium", text_encoders=True))
    te = loader.load_text_encoders({"clip_l": path, "clip_g": path, "t5xxl": path})
    assert te.clip_l.config == tiny.clip_config("clip_l") and te.clip_g.config == tiny.clip_config("clip_g")


def test_slot_defaults_are_the_files_named_for_each_role():
    names = ["clip_g.safetensors", "clip_l.safetensors", "sub/t5xxl_fp8_e4m3fn.safetensors"]
    assert role_default(names, "clip_l") == "clip_l.safetensors"
    assert role_default(names, "clip_g") == "clip_g.safetensors"
    assert role_default(names, "t5xxl") == "sub/t5xxl_fp8_e4m3fn.safetensors"
    assert role_default(["clip_g.safetensors"], "t5xxl") is None
