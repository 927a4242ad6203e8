"""The bridge nodes outside ComfyUI (inside it: tests/host/test_bridge_host.py)."""

import pytest


def test_bridge_node_says_a_comfyui_model_needs_comfyui(run_node):
    model, _, _ = run_node("SD35CheckpointLoader", ckpt_name="tiny-sd3.5_large.safetensors", weight_dtype="fp32")
    with pytest.raises(ValueError, match="only inside ComfyUI"):
        run_node("SD35ToComfyModel", model=model, shift=0.0)


def test_bridge_node_refuses_what_is_not_an_sd35_model(run_node):
    with pytest.raises(ValueError, match="expects the output of an SD3.5 loader"):
        run_node("SD35ToComfyModel", model=object(), shift=0.0)


def test_vae_bridge_node_says_a_comfyui_vae_needs_comfyui(run_node):
    (vae,) = run_node("SD35VAELoader", vae_name="tiny-sd3_vae.safetensors")
    with pytest.raises(ValueError, match="only inside ComfyUI"):
        run_node("SD35ToComfyVAE", vae=vae)
