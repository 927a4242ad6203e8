"""Write the shipped workflows: ``workflows/*.json`` (ComfyUI UI format) and ``workflows/api/*.json`` (API format).

Every setting comes from one of two sources: the recommended-settings table (``sd35_core/defaults.py``) and the
node classes' own ``INPUT_TYPES`` (input order, widget defaults). Run it after changing either:

    python tools/make_workflows.py            # rewrite the JSON files
    python tools/make_workflows.py --check    # exit 1 if the committed files differ from what it would write

The output is deterministic, so ``tests/workflows`` can compare the committed files with it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import uuid
from dataclasses import dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows")
PACK_NAME = "comfyui_sd35"
UUID_NAMESPACE = uuid.UUID("6f1d3c1e-5d35-4c8a-9a35-000000000035")  # stable workflow ids

SCALAR_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# The few ComfyUI core nodes the workflows use: sockets and widgets in ComfyUI's INPUT_TYPES order.
# (tests/workflows checks these against a ComfyUI checkout when COMFYUI_PATH is set.)
CORE_NODES = {
    "SaveImage": {"inputs": [("images", "IMAGE")], "widgets": ["filename_prefix"], "outputs": []},
    "PreviewImage": {"inputs": [("images", "IMAGE")], "widgets": [], "outputs": []},
    # The upload button after the file name is a widget too; its saved value is always "image".
    "LoadImage": {"inputs": [], "widgets": ["image", "upload"], "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "ImageScale": {"inputs": [("image", "IMAGE")], "widgets": ["upscale_method", "width", "height", "crop"],
                   "outputs": [("IMAGE", "IMAGE")]},
    "ImagePadForOutpaint": {"inputs": [("image", "IMAGE")], "widgets": ["left", "top", "right", "bottom",
                                                                       "feathering"],
                            "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "Note": {"inputs": [], "widgets": ["text"], "outputs": []},  # frontend-only: not sent to the server
    "CheckpointLoaderSimple": {"inputs": [], "widgets": ["ckpt_name"],
                               "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]},
    "LoraLoaderModelOnly": {"inputs": [("model", "MODEL")], "widgets": ["lora_name", "strength_model"],
                            "outputs": [("MODEL", "MODEL")]},
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "widgets": [], "outputs": [("IMAGE", "IMAGE")]},
}
FRONTEND_ONLY = {"Note"}
NOT_SENT = {"upload"}  # widgets the frontend does not send with the prompt

POSITIVE_COLORS = {"color": "#232", "bgcolor": "#353"}
NEGATIVE_COLORS = {"color": "#322", "bgcolor": "#533"}
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}
GROUP_COLORS = {"models": "#3f789e", "prompt": "#3f7e4c", "image": "#88698a", "sample": "#8a6e3f", "save": "#444"}

PROMPT = ("a red fox sitting in a snowy birch forest at dawn, soft golden light through the trees, "
          "detailed fur, shallow depth of field, photograph")
CONTROL_PROMPT = ("a cozy cabin by a mountain lake at sunset, warm light in the windows, detailed, "
                  "photograph")
IMAGE_NAME = "example.png"  # LoadImage's file in ComfyUI's input folder: choose your own image there
SEED = 42

CHECKPOINTS = {
    "sd3_medium": ("sd3_medium.safetensors", "stabilityai/stable-diffusion-3-medium"),
    "sd3.5_medium": ("sd3.5_medium.safetensors", "stabilityai/stable-diffusion-3.5-medium"),
    "sd3.5_large": ("sd3.5_large.safetensors", "stabilityai/stable-diffusion-3.5-large"),
    "sd3.5_large_turbo": ("sd3.5_large_turbo.safetensors", "stabilityai/stable-diffusion-3.5-large-turbo"),
}
TEXT_ENCODERS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
CONTROLNET_REPO = "stabilityai/stable-diffusion-3.5-controlnets"


# ------------------------------------------------------------------------------------------- node specs

def load_pack():
    """Import the pack folder as package ``comfyui_sd35`` (as ComfyUI does; never as a top-level ``nodes``)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


