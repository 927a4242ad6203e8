"""`sd35 batch` workflows: UI -> API conversion (the frontend's graphToPrompt rules), checks made before
anything is queued, where each column goes (graph defaults and --map by title), and per-row patching.

The node descriptions are built from this pack's own node classes the way ComfyUI's ``/object_info`` builds
them; the handful of ComfyUI core nodes used here are described by their inputs as ComfyUI declares them.
The host tests repeat the conversion against a real server's ``/object_info``.
"""

import copy
import glob
import json
import os

import pytest

from sd35_cli.batch.errors import WorkflowError
from sd35_cli.batch.jobs import prepare_jobs
from sd35_cli.batch.rows import Job, Row
from sd35_cli.batch.targets import Target, apply_settings, default_targets, describe_targets, resolve_targets
from sd35_cli.batch.validation import validate
from sd35_cli.batch.workflow import load_workflow, to_api, ui_to_api, workflow_format
from tests.cli.batch_graphs import CKPT, UIGraph, txt2img_api, ui_txt2img
from tests.nodes.conftest import ROOT, load_pack


def node_info(name, cls, display):
    """What ComfyUI's /object_info reports for a V1 node class."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "name": name,
        "display_name": display,
        "category": getattr(cls, "CATEGORY", ""),
    }


def core(inputs, outputs, display, output_node=False, optional=None):
    spec = {"required": inputs}
    if optional:
        spec["optional"] = optional
    return {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}, "output": outputs,
            "output_name": outputs, "output_node": output_node, "display_name": display}


@pytest.fixture(scope="module")
def info():
    pack = load_pack()
    out = {n: node_info(n, c, pack.NODE_DISPLAY_NAME_MAPPINGS[n]) for n, c in pack.NODE_CLASS_MAPPINGS.items()}
    # The checkpoint list comes from the server's folders; pretend ours holds the tiny file.
    out["SD35CheckpointLoader"]["input"]["required"]["ckpt_name"] = [[CKPT], {}]
    for name in ("clip_l_name", "clip_g_name"):
        out["SD35TextEncoderLoader"]["input"]["required"][name] = [["clip_l.safetensors", "clip_g.safetensors"], {}]
    out["SD35TextEncoderLoader"]["input"]["required"]["t5xxl_name"] = [["none", "t5xxl_fp16.safetensors"], {}]
    out.update({
        "SaveImage": core({"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [],
                          "Save Image", output_node=True),
        "LoadImage": core({"image": [["canny.png", "photo.png"], {"image_upload": True}]}, ["IMAGE", "MASK"],
                          "Load Image"),
        "LoadImageMask": core({"image": [["canny.png", "photo.png"], {"image_upload": True}],
                               "channel": [["alpha", "red", "green", "blue"], {}]}, ["MASK"], "Load Image (as Mask)"),
        "ImagePadForOutpaint": core({"image": ["IMAGE", {}],
                                     **{side: ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}]
                                        for side in ("left", "top", "right", "bottom")},
                                     "feathering": ["INT", {"default": 40, "min": 0, "max": 16384}]},
                                    ["IMAGE", "MASK"], "Pad Image for Outpainting"),
        "ConditioningZeroOut": core({"conditioning": ["CONDITIONING", {}]}, ["CONDITIONING"], "ConditioningZeroOut"),
        "ConditioningSetArea": core({"conditioning": ["CONDITIONING", {}],
                                     **{k: ["INT", {"default": d, "min": d, "max": 16384, "step": 8}]
                                        for k, d in (("width", 64), ("height", 64), ("x", 0), ("y", 0))},
                                     "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0}]},
                                    ["CONDITIONING"], "Conditioning (Set Area)"),
        "ConditioningCombine": core({"conditioning_1": ["CONDITIONING", {}], "conditioning_2": ["CONDITIONING", {}]},
                                    ["CONDITIONING"], "Conditioning (Combine)"),
        "CLIPTextEncode": core({"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}, ["CONDITIONING"],
                               "CLIP Text Encode (Prompt)"),
        "CheckpointLoaderSimple": core({"ckpt_name": [["sd3.5_large.safetensors"], {}]}, ["MODEL", "CLIP", "VAE"],
                                       "Load Checkpoint"),
        "EmptySD3LatentImage": core({"width": ["INT", {"default": 1024, "min": 16, "max": 16384}],
                                     "height": ["INT", {"default": 1024, "min": 16, "max": 16384}],
                                     "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}, ["LATENT"],
                                    "EmptySD3LatentImage"),
        "KSampler": core({"model": ["MODEL", {}],
                          "seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}],
                          "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                          "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
                          "sampler_name": [["euler", "dpmpp_2m"], {}], "scheduler": [["normal", "simple"], {}],
                          "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
                          "latent_image": ["LATENT", {}],
                          "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}]}, ["LATENT"], "KSampler"),
        "VAEDecode": core({"samples": ["LATENT", {}], "vae": ["VAE", {}]}, ["IMAGE"], "VAE Decode"),
        "LoraLoaderModelOnly": core({"model": ["MODEL", {}], "lora_name": [["sd3.5_large_lora.safetensors"], {}],
                                     "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}]},
                                    ["MODEL"], "LoraLoaderModelOnly"),
        "PreviewImage": core({"images": ["IMAGE", {}]}, [], "Preview Image", output_node=True),
        "ImageScale": core({"image": ["IMAGE", {}],
                            "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}],
                            "width": ["INT", {"default": 512, "min": 0, "max": 16384}],
                            "height": ["INT", {"default": 512, "min": 0, "max": 16384}],
                            "crop": [["disabled", "center"], {}]}, ["IMAGE"], "Upscale Image"),
    })
    return out


def test_ui_workflow_converts_like_the_frontend(info):
    ui = ui_txt2img()
    assert workflow_format(ui) == "ui"
    api = ui_to_api(ui, info)
    # Muted (10), virtual (8 Reroute, 12 Primitive, 14 Note) and bypassed (11) nodes leave the graph.
    assert sorted(api, key=int) == ["1", "2", "3", "4", "5", "6", "7", "9", "13"]
    s = api["6"]["inputs"]
    assert s["positive"] == ["3", 0] and s["negative"] == ["4", 0]  # through the bypassed ControlNet apply
    assert s["steps"] == 3  # from the PrimitiveNode, not the widget's stale 20
    assert (s["seed"], s["cfg"], s["sampler"], s["shift"], s["slg_layers"], s["slg_window"], s["seed_mode"]) == \
        (42, 4.5, "euler", 3.0, "7,8,9", "steps", "batch")  # "randomize" was the seed's control value
    assert s["model"] == ["1", 0] and s["latent"] == ["5", 0]
    assert api["9"]["inputs"] == {"images": ["7", 0], "filename_prefix": "batch"}  # through the Reroute
    assert api["3"]["inputs"] == {"clip": ["2", 0], "text": "a cat", "clip_l_text": "", "clip_g_text": "",
                                  "t5xxl_text": "", "t5_max_length": 77}
    assert api["5"]["inputs"] == {"width": 64, "height": 48, "batch_size": 1}  # unlinked optional socket: absent
    assert api["7"]["inputs"] == {"samples": ["6", 0], "vae": ["1", 2], "tiled": False, "tile_size": 512,
                                  "overlap": 64}
    assert api["13"]["inputs"] == {"image": "canny.png"}
    assert api["2"]["inputs"]["weight_dtype"] == "default"
    assert api["9"]["_meta"]["title"] == "Final" and api["3"]["_meta"]["title"] == "Positive"
    assert api["1"]["_meta"]["title"] == "SD3.5 Checkpoint Loader"  # untitled: the display name
    assert validate(api, info) == []


def test_ui_links_in_the_object_form_and_named_widget_values(info):
    ui = ui_txt2img()
    ui["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link,
                            strict=True)) for link in ui["links"]]
    ui["version"] = 1
    node5 = next(n for n in ui["nodes"] if n["id"] == 5)
    node5["widgets_values"] = {"batch_size": 2, "width": 32, "height": 16}
    assert ui_to_api(ui, info)["5"]["inputs"] == {"width": 32, "height": 16, "batch_size": 2}
    assert ui_to_api(ui, info)["6"]["inputs"]["positive"] == ["3", 0]


def test_a_muted_source_drops_the_link_and_validation_says_what_is_missing(info):
    api = ui_to_api(ui_txt2img(sampler_mode=2), info)
    assert "6" not in api and "samples" not in api["7"]["inputs"]
    assert validate(api, info) == ["node 7 'SD3.5 VAE Decode' (SD35VAEDecode): required input 'samples' is missing"]


def test_ui_conversion_refuses_missing_node_types_and_subgraphs(info):
    ui = ui_txt2img()
    next(n for n in ui["nodes"] if n["id"] == 6)["type"] = "FancySampler"
    with pytest.raises(WorkflowError, match=r"not installed on the server: 6 'Sampler' \(FancySampler\)"):
        ui_to_api(ui, info)
    ui = ui_txt2img()
    ui["nodes"].append({"id": 40, "type": "FrontendOnlyLabel", "mode": 0, "inputs": [], "outputs": []})
    assert "40" not in ui_to_api(ui, info)  # an unwired frontend decoration is not an error
    ui["definitions"] = {"subgraphs": [{"id": "5f1c-sub"}]}
    ui["nodes"].append({"id": 41, "type": "5f1c-sub", "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowError, match="subgraph"):
        ui_to_api(ui, info)


def test_api_workflow_round_trips_and_the_converted_ui_twin_matches_it(info, tmp_path):
    import json

    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"prompt": txt2img_api()}))  # a saved /prompt request body also works
    api = to_api(load_workflow(str(path)), None)
    assert api == txt2img_api()
    with pytest.raises(WorkflowError, match="needs a server's /object_info"):
        to_api(ui_txt2img(), None)
    (tmp_path / "bad.json").write_text('{"nodes": 3}')
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        load_workflow(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text('{"1": ')
    with pytest.raises(WorkflowError, match="broken.json: not valid JSON"):
        load_workflow(str(tmp_path / "broken.json"))


# ------------------------------------------------------------------------------------------------ validation

def test_validation_names_each_problem_before_anything_is_queued(info):
    api = txt2img_api()
    api["1"]["inputs"]["ckpt_name"] = "sd3.5_large.safetensors"
    api["5"]["inputs"]["width"] = 8
    del api["6"]["inputs"]["steps"]
    api["7"]["inputs"]["vae"] = ["1", 5]
    api["4"]["inputs"]["clip"] = ["1", 0]
    api["9"] = {"class_type": "UpscaleWithMagic", "inputs": {}}
    api["3"]["inputs"]["clip"] = ["99", 0]
    problems = validate(api, info)
    assert problems == [
        "node 1 'Load Checkpoint' (SD35CheckpointLoader): ckpt_name 'sd3.5_large.safetensors' is not available on "
        f"the server (it offers: {CKPT})",
        "node 3 'Positive Prompt' (SD35TextEncode): input 'clip' is linked to node 99, which is not in the workflow",
        "node 4 'Negative Prompt' (SD35TextEncode): input 'clip' takes SD35_CLIP but is linked to a SD35_MODEL output "
        "of node 1 'Load Checkpoint' (SD35CheckpointLoader)",
        "node 5 'Size' (SD35EmptyLatent): width 8 is below the minimum 16",
        "node 6 'Sampler' (SD35Sampler): required input 'steps' is missing",
        "node 7 'Decode' (SD35VAEDecode): input 'vae' is linked to output 5 of node 1 'Load Checkpoint' "
        "(SD35CheckpointLoader), which has 3 outputs",
        "node 9 (UpscaleWithMagic): node type 'UpscaleWithMagic' is not installed",
    ]
    # Inputs written per row are the server's to check, row by row.
    assert not any("steps" in p or "width" in p for p in validate(api, info, [Target("6", "steps"),
                                                                                Target("5", "width")]))


def test_a_workflow_without_an_output_node_is_refused(info):
    api = txt2img_api()
    del api["8"]
    assert validate(api, info) == ["the workflow has no output node (such as Save Image): no image would come back"]


# ------------------------------------------------------------------------------------------------ targets

def test_default_targets_of_a_txt2img_graph(info):
    api = txt2img_api()
    targets = resolve_targets(api, ["prompt", "negative", "seed", "steps", "cfg", "width", "height", "denoise"],
                              object_info=info)
    assert targets == {"prompt": [Target("3", "text")], "negative": [Target("4", "text")],
                       "seed": [Target("6", "seed")], "steps": [Target("6", "steps")], "cfg": [Target("6", "cfg")],
                       "width": [Target("5", "width")], "height": [Target("5", "height")],
                       "denoise": [Target("6", "denoise")]}
    assert describe_targets(api, {"prompt": targets["prompt"]}) == [
        "prompt -> 3 'Positive Prompt' (SD35TextEncode).text"]
    with pytest.raises(WorkflowError, match=r"column 'control_image' has no place .* --map control_image="):
        resolve_targets(api, ["control_image"], object_info=info)


def controlnet_api():
    api = txt2img_api()
    api["20"] = {"class_type": "SD35ControlNetLoader", "inputs": {"control_net_name": "cn.safetensors"}}
    api["21"] = {"class_type": "LoadImage", "inputs": {"image": "canny.png"}, "_meta": {"title": "Edges"}}
    api["22"] = {"class_type": "SD35CannyPreprocessor", "inputs": {"image": ["21", 0], "low_threshold": 0.2,
                                                                    "high_threshold": 0.8}}
    api["23"] = {"class_type": "SD35ControlNetApply",
                 "inputs": {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["20", 0], "vae": ["1", 2],
                            "image": ["22", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    api["6"]["inputs"]["positive"] = ["23", 0]
    api["6"]["inputs"]["negative"] = ["23", 1]
    return api


def test_controlnet_graph_keeps_positive_and_negative_apart_and_finds_the_control_image(info):
    api = controlnet_api()
    targets = resolve_targets(api, ["prompt", "negative", "control_image"], object_info=info)
    assert targets == {"prompt": [Target("3", "text")], "negative": [Target("4", "text")],
                       "control_image": [Target("21", "image")]}


def test_img2img_graph_finds_the_init_image_and_has_no_size(info):
    api = txt2img_api()
    api["5"] = {"class_type": "SD35VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2]}}
    api["30"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    assert default_targets(api, "init_image", info) == [Target("30", "image")]
    assert default_targets(api, "width", info) == []


def inpaint_api(separate_mask=False):
    """Image and painted mask from one LoadImage (node 30), or the mask from its own LoadImageMask (node 31)."""
    api = txt2img_api()
    api["30"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    mask = ["31", 0] if separate_mask else ["30", 1]
    api["5"] = {"class_type": "SD35VAEEncodeForInpaint",
                "inputs": {"pixels": ["30", 0], "vae": ["1", 2], "mask": mask, "grow_mask_by": 6}}
    if separate_mask:
        api["31"] = {"class_type": "LoadImageMask", "inputs": {"image": "photo.png", "channel": "alpha"}}
    return api


def _png_array(content):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(content)))


def _mask_files(tmp_path):
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "photo.png")
    mask = np.zeros((12, 16), np.uint8)  # half the photo's size: resized to it
    mask[3:9, 4:12] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    return rgb, mask


def test_an_inpaint_graph_finds_the_mask_loader(info):
    assert default_targets(inpaint_api(), "mask_image", info) == [Target("30", "image")]
    assert default_targets(inpaint_api(separate_mask=True), "mask_image", info) == [Target("31", "image")]
    assert default_targets(txt2img_api(), "mask_image", info) == []


def test_a_mask_for_the_image_loader_is_uploaded_as_the_pictures_alpha(info, tmp_path):
    rgb, mask = _mask_files(tmp_path)
    api = inpaint_api()
    targets = resolve_targets(api, ["init_image", "mask_image"], object_info=info)
    row = {"init_image": str(tmp_path / "photo.png"), "mask_image": str(tmp_path / "mask.png")}
    (job,) = prepare_jobs(api, targets, [Job(Row(0, 2, row), 0, None, row)], info)
    assert job.error is None and job.uploads == {}
    ((name, content),) = job.made.items()
    assert job.prompt["30"]["inputs"]["image"] == f"sd35_batch/{name}" and name.endswith("_photo_masked.png")
    png = _png_array(content)
    assert png.shape == (24, 32, 4) and (png[..., :3] == rgb).all()
    # LoadImage reads MASK = 1 - alpha: the mask, upscaled 2x bilinearly (edges half-way).
    assert png[8:16, 10:22, 3].max() == 0 and png[:4, :, 3].min() == 255
    no_image = {"mask_image": str(tmp_path / "mask.png")}
    (bad,) = prepare_jobs(api, targets, [Job(Row(1, 3, no_image), 0, None, no_image)], info)
    assert bad.prompt is None and "needs an init_image too" in bad.error


def test_a_mask_for_its_own_loader_reads_the_same_through_alpha_or_grey(info, tmp_path):
    _, mask = _mask_files(tmp_path)
    api = inpaint_api(separate_mask=True)
    targets = resolve_targets(api, ["mask_image"], object_info=info)
    row = {"mask_image": str(tmp_path / "mask.png")}
    (job,) = prepare_jobs(api, targets, [Job(Row(0, 2, row), 0, None, row)], info)
    ((name, content),) = job.made.items()
    assert job.prompt["31"]["inputs"]["image"] == f"sd35_batch/{name}" and job.prompt["30"]["inputs"]["image"] == \
        "photo.png"
    png = _png_array(content)
    assert (png[..., 0] == mask).all() and (png[..., 3] == 255 - mask).all()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    row = {"mask_image": str(empty)}
    (bad,) = prepare_jobs(api, targets, [Job(Row(1, 3, row), 0, None, row)], info)
    assert bad.prompt is None and "empty.png: the file is empty" in bad.error


def test_comfyui_native_graph_and_a_negative_made_from_the_positive(info):
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 20, "cfg": 4.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}},
    }
    assert validate(api, info) == []
    t = resolve_targets(api, ["prompt", "seed", "width"], object_info=info)
    assert t == {"prompt": [Target("2", "text")], "seed": [Target("5", "seed")], "width": [Target("4", "width")]}
    with pytest.raises(WorkflowError, match=r"prompt and the negative prompt would both be written to node 2"):
        resolve_targets(api, ["prompt", "negative"], object_info=info)


def test_map_by_title_id_or_type_overrides_and_adds_columns(info):
    api = controlnet_api()
    targets = resolve_targets(api, ["prompt", "style", "strength", "prefix"], [
        "prompt=Negative Prompt.text", "prompt=positive prompt.text",  # several maps: write both
        "style=#3.clip_g_text", "Strength=SD35ControlNetApply.strength", "prefix=8.filename_prefix"],
        object_info=info)
    assert targets == {"prompt": [Target("4", "text"), Target("3", "text")], "style": [Target("3", "clip_g_text")],
                       "strength": [Target("23", "strength")], "prefix": [Target("8", "filename_prefix")]}


@pytest.mark.parametrize("spec, message", [
    ("prompt", r"expected COLUMN=NodeTitle.input"),
    ("prompt=Positive Prompt", r"expected COLUMN=NodeTitle.input"),
    ("prompt=Nowhere.text", r"no node titled 'Nowhere'.*titles in the workflow: .*Positive Prompt"),
    ("prompt=SD35TextEncode.text", r"2 nodes match 'SD35TextEncode'"),
    ("prompt=Positive Prompt.txt", r"has no input 'txt' \(its inputs: clip, text,"),
    ("prompt=Sampler.positive", r"input 'positive' of node 6 'Sampler' \(SD35Sampler\) is fed by node 23"),
])
def test_bad_maps_are_explained(info, spec, message):
    with pytest.raises(WorkflowError, match=message):
        resolve_targets(controlnet_api(), ["prompt"], [spec], object_info=info)


def test_two_loaders_behind_controlnets_is_ambiguous(info):
    api = controlnet_api()
    api["24"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    api["25"] = dict(copy.deepcopy(api["23"]))
    api["25"]["inputs"].update(positive=["23", 0], negative=["23", 1], image=["24", 0])
    api["6"]["inputs"].update(positive=["25", 0], negative=["25", 1])
    with pytest.raises(WorkflowError, match=r"column 'control_image' could go to 2 nodes .*21 'Edges'"):
        resolve_targets(api, ["control_image"], object_info=info)
    assert resolve_targets(api, ["prompt"], object_info=info) == {"prompt": [Target("3", "text")]}


# ------------------------------------------------------------------------------------------------ patching

def test_apply_settings_converts_cells_to_the_input_types_and_leaves_the_original_alone(info):
    api = txt2img_api()
    targets = resolve_targets(api, ["prompt", "steps", "cfg", "seed", "width"], object_info=info)
    out = apply_settings(api, targets, {"prompt": "a dog", "steps": "30", "cfg": "5", "seed": 9, "width": 128.0},
                         info)
    assert out["3"]["inputs"]["text"] == "a dog"
    assert out["6"]["inputs"]["steps"] == 30 and isinstance(out["6"]["inputs"]["steps"], int)
    assert out["6"]["inputs"]["cfg"] == 5.0 and isinstance(out["6"]["inputs"]["cfg"], float)
    assert out["6"]["inputs"]["seed"] == 9 and out["5"]["inputs"]["width"] == 128
    assert api == txt2img_api()
    with pytest.raises(ValueError, match=r"column 'steps' -> node 6 'Sampler' \(SD35Sampler\).steps"):
        apply_settings(api, targets, {"steps": "many"}, info)
    with pytest.raises(ValueError, match="whole number"):
        apply_settings(api, targets, {"width": 64.5}, info)


def test_prepared_jobs_upload_images_by_content_and_fingerprint_the_exact_prompt(info, tmp_path):
    api = controlnet_api()
    targets = resolve_targets(api, ["prompt", "control_image", "seed"], object_info=info)
    image = tmp_path / "edges.png"
    image.write_bytes(b"first")
    row = Row(0, 2, {"prompt": "a", "control_image": str(image)})
    jobs = [Job(row, 0, 5, {"prompt": "a", "control_image": str(image), "seed": 5}),
            Job(row, 1, 6, {"prompt": "a", "control_image": str(image), "seed": 6})]
    first = prepare_jobs(api, targets, jobs, info)
    value = first[0].prompt["21"]["inputs"]["image"]
    assert value.startswith("sd35_batch/") and value.endswith("_edges.png")
    assert first[0].uploads == {str(image): value.split("/", 1)[1]}
    assert first[0].prompt["6"]["inputs"]["seed"] == 5 and first[1].prompt["6"]["inputs"]["seed"] == 6
    assert first[0].fingerprint != first[1].fingerprint
    assert prepare_jobs(api, targets, jobs, info)[0].fingerprint == first[0].fingerprint
    image.write_bytes(b"changed")
    again = prepare_jobs(api, targets, jobs, info)[0]
    assert again.prompt["21"]["inputs"]["image"] != value and again.fingerprint != first[0].fingerprint
    bad = prepare_jobs(api, targets, [Job(row, 0, 5, {"seed": "x"})], info)[0]
    assert bad.prompt is None and "column 'seed'" in bad.error


def test_widget_values_follow_the_frontends_counting_rules():
    info = {"Legacy": core({"noise_seed": ["INT", {}], "count": ["INT", {"forceInput": True}],
                            "mode": [["a", "b"], {"control_after_generate": True}], "text": ["STRING", {}]},
                           ["LATENT"], "Legacy", output_node=True)}
    g = UIGraph()
    # noise_seed carries a control value by its name; a choice with control_after_generate carries a control
    # value and a filter; the forceInput "count" is a socket, with no widget value...
    g.node(1, "Legacy", [5, "fixed", "b", "increment", "", "hello"], [("count", "INT")])
    # ... unless the workflow was saved when it still had one (the frontend's migrateWidgetsValues).
    g.node(2, "Legacy", [6, "fixed", 99, "a", "fixed", "", "old"], [("count", "INT")])
    api = ui_to_api(g.workflow(), info)
    assert api["1"]["inputs"] == {"noise_seed": 5, "mode": "b", "text": "hello"}
    assert api["2"]["inputs"] == {"noise_seed": 6, "mode": "a", "text": "old"}


# ------------------------------------------------------------------------------------------------ shipped

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def test_every_shipped_editor_workflow_converts_to_its_api_twin_and_takes_every_column(info):
    assert SHIPPED, "the pack ships workflows/*.json"
    for path in SHIPPED:
        name = os.path.basename(path)
        with open(path) as f:
            ui = json.load(f)
        api = to_api(load_workflow(os.path.join(ROOT, "workflows", "api", name)), info, name)
        assert ui_to_api(ui, info) == api, name
        problems = validate(api, info)  # this test's "server" holds tiny model files, not the released ones
        assert all("is not available on the server" in p for p in problems), (name, problems)
        columns = ["prompt", "negative", "seed", "steps", "cfg", "denoise"]
        types = {n["class_type"] for n in api.values()}
        # The inpainting workflows keep the picture's own size; every other one has a size to set.
        columns += [] if "SD35VAEEncodeForInpaint" in types else ["width", "height"]
        columns += ["control_image"] if "SD35ControlNetApply" in types else []
        columns += ["init_image"] if types & {"SD35VAEEncode", "SD35VAEEncodeForInpaint"} else []
        # A mask painted on the Load image (inpainting); outpainting computes its mask from the padding.
        columns += ["mask_image"] if "SD35VAEEncodeForInpaint" in types and "ImagePadForOutpaint" not in types else []
        targets = resolve_targets(api, columns, object_info=info)
        kinds = {c: {(api[t.node]["class_type"], t.input) for t in ts} for c, ts in targets.items()}
        assert kinds["prompt"] == kinds["negative"] == {("SD35TextEncode", "text")}, name
        assert targets["prompt"] != targets["negative"], name
        assert api[targets["prompt"][0].node]["_meta"]["title"] == "Positive prompt", name
        assert all(kinds[c] == {("SD35Sampler", c)} for c in ("seed", "steps", "cfg", "denoise")), name
        if "width" in kinds:
            assert kinds["width"] in ({("SD35EmptyLatent", "width")}, {("ImageScale", "width")}), name
        for column in ("control_image", "init_image", "mask_image"):
            if column in kinds:
                assert kinds[column] == {("LoadImage", "image")}, name


def test_lora_columns_map_to_the_lora_node_of_the_shipped_workflow(info):
    name = "sd3.5_large_lora.json"
    api = to_api(load_workflow(os.path.join(ROOT, "workflows", "api", name)), info, name)
    targets = resolve_targets(api, ["prompt", "lora", "lora_strength"],
                              ["lora=Load LoRA.lora_name", "lora_strength=Load LoRA.strength_model"], info)
    out = apply_settings(api, targets, {"lora": "style.safetensors", "lora_strength": "0.6"}, info)
    node = out[targets["lora"][0].node]
    assert node["class_type"] == "SD35LoraLoader"
    assert node["inputs"]["lora_name"] == "style.safetensors" and node["inputs"]["strength_model"] == 0.6
