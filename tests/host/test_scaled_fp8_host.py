"""A scaled-fp8 checkpoint (Comfy-Org's sd3.5_large_fp8_scaled layout) in a real ComfyUI: through SD3.5 Checkpoint
Loader, and through ComfyUI's own CheckpointLoaderSimple into SD3.5 Sampler, it gives the same latents and image.

The file is built by the rules ComfyUI reads it with (``comfy/ops.py`` scaled_fp8_ops: fp8 weight x float32
``scale_weight``, an optional ``scale_input``; ``comfy/model_detection.py``: the ``scaled_fp8`` marker under
``model.diffusion_model.``; a scaled layer is built in fp8 whole, so its bias is held in fp8 too), in the one
model shape ComfyUI's MMDiT can load (width 64 x blocks; see
bridge_models.py). Its plain twin (the same effective weights in float32) runs through our loader as a third
witness. ComfyUI's model computes with its own scaled-fp8 layers: its extra ``scale_weight`` tensors keep our
sampler from viewing its weights as our MMDiT-X, so the native passes run.

Needs ``COMFYUI_PATH`` (skipped, visibly, without it).
"""

import os

import pytest

from .bridge_models import COMFY_DEPTH, COMFY_WIDTH
from .comfyui_server import COMFYUI_PATH, start_server
from .test_bridge_host import Graph, our_sampler, save, saved, text_nodes

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the real-ComfyUI host tests need a ComfyUI checkout"
)
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")

SCALED = "comfy-sd3.5_large_fp8_scaled.safetensors"
PLAIN = "comfy-sd3.5_large_fp8_scaled-plain.safetensors"
PARITY = 1e-4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sd35_core.loading.tiny import (
        linear_weight_keys,
        save_state,
        scaled_fp8_state,
        tiny_mmdit,
        write_tiny_model_set,
    )

    models = write_tiny_model_set(tmp_path_factory.mktemp("comfy_models"), seed=0)
    mmdit = tiny_mmdit("sd3.5_large", 5, depth=COMFY_DEPTH, hidden=COMFY_WIDTH)
    scaled, plain = scaled_fp8_state(mmdit.state_dict(), linear_weight_keys(mmdit), input_scale_name="scale_input")
    prefix = "model.diffusion_model."
    save_state(os.path.join(models.root, "checkpoints", SCALED), {prefix: scaled})
    save_state(os.path.join(models.root, "checkpoints", PLAIN), {prefix: plain})
    srv = start_server(tmp_path_factory.mktemp("comfy_base"), models)
    try:
        yield srv
    finally:
        srv.close()


def test_a_scaled_fp8_checkpoint_gives_the_same_image_through_our_loader_and_comfyuis(server):
    g = Graph()
    native = [g.add("CheckpointLoaderSimple", ckpt_name=SCALED), 0]
    ours = [g.add("SD35CheckpointLoader", ckpt_name=SCALED, weight_dtype="fp32"), 0]
    plain = [g.add("SD35CheckpointLoader", ckpt_name=PLAIN, weight_dtype="fp32"), 0]
    vae = [g.add("SD35VAELoader", vae_name="tiny-sd3_vae.safetensors"), 0]
    pos, neg = text_nodes(g)
    latent = [g.add("SD35EmptyLatent", width=48, height=48, batch_size=1, model=ours), 0]
    for who, model in (("native", native), ("ours", ours), ("plain", plain)):
        samples = our_sampler(g, model, pos, neg, latent, "euler")
        save(g, samples, f"scaled_{who}")
        image = g.add("SD35VAEDecode", samples=samples, vae=vae)
        g.add("SaveImage", images=[image, 0], filename_prefix=f"scaled_{who}")
    result = server.run(g)
    assert result["error"] is None, f"{result['error']}\nlog:\n{server.log()[-3000:]}"
    latents = saved(server, result["prompt_id"])
    images = saved(server, result["prompt_id"], "images")
    for other in ("native", "plain"):
        diff = (latents["scaled_ours"] - latents[f"scaled_{other}"]).abs().max().item()
        print(f"scaled fp8 parity, ours vs {other}: latents {diff:.2e}")
        assert diff <= PARITY, (other, diff)
        pixels = abs(images["scaled_ours"].astype(int) - images[f"scaled_{other}"].astype(int)).max()
        print(f"scaled fp8 parity, ours vs {other}: image {pixels} levels of 255")
        assert pixels <= 1, (other, pixels)
    assert latents["scaled_ours"].abs().max() > 0.1  # a real picture's latent, not an empty one


def test_comfyuis_lora_on_our_bridged_scaled_model_is_refused_by_name(server):
    # ComfyUI's LoRA arithmetic would add the update to the stored fp8 values, whose scale our ops apply at compute
    # time: the result would not be the LoRA. SD3.5 LoRA Loader applies it correctly (test_scaled_fp8.py).
    import torch

    from sd35_core.loading.checkpoint import write_safetensors
    from sd35_core.loading.tiny import kohya_lora_tensors, tiny_mmdit

    mmdit = tiny_mmdit("sd3.5_large", 5, depth=COMFY_DEPTH, hidden=COMFY_WIDTH)
    tensors = kohya_lora_tensors(mmdit, "lora_unet_", 2, torch.Generator().manual_seed(1))
    write_safetensors(os.path.join(server.models.root, "loras", "scaled-lora.safetensors"), tensors)
    g = Graph()
    ours = [g.add("SD35CheckpointLoader", ckpt_name=SCALED, weight_dtype="fp32"), 0]
    bridged = [g.add("SD35ToComfyModel", model=ours, shift=0.0), 0]
    patched = [g.add("LoraLoaderModelOnly", model=bridged, lora_name="scaled-lora.safetensors",
                     strength_model=0.8), 0]
    pos, neg = text_nodes(g)
    latent = [g.add("SD35EmptyLatent", width=48, height=48, batch_size=1), 0]
    save(g, our_sampler(g, patched, pos, neg, latent, "euler"), "scaled_lora")
    result = server.run(g)
    error = result["error"]
    assert error is not None, result
    message = error["exception_message"]
    assert "scaled fp8" in message and "SD3.5 LoRA Loader" in message, message