def defaults_table():
    """The recommended settings (``sd35_core.defaults.DEFAULTS``), from the imported pack."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.sd35_core.defaults").DEFAULTS


def is_widget(kind) -> bool:
    """Whether an input of this type is a widget on the node (else it is a socket)."""
    return isinstance(kind, list) or kind in SCALAR_TYPES


@dataclass(frozen=True)
class NodeSpec:
    """What the UI format needs to know about a node type."""

    sockets: tuple[tuple[str, str, bool], ...]  # (name, type, optional) in input order
    widgets: tuple[str, ...]  # widget names in order, "control_after_generate" included
    outputs: tuple[tuple[str, str], ...]  # (name, type)
    defaults: dict = field(default_factory=dict)  # widget name -> default value


def node_spec(node_type: str) -> NodeSpec:
    """The sockets, widgets and outputs of ``node_type`` (the pack's INPUT_TYPES or the core list above)."""
    if node_type in CORE_NODES:
        core = CORE_NODES[node_type]
        return NodeSpec(tuple((n, t, False) for n, t in core["inputs"]), tuple(core["widgets"]),
                        tuple(core["outputs"]))
    cls = load_pack().NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets, defaults = [], [], {}
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, options = value[0], (value[1] if len(value) > 1 else {})
            if is_widget(kind) and not options.get("forceInput"):
                widgets.append(name)
                if "default" in options:
                    defaults[name] = options["default"]
                elif isinstance(kind, list) and kind:
                    defaults[name] = kind[0]
                elif kind == "STRING":
                    defaults[name] = ""
                if options.get("control_after_generate"):
                    widgets.append("control_after_generate")
                    defaults["control_after_generate"] = "fixed"
            else:
                sockets.append((name, kind, section == "optional"))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return NodeSpec(tuple(sockets), tuple(widgets), tuple(zip(names, cls.RETURN_TYPES, strict=True)), defaults)


# ------------------------------------------------------------------------------------------- graph builder

@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    values: dict
    title: str | None = None
    colors: dict | None = None
    links_in: dict = field(default_factory=dict)  # input name -> link id
    links_out: dict = field(default_factory=dict)  # output slot -> [link ids]


class Workflow:
    """Builds one workflow in both formats from nodes and connections."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, pos, size, /, title: str | None = None, colors: dict | None = None,
            **values) -> Node:
        spec = node_spec(node_type)
        unknown = set(values) - set(spec.widgets)
        if unknown:
            raise ValueError(f"{node_type}: no widget named {', '.join(sorted(unknown))}")
        full = {w: values.get(w, spec.defaults.get(w)) for w in spec.widgets}
        missing = [w for w, v in full.items() if v is None]
        if missing:
            raise ValueError(f"{node_type}: give a value for {', '.join(missing)}")
        node = Node(len(self.nodes) + 1, node_type, tuple(pos), tuple(size), full, title, colors)
        self.nodes.append(node)
        return node

    def connect(self, source: Node, output: str, target: Node, input_name: str) -> None:
        outputs = node_spec(source.type).outputs
        slot = [n for n, _ in outputs].index(output)
        kind = outputs[slot][1]
        link_id = len(self.links) + 1
        target_slot = [s[0] for s in node_spec(target.type).sockets].index(input_name)
        self.links.append([link_id, source.id, slot, target.id, target_slot, kind])
        target.links_in[input_name] = link_id
        source.links_out.setdefault(slot, []).append(link_id)

    def group(self, title: str, color: str, nodes: list[Node], pad: float = 20.0) -> None:
        """A group framing ``nodes``: a node's position is the top-left of its body, its title bar sits 30 px
        above that, and the group's own title takes about 36 px."""
        left = min(n.pos[0] for n in nodes) - pad
        top = min(n.pos[1] for n in nodes) - 30 - pad - 36
        right = max(n.pos[0] + n.size[0] for n in nodes) + pad
        bottom = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left,
                            bottom - top], "color": color, "font_size": 24, "flags": {}})

    # ---------------------------------------------------------------------------------------- formats

    def _order(self) -> dict[int, int]:
        """Execution order as the frontend saves it: a topological order, sources first."""
        incoming = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and incoming[n.id] <= done]
            for node_id in ready:
                order[node_id] = len(order)
                done.add(node_id)
        return order

    def ui(self) -> dict:
        order = self._order()
        nodes = []
        for n in self.nodes:
            spec = node_spec(n.type)
            inputs = []
            for name, kind, optional in spec.sockets:
                entry = {"name": name, "type": kind}
                if optional:
                    entry["shape"] = 7
                entry["link"] = n.links_in.get(name)
                inputs.append(entry)
            outputs = [{"name": name, "type": kind, "links": n.links_out.get(slot, []), "slot_index": slot}
                       for slot, (name, kind) in enumerate(spec.outputs)]
            entry = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                     "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs}
            if n.title:
                entry["title"] = n.title
            entry["properties"] = {} if n.type in FRONTEND_ONLY else {"Node name for S&R": n.type}
            entry["widgets_values"] = list(n.values.values())
            if n.colors:
                entry.update(n.colors)
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(UUID_NAMESPACE, self.name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": self._view()},
            "version": 0.4,
        }

    def _view(self, screen=(1450.0, 900.0), margin=(90.0, 90.0), min_scale=0.65) -> dict:
        """Canvas scale and offset that show the groups on a typical screen (the frontend's ``ds``).

        Never below ``min_scale``: under about 0.6 the frontend draws nodes without their text.
        """
        left = min(g["bounding"][0] for g in self.groups)
        top = min(g["bounding"][1] for g in self.groups)
        right = max(g["bounding"][0] + g["bounding"][2] for g in self.groups)
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in self.groups)
        scale = round(max(min_scale, min(1.0, screen[0] / (right - left), screen[1] / (bottom - top))), 3)
        return {"scale": scale, "offset": [round(margin[0] / scale - left, 1), round(margin[1] / scale - top, 1)]}

    def api(self) -> dict:
        prompt = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            inputs = {k: v for k, v in n.values.items() if k != "control_after_generate" and k not in NOT_SENT}
            for name, link_id in n.links_in.items():
                link = self.links[link_id - 1]
                inputs[name] = [str(link[1]), link[2]]
            default_title = load_pack().NODE_DISPLAY_NAME_MAPPINGS.get(n.type, n.type)
            prompt[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title or default_title}}
        return prompt


