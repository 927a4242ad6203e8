"""The IP-Adapter in a real ComfyUI server: the shipped sd3.5_large_ip_adapter workflow runs (its files under the
names it gives, the tiny model set behind them, only the size and steps the tiny model can draw changed), and the
adapter carried through SD3.5 Model to ComfyUI MODEL into KSampler equals SD3.5 Sampler, with CFG batches, a
window, and ComfyUI's own SkipLayerGuidanceSD3 (whose skip pass must get the cond's tokens).

Needs ``COMFYUI_PATH`` (skipped, visibly, without it). Latents are compared as saved by ComfyUI's SaveLatent.
"""

import os
import shutil

import pytest

from .comfyui_server import COMFYUI_PATH, SHARED, start_server
from .graphs import assert_success, shipped_api_workflow
from .test_bridge_host import SETTINGS, Graph, assert_close, ksampler, our_sampler, run, save, text_nodes

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the real-ComfyUI host tests need a ComfyUI checkout"
)
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")

LARGE = "tiny-sd3.5_large.safetensors"  # 4 joint blocks, width 128: what the tiny adapter fits
WORKFLOW = "sd3.5_large_ip_adapter"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI with the tiny model set, a tiny adapter and vision tower under the shipped workflow's names, and
    the style picture the workflow names in its input folder."""
    from PIL import Image

    from sd35_core.loading.tiny import write_tiny_model_set
    from sd35_core.loading.tiny_ip_adapter import write_ip_adapter, write_siglip

    models = write_tiny_model_set(tmp_path_factory.mktemp("comfy_models"), seed=0)
    write_ip_adapter(os.path.join(models.root, "ipadapter", "ip-adapter.bin"))
    write_siglip(os.path.join(models.root, "clip_vision", "sigclip_vision_patch14_384.safetensors"))
    shutil.copy(models.checkpoints["sd3.5_large"], os.path.join(models.root, "checkpoints", "sd3.5_large.safetensors"))
    base = tmp_path_factory.mktemp("comfy_base")
    os.makedirs(base / "input")
    picture = Image.open(os.path.join(SHARED, "images", "canny.png")).convert("RGB").resize((96, 64))
    picture.save(base / "input" / "example.png")
    srv = start_server(base, models)
    try:
        yield srv
    finally:
        srv.close()


def test_the_shipped_workflow_runs(server):
    workflow = shipped_api_workflow(WORKFLOW)
    by_type = {n["class_type"]: n for n in workflow.values()}
    assert by_type["SD35ApplyIPAdapter"]["inputs"]["weight"] == 0.5
    assert by_type["SD35IPAdapterLoader"]["inputs"]["ipadapter_name"] == "ip-adapter.bin"
    # the tiny model's position grid covers 512 px, and CPU time is short: a small picture in a few steps
    by_type["SD35EmptyLatent"]["inputs"].update(width=64, height=48)
    by_type["SD35Sampler"]["inputs"]["steps"] = 3
    result = server.run(workflow)
    assert_success(result, server)
    (image,) = server.images(result["prompt_id"])
    assert image.shape == (48, 64, 3)
    assert "Requested to load SD35SiglipVision" in server.log()  # the tower went through ComfyUI's management


def _ip_model(g: Graph, weight: float = 0.7, end: float = 1.0):
    loader = g.add("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="fp32")
    adapter = g.add("SD35IPAdapterLoader", ipadapter_name="ip-adapter.bin", weight_dtype="fp32")
    vision = g.add("SD35CLIPVisionLoader", clip_name="sigclip_vision_patch14_384.safetensors", weight_dtype="fp32")
    picture = g.add("LoadImage", image="example.png")
    model = [g.add("SD35ApplyIPAdapter", model=[loader, 0], ip_adapter=[adapter, 0], clip_vision=[vision, 0],
                   image=[picture, 0], weight=weight, start_percent=0.0, end_percent=end), 0]
    return [loader, 0], model


def test_the_bridge_into_ksampler_equals_our_sampler(server):
    g = Graph()
    plain, model = _ip_model(g)
    _, windowed = _ip_model(g, weight=0.9, end=0.5)
    pos, neg = text_nodes(g)
    latent = [g.add("SD35EmptyLatent", width=SETTINGS["width"], height=SETTINGS["height"], batch_size=2), 0]
    for name, m in (("full", model), ("window", windowed)):
        bridged = [g.add("SD35ToComfyModel", model=m, shift=0.0), 0]
        for sampler in ("euler", "dpmpp_2m"):
            save(g, ksampler(g, bridged, pos, neg, latent, sampler), f"ks_{name}_{sampler}")
            save(g, our_sampler(g, m, pos, neg, latent, sampler), f"ours_{name}_{sampler}")
    save(g, our_sampler(g, plain, pos, neg, latent), "no_ip")
    out = run(server, g)
    for name in ("full", "window"):
        for sampler in ("euler", "dpmpp_2m"):
            assert_close(out, f"ks_{name}_{sampler}", f"ours_{name}_{sampler}")
    assert (out["ours_full_euler"] - out["no_ip"]).abs().max() > 1e-2  # the adapter acted
    assert (out["ours_full_euler"] - out["ours_window_euler"]).abs().max() > 1e-3


def test_comfyuis_skip_layer_guidance_on_the_bridged_adapter_equals_ours(server):
    g = Graph()
    _, model = _ip_model(g)
    pos, neg = text_nodes(g)
    latent = [g.add("SD35EmptyLatent", width=SETTINGS["width"], height=SETTINGS["height"], batch_size=1), 0]
    bridged = [g.add("SD35ToComfyModel", model=model, shift=0.0), 0]
    slg = dict(scale=2.5, start=0.01, end=0.6)
    patched = [g.add("SkipLayerGuidanceSD3", model=bridged, layers="1, 2", scale=slg["scale"],
                     start_percent=slg["start"], end_percent=slg["end"]), 0]
    save(g, ksampler(g, patched, pos, neg, latent, "dpmpp_2m", steps=6), "ks_slg")
    save(g, our_sampler(g, model, pos, neg, latent, "dpmpp_2m", steps=6, slg_layers="1,2", slg_scale=slg["scale"],
                        slg_start=slg["start"], slg_end=slg["end"], slg_window="sigma"), "ours_slg")
    out = run(server, g)
    assert_close(out, "ks_slg", "ours_slg")
