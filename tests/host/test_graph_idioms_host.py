"""ComfyUI's graph idioms in SD3.5 Sampler, in a real ComfyUI server, against KSampler on the same model.

Each test builds one graph in which KSampler samples the pack's model through SD3.5 Model to ComfyUI MODEL and
SD3.5 Sampler samples the same model with the same conditioning, and compares the saved latents (the issue's bar:
1e-4 max abs). Idioms: regional prompting with Conditioning (Set Area), (Set Area with Percentage) and a strength,
(Set Mask) in its "default" and "mask bounds" modes; ComfyUI's CFG patches on the MODEL (CFGZeroStar, APG,
RescaleCFG) and SkipLayerGuidanceSD3, whose post-CFG function calls back into ComfyUI's model; areas with the
pack's own skip-layer guidance against KSampler with SkipLayerGuidanceSD3. (What is refused, and how, is tested
without a server: tests/nodes/test_conditioning.py.)

Needs ``COMFYUI_PATH`` (skipped, visibly, without it). The figures are printed (``pytest -s``).
"""

import pytest

from .comfyui_server import COMFYUI_PATH
from .test_bridge_host import PARITY, Graph, assert_close, bridged, ksampler, our_sampler, run, save, text_nodes

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the real-ComfyUI host tests need a ComfyUI checkout"
)
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")

WIDTH, HEIGHT = 128, 96  # ConditioningSetArea's smallest area is 64 x 64 pixels


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sd35_core.loading.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("comfy_models"), seed=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    """A ComfyUI with this pack and the tiny model set."""
    from .comfyui_server import start_server

    srv = start_server(tmp_path_factory.mktemp("comfy_base"), models)
    try:
        yield srv
    finally:
        srv.close()


def setup(g: Graph):
    ours, model = bridged(g)
    pos, neg = text_nodes(g)
    latent = [g.add("SD35EmptyLatent", width=WIDTH, height=HEIGHT, batch_size=1), 0]
    return ours, model, pos, neg, latent


def prompt(g: Graph, text: str) -> list:
    clip = g.add("SD35TextEncoderLoader", clip_l_name="clip_l.safetensors", clip_g_name="clip_g.safetensors",
                 t5xxl_name="t5xxl_fp16.safetensors", device="default")
    return [g.add("SD35TextEncode", clip=[clip, 0], text=text), 0]


def combine(g: Graph, *conds) -> list:
    out = conds[0]
    for c in conds[1:]:
        out = [g.add("ConditioningCombine", conditioning_1=out, conditioning_2=c), 0]
    return out


def pair(g: Graph, model, ours, pos, neg, latent, name: str, sampler="euler", ks=None, **overrides) -> None:
    """KSampler on ``model`` (or ``ks``) and SD3.5 Sampler on ``ours``, saved as ``ks_<name>`` / ``ours_<name>``."""
    save(g, ksampler(g, ks or model, pos, neg, latent, sampler), f"ks_{name}")
    save(g, our_sampler(g, ours, pos, neg, latent, sampler, **overrides), f"ours_{name}")


def mask(g: Graph, x: int, y: int, w: int, h: int, feather: int = 0) -> list:
    """A MASK of the image's size: 1 in the ``w x h`` box at ``x, y`` (feathered inwards), 0 elsewhere."""
    canvas = [g.add("SolidMask", value=0.0, width=WIDTH, height=HEIGHT), 0]
    box = [g.add("SolidMask", value=1.0, width=w, height=h), 0]
    out = [g.add("MaskComposite", destination=canvas, source=box, x=x, y=y, operation="add"), 0]
    if feather:
        out = [g.add("FeatherMask", mask=out, left=feather, top=feather, right=feather, bottom=feather), 0]
    return out


# --------------------------------------------------------------------------------------- regional prompting