# ------------------------------------------------------------------------------------------- the workflows

def _settings_text(d, slg: bool) -> str:
    text = (f"{d.label}: {d.steps} steps, cfg {d.slg.cfg if slg and d.slg else d.cfg:g}, sampler {d.sampler}, "
            f"shift {d.shift:g}, schedule {d.schedule}")
    if slg and d.slg:
        text += (f", skip-layer guidance on layers {','.join(map(str, d.slg.layers))} at scale {d.slg.scale:g} "
                 f"from {d.slg.start:.0%} to {d.slg.end:.0%} of the steps (cfg {d.cfg:g} without it)")
    return text + "."


def _note(title: str, variant: str, settings, *, slg=False, controlnet: str | None = None, extra: str = "") -> str:
    ckpt, repo = CHECKPOINTS[variant]
    lines = [
        title,
        "",
        "Model files (in ComfyUI's models folder):",
        f"- models/checkpoints/{ckpt} (from {repo}; it holds the VAE). A bare diffusion model file in "
        "models/diffusion_models works too, with a VAE from models/vae and SD3.5 VAE Loader.",
        f"- models/text_encoders/{TEXT_ENCODERS[0]}, {TEXT_ENCODERS[1]} and {TEXT_ENCODERS[2]} (the "
        "text_encoders folder of the same repository; t5xxl_fp8_e4m3fn.safetensors works too, and T5 may be "
        "set to none to save memory).",
    ]
    if controlnet:
        lines.append(f"- models/controlnet/sd3.5_large_controlnet_{controlnet}.safetensors (from {CONTROLNET_REPO}).")
    lines += [
        "",
        "Recommended settings (Stability's reference, from the pack's defaults table): "
        + _settings_text(settings, slg),
        "The sampler's preset control fills them in (after one run, 'detected model' picks the loaded model's).",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


# Vertical room between nodes in a column: the next node's title bar plus the badge the frontend draws over it.
GAP = 70
COLUMN_GAP = 60


class Column:
    """Stacks nodes top to bottom at one x position."""

    def __init__(self, wf: Workflow, x: float, width: float, y: float = 0.0):
        self.wf, self.x, self.width, self.y = wf, x, width, y

    def add(self, node_type: str, node_height: float, /, **kw) -> Node:
        node = self.wf.add(node_type, (self.x, self.y), (self.width, node_height), **kw)
        self.y += node_height + GAP
        return node

    def next(self, width: float) -> Column:
        """The column to the right of this one."""
        return Column(self.wf, self.x + self.width + COLUMN_GAP, width)


# Node heights leave room for the lines the frontend extension adds once a loader has run.
HEIGHTS = {"CheckpointLoaderSimple": 130, "LoraLoaderModelOnly": 110, "VAEDecode": 80,
           "SD35CheckpointLoader": 200, "SD35TextEncoderLoader": 200, "SD35ControlNetLoader": 130,
           "SD35TextEncode": 300, "SD35EmptyLatent": 130, "SD35Sampler": 560, "SD35VAEDecode": 140,
           "SD35VAEEncode": 140, "SD35ControlNetApply": 260, "SaveImage": 560, "LoadImage": 420,
           "ImageScale": 160, "PreviewImage": 380, "SD35CannyPreprocessor": 110, "SD35BlurPreprocessor": 90,
           "SD35DepthNormalize": 90, "SD35LoraLoader": 200, "SD35VAEEncodeForInpaint": 170,
           "ImagePadForOutpaint": 200}


def _loaders(col: Column, variant: str):
    ckpt = col.add("SD35CheckpointLoader", HEIGHTS["SD35CheckpointLoader"], title="Load checkpoint",
                   ckpt_name=CHECKPOINTS[variant][0], weight_dtype="default")
    clip = col.add("SD35TextEncoderLoader", HEIGHTS["SD35TextEncoderLoader"], title="Load text encoders",
                   clip_l_name=TEXT_ENCODERS[0], clip_g_name=TEXT_ENCODERS[1], t5xxl_name=TEXT_ENCODERS[2],
                   device="default", weight_dtype="default")
    return ckpt, clip


def _prompts(col: Column, clip: Node, text: str):
    pos = col.add("SD35TextEncode", HEIGHTS["SD35TextEncode"], title="Positive prompt", colors=POSITIVE_COLORS,
                  text=text)
    neg = col.add("SD35TextEncode", HEIGHTS["SD35TextEncode"], title="Negative prompt", colors=NEGATIVE_COLORS,
                  text="")
    col.wf.connect(clip, "clip", pos, "clip")
    col.wf.connect(clip, "clip", neg, "clip")
    return pos, neg


def _size(col: Column, ckpt: Node) -> Node:
    latent = col.add("SD35EmptyLatent", HEIGHTS["SD35EmptyLatent"], title="Image size", width=1024, height=1024,
                     batch_size=1)
    col.wf.connect(ckpt, "model", latent, "model")  # checks the size against the model before sampling
    return latent


def _sampler(col: Column, settings, inputs, *, slg=False, denoise=1.0) -> Node:
    values = dict(seed=SEED, control_after_generate="fixed", steps=settings.steps, cfg=settings.cfg,
                  sampler=settings.sampler, schedule=settings.schedule, shift=settings.shift, denoise=denoise,
                  slg_scale=0.0, slg_window="steps", seed_mode="batch")
    if slg and settings.slg:
        s = settings.slg
        values.update(cfg=s.cfg, slg_layers=",".join(map(str, s.layers)), slg_scale=s.scale, slg_start=s.start,
                      slg_end=s.end)
    sampler = col.add("SD35Sampler", HEIGHTS["SD35Sampler"], title="Sampler", **values)
    for name, (source, output) in inputs.items():
        col.wf.connect(source, output, sampler, name)
    return sampler


def _decode_save(col: Column, sampler: Node, ckpt: Node, prefix: str):
    decode = col.add("SD35VAEDecode", HEIGHTS["SD35VAEDecode"], title="Decode")
    save = col.add("SaveImage", HEIGHTS["SaveImage"], title="Save image", filename_prefix=prefix)
    col.wf.connect(sampler, "latent", decode, "samples")
    col.wf.connect(ckpt, "vae", decode, "vae")
    col.wf.connect(decode, "image", save, "images")
    return decode, save


def _note_node(col: Column, text: str) -> Node:
    height = 60 + 15 * sum(1 + len(line) // 52 for line in text.split("\n"))  # about 52 characters a line
    return col.add("Note", height, title="Read me", colors=NOTE_COLORS, text=text)


def txt2img(name: str, variant: str, title: str, *, slg: bool = False) -> Workflow:
    d = defaults_table()[variant]
    wf = Workflow(name)
    models = Column(wf, 0, 360)
    note = _note_node(models, _note(title, variant, d, slg=slg))
    ckpt, clip = _loaders(models, variant)
    prompt = models.next(380)
    pos, neg = _prompts(prompt, clip, PROMPT)
    latent = _size(prompt, ckpt)
    sample = prompt.next(340)
    sampler = _sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                   "negative": (neg, "conditioning"), "latent": (latent, "latent")}, slg=slg)
    decode, save = _decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


