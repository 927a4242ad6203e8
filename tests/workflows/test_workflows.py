"""The shipped workflows, checked without a server.

Every node type exists (this pack's NODE_CLASS_MAPPINGS, or the small committed list of ComfyUI core nodes below),
every link joins matching types, every widget value lies within its input's range or choices, each UI workflow
and its API twin describe the same graph, the sampler carries the recommended settings of its model, and the
files are exactly what ``tools/make_workflows.py`` writes. With ``COMFYUI_PATH`` set, the committed core-node
list is also compared with that ComfyUI checkout.
"""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from ..nodes.conftest import load_pack

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")
NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))

FILES = "<file list>"  # a combo whose choices are the files in a folder: any file name is acceptable
MODEL_EXTENSIONS = (".safetensors", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# ComfyUI core nodes the workflows use, as INPUT_TYPES / RETURN_TYPES (ComfyUI 0.3.x, nodes.py).
CORE_NODES = {
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}, ()),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, ()),
    "LoadImage": ({"required": {"image": (FILES, {"image_upload": True})}}, ("IMAGE", "MASK")),
    "ImageScale": ({"required": {
        "image": ("IMAGE",),
        "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
        "width": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
        "height": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
        "crop": (["disabled", "center"],),
    }}, ("IMAGE",)),
    "ImagePadForOutpaint": ({"required": {
        "image": ("IMAGE",),
        "left": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8}),
        "top": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8}),
        "right": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8}),
        "bottom": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8}),
        "feathering": ("INT", {"default": 40, "min": 0, "max": 16384, "step": 1}),
    }}, ("IMAGE", "MASK")),
    "CheckpointLoaderSimple": ({"required": {"ckpt_name": (FILES,)}}, ("MODEL", "CLIP", "VAE")),
    "LoraLoaderModelOnly": ({"required": {
        "model": ("MODEL",),
        "lora_name": (FILES,),
        "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
    }}, ("MODEL",)),
    "VAEDecode": ({"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",)),
    "ConditioningSetArea": ({"required": {
        "conditioning": ("CONDITIONING",),
        "width": ("INT", {"default": 64, "min": 64, "max": 16384, "step": 8}),
        "height": ("INT", {"default": 64, "min": 64, "max": 16384, "step": 8}),
        "x": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8}),
        "y": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8}),
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
    }}, ("CONDITIONING",)),
    "ConditioningCombine": ({"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}},
                            ("CONDITIONING",)),
}
# Nodes the frontend itself provides (never sent to the server), with their widgets.
FRONTEND_ONLY = {"Note": ["text"]}
# Widgets the frontend adds that are saved in the workflow but are not node inputs.
UPLOAD_WIDGETS = {"LoadImage": ["upload"]}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

FILE_INPUTS = {
    ("SD35CheckpointLoader", "ckpt_name"), ("SD35TextEncoderLoader", "clip_l_name"),
    ("SD35TextEncoderLoader", "clip_g_name"), ("SD35TextEncoderLoader", "t5xxl_name"),
    ("SD35VAELoader", "vae_name"), ("SD35ControlNetLoader", "control_net_name"), ("SD35LoraLoader", "lora_name"),
    ("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoaderModelOnly", "lora_name"),
    ("SD35IPAdapterLoader", "ipadapter_name"), ("SD35CLIPVisionLoader", "clip_name"),
}

# Which model each workflow is for, and whether it uses its skip-layer guidance (True), or none (False), or the
# skip-layer guidance of the variant named (at the workflow's own cfg).
WORKFLOW_MODELS = {
    "sd3.5_medium_txt2img_slg": ("sd3.5_medium", True),
    "tiny_shapes_txt2img": ("tiny_shapes_sd35", False),
    "sd3.5_large_txt2img": ("sd3.5_large", False),
    "sd3.5_large_turbo_txt2img": ("sd3.5_large_turbo", False),
    "sd3_medium_txt2img": ("sd3_medium", False),
    "sd3.5_large_img2img": ("sd3.5_large", False),
    "sd3.5_large_lora": ("sd3.5_large", False),
    "sd3.5_large_inpaint": ("sd3.5_large", False),
    "sd3.5_large_outpaint": ("sd3.5_large", False),
    "sd3.5_large_controlnet_canny": ("sd3.5_large_controlnet_canny", False),
    "sd3.5_large_controlnet_blur": ("sd3.5_large_controlnet_blur", False),
    "sd3.5_large_controlnet_depth": ("sd3.5_large_controlnet_depth", False),
    "sd3.5_large_native_lora_controlnet": ("sd3.5_large_controlnet_canny", "sd3.5_medium"),
    "sd3.5_large_ip_adapter": ("sd3.5_large", False),
    "sd3.5_medium_regional_slg": ("sd3.5_medium", True),
}
TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its position