def test_area_conditioning_equals_ksampler(server):
    # The graph: Combine(Set Area("a red paper lantern", 64x64 at 64,0), "a misty pine forest"); plus a
    # 72-pixel-wide area (9 latent pixels: padded to the patch size as ComfyUI's MMDiT pads it).
    g = Graph()
    ours, model, _, neg, latent = setup(g)
    lantern = [g.add("ConditioningSetArea", conditioning=prompt(g, "a red paper lantern"), width=64, height=64, x=64,
                     y=0, strength=1.0), 0]
    boat = [g.add("ConditioningSetArea", conditioning=prompt(g, "a small boat"), width=72, height=64, x=8, y=32,
                  strength=1.0), 0]
    pos = combine(g, lantern, prompt(g, "a misty pine forest"))
    pair(g, model, ours, pos, neg, latent, "area")
    pair(g, model, ours, combine(g, pos, boat), neg, latent, "odd", "dpmpp_2m")
    save(g, our_sampler(g, ours, prompt(g, "a misty pine forest"), neg, latent), "ours_plain")
    out = run(server, g)
    assert_close(out, "ks_area", "ours_area")
    assert_close(out, "ks_odd", "ours_odd")
    assert (out["ours_area"] - out["ours_plain"]).abs().max() > 100 * PARITY  # the area really acted


def test_area_percentage_with_strength_equals_ksampler(server):
    g = Graph()
    ours, model, base, neg, latent = setup(g)
    area = [g.add("ConditioningSetAreaPercentage", conditioning=prompt(g, "a red paper lantern"), width=0.4,
                  height=0.55, x=0.5, y=0.3, strength=1.7), 0]
    weaker = [g.add("ConditioningSetAreaStrength", conditioning=base, strength=0.6), 0]
    pair(g, model, ours, combine(g, area, weaker), neg, latent, "pct", "dpmpp_2m")
    out = run(server, g)
    assert_close(out, "ks_pct", "ours_pct")


@pytest.mark.parametrize("mode", ["default", "mask bounds"])
def test_mask_conditioning_equals_ksampler(server, mode):
    g = Graph()
    ours, model, base, neg, latent = setup(g)
    masked = [g.add("ConditioningSetMask", conditioning=prompt(g, "a red paper lantern"),
                    mask=mask(g, 40, 16, 56, 48, feather=12), strength=0.8, set_cond_area=mode), 0]
    pair(g, model, ours, combine(g, masked, base), neg, latent, "mask", "dpmpp_2m")
    out = run(server, g)
    assert_close(out, "ks_mask", "ours_mask")


def test_area_with_skip_layer_guidance_equals_ksampler_with_skip_layer_guidance_sd3(server):
    # The pack's SLG in ComfyUI's sigma window against ComfyUI's node, which runs its skip pass through
    # calc_cond_batch with the same areas.
    g = Graph()
    ours, model, base, neg, latent = setup(g)
    area = [g.add("ConditioningSetArea", conditioning=prompt(g, "a red paper lantern"), width=64, height=64, x=64,
                  y=32, strength=1.0), 0]
    pos = combine(g, area, base)
    slg = [g.add("SkipLayerGuidanceSD3", model=model, layers="7, 8, 9", scale=2.5, start_percent=0.01,
                 end_percent=0.6), 0]
    pair(g, model, ours, pos, neg, latent, "area_slg", "dpmpp_2m", ks=slg, slg_scale=2.5, slg_start=0.01,
         slg_end=0.6, slg_window="sigma")
    out = run(server, g)
    assert_close(out, "ks_area_slg", "ours_area_slg")


# ------------------------------------------------------------------------------------ CFG patches on the MODEL

PATCHES = {
    "CFGZeroStar": {},
    "APG": dict(eta=0.7, norm_threshold=3.0, momentum=-0.5),
    "RescaleCFG": dict(multiplier=0.7),
    "SkipLayerGuidanceSD3": dict(layers="7, 8, 9", scale=2.5, start_percent=0.01, end_percent=0.6),
}