LORA_NAME = "your_sd3.5_large_lora.safetensors"


def lora(name: str, variant: str, title: str) -> Workflow:
    """Text to image through one SD3.5 LoRA Loader on both the model and the text encoders."""
    d = defaults_table()[variant]
    wf = Workflow(name)
    models = Column(wf, 0, 360)
    extra = ("LoRA: put an SD3.5 Large LoRA in models/loras and pick it in Load LoRA (kohya, diffusers/PEFT, "
             "OneTrainer and SimpleTuner LyCORIS files all load; LoHa, LoKr and DoRA too). strength_model and "
             "strength_clip set how strongly it applies to the diffusion model and the text encoders; chain more "
             "LoRA nodes for more LoRAs. Add the LoRA's trigger words to the prompt.")
    note = _note_node(models, _note(title, variant, d, extra=extra))
    ckpt, clip = _loaders(models, variant)
    loader = models.add("SD35LoraLoader", HEIGHTS["SD35LoraLoader"], title="Load LoRA", lora_name=LORA_NAME,
                        strength_model=1.0, strength_clip=1.0)
    wf.connect(ckpt, "model", loader, "model")
    wf.connect(clip, "clip", loader, "clip")
    prompt = models.next(380)
    pos, neg = _prompts(prompt, loader, PROMPT)
    latent = _size(prompt, ckpt)
    sample = prompt.next(340)
    sampler = _sampler(sample, d, {"model": (loader, "model"), "positive": (pos, "conditioning"),
                                   "negative": (neg, "conditioning"), "latent": (latent, "latent")})
    decode, save = _decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Models and LoRA", GROUP_COLORS["models"], [note, ckpt, clip, loader])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


