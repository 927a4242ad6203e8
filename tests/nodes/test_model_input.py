"""What the model and VAE sockets take outside ComfyUI: the pack's own objects only (native ComfyUI objects are
tested in tests/host/test_bridge_host.py)."""

import pytest
import torch


@pytest.fixture
def model_input(pack):
    from comfyui_sd35.nodes import model_input

    return model_input


def test_our_model_is_taken_as_it_is_and_loads_with_the_block_api(run_node, model_input):
    model, _, vae = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="fp32")
    assert model_input.diffusion_input(model, "node") is model
    assert model_input.default_shift(model) == 3.0
    assert model_input.compute_dtype(model) == torch.float32
    assert model_input.load_for_sampling(model, [], 0) is model.mmdit
    assert model_input.vae_input(vae, "node") is vae
    pixels = torch.zeros(1, 3, 16, 16)
    assert torch.equal(model_input.encode_pixels(vae, pixels), vae.vae.encode(pixels))


@pytest.mark.parametrize("check, socket", [("diffusion_input", "model"), ("vae_input", "vae")])
def test_anything_else_is_refused_naming_the_node_and_socket(model_input, check, socket):
    with pytest.raises(ValueError, match=f"SD3.5 Thing: the {socket} input got a dict"):
        getattr(model_input, check)({}, "SD3.5 Thing")


def test_the_sockets_take_both_kinds_in_comfyuis_union_syntax(node_classes, model_input):
    assert model_input.MODEL_TYPES == "SD35_MODEL,MODEL" and model_input.VAE_TYPES == "SD35_VAE,VAE"
    assert node_classes["SD35Sampler"].INPUT_TYPES()["required"]["model"][0] == model_input.MODEL_TYPES
    assert node_classes["SD35ControlNetLoader"].INPUT_TYPES()["required"]["model"][0] == model_input.MODEL_TYPES
    assert node_classes["SD35ControlNetApply"].INPUT_TYPES()["required"]["vae"][0] == model_input.VAE_TYPES