@pytest.mark.parametrize("patch", list(PATCHES))
def test_cfg_patch_on_the_model_equals_ksampler(server, patch):
    g = Graph()
    ours, model, pos, neg, latent = setup(g)
    patched = [g.add(patch, model=model, **PATCHES[patch]), 0]
    area = [g.add("ConditioningSetArea", conditioning=prompt(g, "a red paper lantern"), width=64, height=64, x=0,
                  y=0, strength=1.0), 0]
    pair(g, patched, patched, pos, neg, latent, "patch", "dpmpp_2m")
    pair(g, patched, patched, combine(g, area, pos), neg, latent, "patch_area", "euler")
    save(g, our_sampler(g, ours, pos, neg, latent, "dpmpp_2m"), "ours_plain")
    out = run(server, g)
    assert_close(out, "ks_patch", "ours_patch")
    assert_close(out, "ks_patch_area", "ours_patch_area")
    assert (out["ours_patch"] - out["ours_plain"]).abs().max() > 100 * PARITY  # the patch really acted
    if patch == "SkipLayerGuidanceSD3":
        assert "sampled after ComfyUI's patches" in server.log()


# ------------------------------------------------------------------------------ the command line's flags

CLI_FLAGS = {
    "CFGZeroStar": ({}, ["--cfg_zero_star"]),
    "APG": (dict(eta=0.7, norm_threshold=3.0, momentum=-0.5),
            ["--apg_eta", "0.7", "--apg_norm_threshold", "3", "--apg_momentum", "-0.5"]),
}


@pytest.mark.parametrize("patch", list(CLI_FLAGS))
def test_command_line_flags_equal_ksampler_with_comfyuis_node(server, models, tmp_path, patch):
    # sd35 generate on the same files (ComfyUI's own tokenizer files, as the server's text encoder node uses)
    # against KSampler on the bridged model with ComfyUI's node; the reference schedule is ComfyUI's normal.
    import os

    from safetensors.torch import load_file

    from sd35_cli.main import main

    from .comfyui_server import COMFYUI_PATH as comfyui

    inputs, flags = CLI_FLAGS[patch]
    g = Graph()
    _, model, pos, neg, latent = setup(g)
    patched = [g.add(patch, model=model, **inputs), 0]
    save(g, ksampler(g, patched, pos, neg, latent, "dpmpp_2m"), "ks_cli")
    out = run(server, g)
    path = tmp_path / "cli.safetensors"
    rc = main(["generate", "--model", models.checkpoints["sd3.5_medium"],
               "--model_folder", os.path.dirname(models.text_encoders["clip_l"]), "--comfyui", comfyui,
               "--prompt", "a lighthouse on a cliff at dusk", "--negative_prompt", "blurry",
               "--out_dir", str(tmp_path / "out"), "--width", str(WIDTH), "--height", str(HEIGHT), "--steps", "4",
               "--cfg", "4", "--sampler", "dpmpp_2m", "--shift", "3", "--seed", "42", "--seed_type", "fixed",
               "--dtype", "fp32", "--device", "cpu", "--save_latent", str(path), *flags])
    assert rc == 0
    out["cli"] = load_file(path)["latent"]
    assert_close(out, "ks_cli", "cli")


# ------------------------------------------------------------------------------------- the shipped workflow

def test_the_shipped_regional_workflow_runs(server):
    from .graphs import assert_success, shipped_api_workflow

    workflow = shipped_api_workflow("sd3.5_medium_regional_slg")
    by_type: dict[str, list] = {}
    for node in workflow.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert len(by_type["ConditioningSetArea"]) == 2 and len(by_type["ConditioningCombine"]) == 2
    (sampler,) = by_type["SD35Sampler"]
    assert sampler["slg_scale"] > 0 and sampler["slg_layers"] == "7,8,9"
    # the tiny model's position grid covers 512 px, and CPU time is short: a quarter of the size in a few steps
    by_type["SD35CheckpointLoader"][0]["ckpt_name"] = "tiny-sd3.5_medium.safetensors"
    by_type["SD35EmptyLatent"][0].update(width=256, height=256)
    for area in by_type["ConditioningSetArea"]:
        area.update({k: area[k] // 4 for k in ("width", "height", "x", "y")})
        area.update(width=max(64, area["width"]), height=max(64, area["height"]))
    sampler["steps"] = 3
    result = server.run(workflow)
    assert_success(result, server)
    (image,) = server.images(result["prompt_id"])
    assert image.shape == (256, 256, 3)