def img2img(name: str, variant: str, title: str) -> Workflow:
    d = defaults_table()[variant]
    wf = Workflow(name)
    extra = (f"Image: put your picture in ComfyUI's input folder and pick it in Load image (the workflow names "
             f"{IMAGE_NAME}), or drop it on the node. It is scaled to 1024x1024 (centre crop) and encoded; denoise "
             "0.8 (the reference's default) keeps the composition, lower keeps more of the picture.")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load image", image=IMAGE_NAME, upload="image")
    scale = source.add("ImageScale", HEIGHTS["ImageScale"], title="Scale to 1024x1024", upscale_method="lanczos",
                       width=1024, height=1024, crop="center")
    encode = source.add("SD35VAEEncode", HEIGHTS["SD35VAEEncode"], title="Encode image")
    models = source.next(360)
    note = _note_node(models, _note(title, variant, d, extra=extra))
    ckpt, clip = _loaders(models, variant)
    wf.connect(image, "IMAGE", scale, "image")
    wf.connect(scale, "IMAGE", encode, "pixels")
    wf.connect(ckpt, "vae", encode, "vae")
    prompt = models.next(380)
    pos, neg = _prompts(prompt, clip, PROMPT)
    sample = prompt.next(340)
    sampler = _sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                   "negative": (neg, "conditioning"), "latent": (encode, "latent")}, denoise=0.8)
    decode, save = _decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Input image", GROUP_COLORS["image"], [image, scale, encode])
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Prompt", GROUP_COLORS["prompt"], [pos, neg])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


INPAINT_PROMPT = "a vase of sunflowers on the table, soft window light, photograph"
OUTPAINT_PROMPT = "a wide mountain valley at dawn, mist over a river, pine forests, photograph"


def _masked(name: str, variant: str, title: str, *, outpaint: bool) -> Workflow:
    """Inpainting (the mask painted on Load image) or outpainting (Pad image for outpainting's mask)."""
    d = defaults_table()[variant]
    wf = Workflow(name)
    if outpaint:
        extra = (f"Image: put your picture in ComfyUI's input folder and pick it in Load image (the workflow names "
                 f"{IMAGE_NAME}). Pad image for outpainting adds the new canvas (here 256 pixels on the right; "
                 "left, top, right and bottom are in steps of 8) and a mask over it that fades into the picture "
                 "over the feathering width. SD3.5 VAE Encode (for Inpainting) greys the new part, grows the "
                 "mask by 8 pixels and attaches it to the latent; the sampler paints the new part from noise "
                 "(denoise 1) and keeps the picture. Keep the padded size near one megapixel.")
    else:
        extra = (f"Image and mask: put your picture in ComfyUI's input folder and pick it in Load image (the workflow "
                 f"names {IMAGE_NAME}); then right-click the node, Open in MaskEditor, paint over what should be "
                 "repainted and save. An image with transparency works the same way (transparent = repaint). "
                 "SD3.5 VAE Encode (for Inpainting) greys the masked part, grows the mask by 6 pixels and "
                 "attaches it to the latent; the sampler repaints it from noise (denoise 1) and keeps the rest, "
                 "as ComfyUI's own inpainting does. The picture keeps its size (cropped to a multiple of 16): "
                 "about one megapixel suits SD3.5. For a lighter touch that keeps the old content, use SD3.5 VAE "
                 "Encode with Set Latent Noise Mask and a denoise below 1; the sampler's mask_mode differential "
                 "treats a soft mask as a per-pixel strength.")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load image", image=IMAGE_NAME, upload="image")
    pixels, mask = (image, "IMAGE"), (image, "MASK")
    nodes = [image]
    if outpaint:
        pad = source.add("ImagePadForOutpaint", HEIGHTS["ImagePadForOutpaint"], title="Pad image for outpainting",
                         left=0, top=0, right=256, bottom=0, feathering=40)
        wf.connect(image, "IMAGE", pad, "image")
        pixels, mask = (pad, "IMAGE"), (pad, "MASK")
        nodes.append(pad)
    encode = source.add("SD35VAEEncodeForInpaint", HEIGHTS["SD35VAEEncodeForInpaint"], title="Encode for inpainting",
                        grow_mask_by=8 if outpaint else 6)
    nodes.append(encode)
    models = source.next(360)
    note = _note_node(models, _note(title, variant, d, extra=extra))
    ckpt, clip = _loaders(models, variant)
    wf.connect(*pixels, encode, "pixels")
    wf.connect(ckpt, "vae", encode, "vae")
    wf.connect(*mask, encode, "mask")
    prompt = models.next(380)
    pos, neg = _prompts(prompt, clip, OUTPAINT_PROMPT if outpaint else INPAINT_PROMPT)
    sample = prompt.next(340)
    sampler = _sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                   "negative": (neg, "conditioning"), "latent": (encode, "latent")})
    decode, save = _decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Image and mask", GROUP_COLORS["image"], nodes)
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Prompt", GROUP_COLORS["prompt"], [pos, neg])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