def load(*parts):
    with open(os.path.join(WORKFLOWS, *parts), encoding="utf-8") as f:
        return json.load(f)


def is_widget(kind, options) -> bool:
    return (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", FILES)) and not \
        options.get("forceInput")


class Spec:
    """A node type's sockets, widgets (with their input specs) and outputs, from INPUT_TYPES."""

    def __init__(self, node_type: str, input_types: dict, return_types: tuple, frontend_only=False):
        self.type = node_type
        self.sockets, self.widgets, self.specs = [], [], {}
        self.frontend_only = frontend_only
        for section in ("required", "optional"):
            for name, value in input_types.get(section, {}).items():
                kind, options = value[0], (value[1] if len(value) > 1 else {})
                if (node_type, name) in FILE_INPUTS:
                    kind = FILES
                if is_widget(kind, options):
                    self.widgets.append(name)
                    self.specs[name] = (kind, options)
                    if options.get("control_after_generate"):
                        self.widgets.append("control_after_generate")
                        self.specs["control_after_generate"] = (sorted(CONTROL_VALUES), {})
                else:
                    self.sockets.append((name, kind, section == "optional"))
        self.widgets += UPLOAD_WIDGETS.get(node_type, [])
        self.outputs = list(return_types)


@pytest.fixture(scope="module")
def specs() -> dict[str, Spec]:
    pack = load_pack()
    out = {name: Spec(name, cls.INPUT_TYPES(), cls.RETURN_TYPES) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    out.update({name: Spec(name, inputs, outputs) for name, (inputs, outputs) in CORE_NODES.items()})
    for name, widgets in FRONTEND_ONLY.items():
        out[name] = Spec(name, {"required": {w: ("STRING", {"multiline": True}) for w in widgets}}, (),
                         frontend_only=True)
    return out


def check_value(node_type: str, name: str, value, kind, options) -> None:
    where = f"{node_type}.{name} = {value!r}"
    if kind == FILES:
        extensions = IMAGE_EXTENSIONS if node_type == "LoadImage" else MODEL_EXTENSIONS
        if node_type == "SD35IPAdapterLoader":  # InstantX's release is a .bin, read as tensors only
            extensions = (*extensions, ".bin")
        assert isinstance(value, str) and (value.lower().endswith(extensions) or value == "none"), where
    elif isinstance(kind, list):
        assert value in kind, f"{where}: not one of {kind}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if kind == "INT":
            assert isinstance(value, int), where
            assert value % options.get("step", 1) == 0, f"{where}: not a multiple of {options.get('step')}"
        assert options.get("min", -float("inf")) <= value <= options.get("max", float("inf")), where
    else:
        raise AssertionError(f"{where}: unexpected widget type {kind!r}")


# ------------------------------------------------------------------------------------------------- UI format

def test_every_workflow_has_an_api_twin_and_all_are_listed():
    assert set(NAMES) == set(WORKFLOW_MODELS)
    assert sorted(f[:-5] for f in os.listdir(os.path.join(WORKFLOWS, "api")) if f.endswith(".json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_exist_and_widget_values_are_valid(name, specs):
    wf = load(f"{name}.json")
    assert wf["version"] == 0.4 and set(wf) >= {"last_node_id", "last_link_id", "nodes", "links", "groups", "extra"}
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= wf["last_node_id"]
    for node in wf["nodes"]:
        assert node["type"] in specs, f"{name}: unknown node type {node['type']}"
        spec = specs[node["type"]]
        assert node["mode"] == 0 and node["flags"] == {}
        if not spec.frontend_only:
            assert node["properties"]["Node name for S&R"] == node["type"]
        values = node["widgets_values"]
        assert len(values) == len(spec.widgets), f"{name}: {node['type']} widgets {spec.widgets} got {values}"
        for widget, value in zip(spec.widgets, values, strict=True):
            if widget in UPLOAD_WIDGETS.get(node["type"], []):
                assert value == "image"
                continue
            check_value(node["type"], widget, value, *spec.specs[widget])
        assert [(i["name"], i["type"], i.get("shape") == 7) for i in node["inputs"]] == spec.sockets, node["type"]
        assert [o["type"] for o in node["outputs"]] == spec.outputs, node["type"]
        assert [o["slot_index"] for o in node["outputs"]] == list(range(len(spec.outputs)))


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_links_join_matching_types(name, specs):
    wf = load(f"{name}.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and max(link_ids) <= wf["last_link_id"]
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        output, target = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        # An input may take several types (ComfyUI's union syntax, "SD35_MODEL,MODEL"); the link has the output's.
        assert output["type"] == kind and kind in target["type"].split(","), (link_id, output["type"],
                                                                              target["type"], kind)
        assert link_id in output["links"] and target["link"] == link_id
    linked = {link[0] for link in wf["links"]}
    for node in wf["nodes"]:
        spec = specs[node["type"]]
        for socket, (_, _, optional) in zip(node["inputs"], spec.sockets, strict=True):
            assert socket["link"] in linked or (socket["link"] is None and optional), \
                f"{name}: {node['type']}.{socket['name']} is not connected"
        for output in node["outputs"]:
            assert set(output["links"]) <= linked


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_laid_out_for_a_person(name):
    wf = load(f"{name}.json")
    nodes = wf["nodes"]
    # Nothing overlaps (a node's box includes its title bar) and every node sits inside a group.
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes]
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[:i]):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (nodes[i]["type"], nodes[j]["type"])
    for n, box in zip(nodes, boxes, strict=True):
        assert any(g["bounding"][0] <= box[0] and g["bounding"][1] <= box[1]
                   and box[2] <= g["bounding"][0] + g["bounding"][2] and box[3] <= g["bounding"][1] + g["bounding"][3]
                   for g in wf["groups"]), f"{name}: {n['type']} is outside every group"
    assert all(g["title"] for g in wf["groups"]) and all(n.get("title") for n in nodes)
    # A note says which file goes in which folder; the result is saved.
    (note,) = [n for n in nodes if n["type"] == "Note"]
    text = note["widgets_values"][0]
    (ckpt,) = [n for n in nodes if n["type"] in ("SD35CheckpointLoader", "CheckpointLoaderSimple")]
    if name.startswith("tiny_shapes"):
        # The bundled model needs no files: the note says so, and the loader is set to the bundled file.
        assert f"{ckpt['widgets_values'][0]}, bundled with the pack" in text
        assert not any(n["type"] == "SD35TextEncoderLoader" for n in nodes)
    else:
        for path in ("models/checkpoints/", "models/text_encoders/", "clip_l.safetensors", "clip_g.safetensors",
                     "t5xxl_fp16.safetensors"):
            assert path in text, path
        assert f"models/checkpoints/{ckpt['widgets_values'][0]}" in text
    for cn in [n for n in nodes if n["type"] == "SD35ControlNetLoader"]:
        assert f"models/controlnet/{cn['widgets_values'][0]}" in text
    for lora in [n for n in nodes if n["type"] == "LoraLoaderModelOnly"]:
        assert f"models/loras/{lora['widgets_values'][0]}" in text
    (save,) = [n for n in nodes if n["type"] == "SaveImage"]
    assert save["inputs"][0]["link"] is not None


@pytest.mark.parametrize("name", NAMES)
def test_sampler_has_the_recommended_settings(name, specs):
    from sd35_core.sampling.defaults import defaults_for

    variant, slg = WORKFLOW_MODELS[name]
    settings = defaults_for(variant, slg=slg is True)
    if isinstance(slg, str):
        settings = replace(settings, slg=defaults_for(slg, slg=True).slg)
    wf = load(f"{name}.json")
    (sampler,) = [n for n in wf["nodes"] if n["type"] == "SD35Sampler"]
    values = dict(zip(specs["SD35Sampler"].widgets, sampler["widgets_values"], strict=True))
    assert (values["steps"], values["cfg"], values["sampler"], values["shift"], values["schedule"]) == (
        settings.steps, settings.cfg, settings.sampler, settings.shift, settings.schedule)
    if settings.slg is None:
        assert values["slg_scale"] == 0
    else:
        s = settings.slg
        assert (values["slg_layers"], values["slg_scale"], values["slg_start"], values["slg_end"],
                values["slg_window"]) == (",".join(map(str, s.layers)), s.scale, s.start, s.end, s.window)
    if "img2img" in name:
        assert values["denoise"] < 1
    else:
        assert values["denoise"] == 1


# ------------------------------------------------------------------------------------------------- API twin

@pytest.mark.parametrize("name", NAMES)
def test_api_twin_describes_the_same_graph_and_values(name, specs):
    ui, api = load(f"{name}.json"), load("api", f"{name}.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    sent = {i for i, n in nodes.items() if not specs[n["type"]].frontend_only}
    assert set(api) == {str(i) for i in sent}
    links = {link[0]: link for link in ui["links"]}
    for node_id in sent:
        node, entry = nodes[node_id], api[str(node_id)]
        spec = specs[node["type"]]
        assert entry["class_type"] == node["type"]
        assert entry["_meta"]["title"] == node["title"]
        expected = {w: v for w, v in zip(spec.widgets, node["widgets_values"], strict=True)
                    if w != "control_after_generate" and w not in UPLOAD_WIDGETS.get(node["type"], [])}
        for socket in node["inputs"]:
            if socket["link"] is not None:
                link = links[socket["link"]]
                expected[socket["name"]] = [str(link[1]), link[2]]
        assert entry["inputs"] == expected, f"{name}: node {node_id} ({node['type']})"


# ------------------------------------------------------------------------------------------------- sources

def test_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_workflows", os.path.join(ROOT, "tools", "make_workflows.py"))
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # dataclasses look their module up while the file runs
    spec.loader.exec_module(generator)
    expected = generator.rendered()
    on_disk = {}
    for rel in [f for f in os.listdir(WORKFLOWS) if f.endswith(".json")] + [
            os.path.join("api", f) for f in os.listdir(os.path.join(WORKFLOWS, "api")) if f.endswith(".json")]:
        with open(os.path.join(WORKFLOWS, rel), encoding="utf-8") as f:
            on_disk[rel] = f.read()
    assert set(on_disk) == set(expected)
    stale = [rel for rel in expected if on_disk[rel] != expected[rel]]
    assert stale == [], "run python tools/make_workflows.py"


DUMP_CORE_NODES = """
import json, sys
sys.argv = sys.argv[:1] + ["--cpu"]
sys.path.insert(0, ".")
import comfy.options
comfy.options.enable_args_parsing()
import nodes
out = {}
for name in json.loads(sys.stdin.read()):
    cls = nodes.NODE_CLASS_MAPPINGS.get(name)
    out[name] = None if cls is None else {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)}
print("CORE_NODES_JSON " + json.dumps(out, default=repr))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set: core nodes are checked "
                    "against the committed list only")
def test_core_node_list_matches_the_comfyui_checkout():
    from ..host.comfyui_server import comfyui_python  # the host tests' choice of ComfyUI's Python

    comfyui = os.environ["COMFYUI_PATH"]
    run = subprocess.run([comfyui_python(), "-c", DUMP_CORE_NODES], input=json.dumps(sorted(CORE_NODES)),
                         cwd=comfyui, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("CORE_NODES_JSON ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    real = json.loads(lines[-1].split(" ", 1)[1])
    for name, (inputs, outputs) in CORE_NODES.items():
        assert real[name] is not None, f"ComfyUI has no node {name}"
        assert real[name]["output"] == list(outputs), name
        for section, entries in inputs.items():
            theirs = real[name]["input"][section]
            assert list(theirs)[: len(entries)] == list(entries), (name, section)
            for input_name, value in entries.items():
                kind, options = value[0], (value[1] if len(value) > 1 else {})
                their_kind = theirs[input_name][0]
                their_options = theirs[input_name][1] if len(theirs[input_name]) > 1 else {}
                if kind == FILES:
                    assert isinstance(their_kind, list), (name, input_name)
                else:
                    assert their_kind == kind, (name, input_name)
                for key in ("min", "max", "step"):
                    assert their_options.get(key) == options.get(key), (name, input_name, key)


@pytest.mark.parametrize("name", NAMES)
def test_a_depth_map_is_turned_round_by_one_control_only(name, specs):
    # The Normalise node's own invert switch and Apply ControlNet's depth_invert used to cancel each other.
    controls = [(node["type"], w) for node in load(f"{name}.json")["nodes"] for w in specs[node["type"]].widgets
                if "invert" in w]
    assert controls in ([], [("SD35ControlNetApply", "depth_invert")]), controls