PREPROCESSORS = {
    "canny": ("SD35CannyPreprocessor", "Canny edges", {}, "The photo's edges are found with Canny (thresholds "
              "100/200 as on the model card); the preview shows them. To use a ready-made edge map, connect "
              "Load image straight to Apply ControlNet."),
    "blur": ("SD35BlurPreprocessor", "Blur", {}, "The photo is blurred (kernel 50 as on the model card); the "
             "result follows its colours and layout. Useful for upscaling and re-rendering."),
    "depth": ("SD35DepthNormalize", "Normalise depth map", {}, "Load a depth map. The SD3.5 depth ControlNet "
              "was trained with near = dark; maps from Depth Anything or MiDaS draw near = bright. Apply "
              "ControlNet's depth_invert (the one inversion control) is auto: it turns a near = bright map round; "
              "set it to off or on to force it."),
}


def controlnet(name: str, control: str, title: str) -> Workflow:
    variant = "sd3.5_large"
    d = defaults_table()[f"{variant}_controlnet_{control}"]
    node_type, node_title, values, how = PREPROCESSORS[control]
    wf = Workflow(name)
    extra = (f"Control image: put it in ComfyUI's input folder and pick it in Load control image (the workflow "
             f"names {IMAGE_NAME}). {how} It is fitted to the generation size by Apply ControlNet's "
             f"resize_mode (crop: its middle at the generation's aspect ratio).")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load control image", image=IMAGE_NAME,
                       upload="image")
    prep = source.add(node_type, HEIGHTS[node_type], title=node_title, **values)
    preview = source.add("PreviewImage", HEIGHTS["PreviewImage"], title="Control image preview")
    wf.connect(image, "IMAGE", prep, "image")
    wf.connect(prep, "image", preview, "images")
    models = source.next(360)
    note = _note_node(models, _note(title, variant, d, controlnet=control, extra=extra))
    ckpt, clip = _loaders(models, variant)
    cn_loader = models.add("SD35ControlNetLoader", HEIGHTS["SD35ControlNetLoader"], title="Load ControlNet",
                           control_net_name=f"sd3.5_large_controlnet_{control}.safetensors", weight_dtype="default")
    wf.connect(ckpt, "model", cn_loader, "model")
    prompt = models.next(380)
    pos, neg = _prompts(prompt, clip, CONTROL_PROMPT)
    latent = _size(prompt, ckpt)
    sample = prompt.next(340)
    apply = sample.add("SD35ControlNetApply", HEIGHTS["SD35ControlNetApply"], title="Apply ControlNet",
                       strength=1.0, start_percent=0.0, end_percent=1.0, control_type=control, depth_invert="auto",
                       resize_mode="crop")
    for source_node, out, inp in ((pos, "conditioning", "positive"), (neg, "conditioning", "negative"),
                                  (cn_loader, "control_net", "control_net"), (ckpt, "vae", "vae"),
                                  (prep, "image", "image")):
        wf.connect(source_node, out, apply, inp)
    sampler = _sampler(sample, d, {"model": (ckpt, "model"), "positive": (apply, "positive"),
                                   "negative": (apply, "negative"), "latent": (latent, "latent")})
    decode, save = _decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Control image", GROUP_COLORS["image"], [image, prep, preview])
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip, cn_loader])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("ControlNet and sampler", GROUP_COLORS["sample"], [apply, sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


LORA_NAME = "sd3.5_large_lora.safetensors"  # a placeholder: choose your LoRA in the node


def native_lora_controlnet(name: str, title: str) -> Workflow:
    """ComfyUI's own loader and LoRA loader feeding this pack's sampler (SLG) and canny ControlNet."""
    variant, control = "sd3.5_large", "canny"
    base = defaults_table()[f"{variant}_controlnet_{control}"]
    # SLG with SD3.5 Medium's reference layers and window (the reference recommends none for Large), at the
    # ControlNet's cfg.
    d = replace(base, slg=replace(defaults_table()["sd3.5_medium"].slg, cfg=base.cfg))
    node_type, node_title, values, how = PREPROCESSORS[control]
    wf = Workflow(name)
    extra = ("Mixing ComfyUI's nodes with this pack's: ComfyUI's Load Checkpoint and LoRA loader make the MODEL "
             f"(your LoRA goes in models/loras/; the workflow names models/loras/{LORA_NAME}), this pack's "
             "sampler runs it with the reference schedule, skip-layer guidance (SD3.5 Medium's layers 7,8,9: "
             "tune them for Large) and the reference-faithful ControlNet, and ComfyUI's VAE Decode makes the "
             "picture. Control image: put "
             f"it in ComfyUI's input folder and pick it in Load control image (the workflow names {IMAGE_NAME}). "
             f"{how}")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load control image", image=IMAGE_NAME,
                       upload="image")
    prep = source.add(node_type, HEIGHTS[node_type], title=node_title, **values)
    preview = source.add("PreviewImage", HEIGHTS["PreviewImage"], title="Control image preview")
    wf.connect(image, "IMAGE", prep, "image")
    wf.connect(prep, "image", preview, "images")
    models = source.next(360)
    note = _note_node(models, _note(title, variant, d, slg=True, controlnet=control, extra=extra))
    ckpt = models.add("CheckpointLoaderSimple", HEIGHTS["CheckpointLoaderSimple"], title="Load Checkpoint (ComfyUI)",
                      ckpt_name=CHECKPOINTS[variant][0])
    lora = models.add("LoraLoaderModelOnly", HEIGHTS["LoraLoaderModelOnly"], title="Load LoRA (ComfyUI)",
                      lora_name=LORA_NAME, strength_model=1.0)
    clip = models.add("SD35TextEncoderLoader", HEIGHTS["SD35TextEncoderLoader"], title="Load text encoders",
                      clip_l_name=TEXT_ENCODERS[0], clip_g_name=TEXT_ENCODERS[1], t5xxl_name=TEXT_ENCODERS[2],
                      device="default", weight_dtype="default")
    cn_loader = models.add("SD35ControlNetLoader", HEIGHTS["SD35ControlNetLoader"], title="Load ControlNet",
                           control_net_name=f"sd3.5_large_controlnet_{control}.safetensors", weight_dtype="default")
    wf.connect(ckpt, "MODEL", lora, "model")
    wf.connect(lora, "MODEL", cn_loader, "model")
    prompt = models.next(380)
    pos, neg = _prompts(prompt, clip, CONTROL_PROMPT)
    latent = prompt.add("SD35EmptyLatent", HEIGHTS["SD35EmptyLatent"], title="Image size", width=1024, height=1024,
                        batch_size=1)
    wf.connect(lora, "MODEL", latent, "model")
    sample = prompt.next(340)
    apply = sample.add("SD35ControlNetApply", HEIGHTS["SD35ControlNetApply"], title="Apply ControlNet",
                       strength=1.0, start_percent=0.0, end_percent=1.0, control_type=control, depth_invert="auto")
    for source_node, out, inp in ((pos, "conditioning", "positive"), (neg, "conditioning", "negative"),
                                  (cn_loader, "control_net", "control_net"), (ckpt, "VAE", "vae"),
                                  (prep, "image", "image")):
        wf.connect(source_node, out, apply, inp)
    sampler = _sampler(sample, d, {"model": (lora, "MODEL"), "positive": (apply, "positive"),
                                   "negative": (apply, "negative"), "latent": (latent, "latent")}, slg=True)
    out = sample.next(400)
    decode = out.add("VAEDecode", HEIGHTS["VAEDecode"], title="VAE Decode (ComfyUI)")
    save = out.add("SaveImage", HEIGHTS["SaveImage"], title="Save image", filename_prefix=f"sd35/{name}")
    wf.connect(sampler, "latent", decode, "samples")
    wf.connect(ckpt, "VAE", decode, "vae")
    wf.connect(decode, "IMAGE", save, "images")
    wf.group("Control image", GROUP_COLORS["image"], [image, prep, preview])
    wf.group("Models (ComfyUI loader and LoRA)", GROUP_COLORS["models"], [note, ckpt, lora, clip, cn_loader])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("ControlNet and sampler", GROUP_COLORS["sample"], [apply, sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


TINY_CHECKPOINT = "tiny_shapes_sd35.safetensors"  # ships with the pack (assets/tiny_shapes): no download
TINY_PROMPT = "a red circle on the left of a blue background"


def tiny_shapes(name: str, title: str) -> Workflow:
    """Text to image with the bundled tiny shapes model: runs in a fresh ComfyUI with nothing downloaded."""
    d = defaults_table()["tiny_shapes_sd35"]
    wf = Workflow(name)
    models = Column(wf, 0, 360)
    note = _note_node(models, "\n".join([
        title,
        "",
        f"Model: {TINY_CHECKPOINT}, bundled with the pack (listed by the checkpoint loader after ComfyUI's own "
        "files). It is a toy: SD3.5 Medium's architecture at toy size, trained in the pack's repository on 64x64 "
        "pictures of one shape on a plain background. Its text encoders are inside the checkpoint and its "
        "tokenizers beside it.",
        "",
        "Prompts: 'a {color} {shape} on the {position} of a {background} background' with colours red, green, "
        "blue, yellow, white, black, orange, purple; shapes circle, square, triangle; positions left, right, "
        "top, bottom, center. Images are 64x64.",
        "",
        "Recommended settings (the pack's defaults table): " + _settings_text(d, False),
    ]))
    ckpt = models.add("SD35CheckpointLoader", HEIGHTS["SD35CheckpointLoader"], title="Load checkpoint",
                      ckpt_name=TINY_CHECKPOINT, weight_dtype="default")
    prompt = models.next(380)
    pos, neg = _prompts(prompt, ckpt, TINY_PROMPT)
    latent = prompt.add("SD35EmptyLatent", HEIGHTS["SD35EmptyLatent"], title="Image size", width=64, height=64,
                        batch_size=1)
    wf.connect(ckpt, "model", latent, "model")
    sample = prompt.next(340)
    sampler = _sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                   "negative": (neg, "conditioning"), "latent": (latent, "latent")})
    decode, save = _decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Model", GROUP_COLORS["models"], [note, ckpt])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


def build_workflows() -> dict[str, Workflow]:
    """Every shipped workflow by file name (without ``.json``)."""
    flows = [
        txt2img("sd3.5_medium_txt2img_slg", "sd3.5_medium", "SD3.5 Medium text to image with skip-layer guidance",
                slg=True),
        txt2img("sd3.5_large_txt2img", "sd3.5_large", "SD3.5 Large text to image"),
        txt2img("sd3.5_large_turbo_txt2img", "sd3.5_large_turbo", "SD3.5 Large Turbo text to image (4 steps)"),
        txt2img("sd3_medium_txt2img", "sd3_medium", "SD3 Medium text to image"),
        img2img("sd3.5_large_img2img", "sd3.5_large", "SD3.5 Large image to image"),
        lora("sd3.5_large_lora", "sd3.5_large", "SD3.5 Large text to image with a LoRA"),
        _masked("sd3.5_large_inpaint", "sd3.5_large", "SD3.5 Large inpainting (repaint a masked part)",
                outpaint=False),
        _masked("sd3.5_large_outpaint", "sd3.5_large", "SD3.5 Large outpainting (extend the canvas)", outpaint=True),
        tiny_shapes("tiny_shapes_txt2img", "Tiny shapes text to image (the bundled toy model, no downloads)"),
        controlnet("sd3.5_large_controlnet_canny", "canny", "SD3.5 Large with the canny ControlNet"),
        controlnet("sd3.5_large_controlnet_blur", "blur", "SD3.5 Large with the blur ControlNet"),
        controlnet("sd3.5_large_controlnet_depth", "depth", "SD3.5 Large with the depth ControlNet"),
        native_lora_controlnet("sd3.5_large_native_lora_controlnet",
                               "ComfyUI's SD3.5 Large + LoRA in the SD3.5 sampler with SLG and the canny ControlNet"),
    ]
    return {wf.name: wf for wf in flows}


def rendered() -> dict[str, str]:
    """Relative path -> file text for every workflow file."""
    files = {}
    for name, wf in build_workflows().items():
        files[f"{name}.json"] = json.dumps(wf.ui(), indent=2) + "\n"
        files[os.path.join("api", f"{name}.json")] = json.dumps(wf.api(), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    parser.add_argument("--out", default=WORKFLOWS, help="folder to write (default: the pack's workflows/)")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in rendered().items():
        path = os.path.join(args.out, rel)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
