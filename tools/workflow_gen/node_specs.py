"""What the UI format needs to know about each node type: its sockets, widgets, outputs and widget defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from .pack import load_pack

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
    "ConditioningSetArea": {"inputs": [("conditioning", "CONDITIONING")],
                            "widgets": ["width", "height", "x", "y", "strength"],
                            "outputs": [("CONDITIONING", "CONDITIONING")]},
    "ConditioningCombine": {"inputs": [("conditioning_1", "CONDITIONING"), ("conditioning_2", "CONDITIONING")],
                            "widgets": [], "outputs": [("CONDITIONING", "CONDITIONING")]},
}
FRONTEND_ONLY = {"Note"}
NOT_SENT = {"upload"}  # widgets the frontend does not send with the prompt


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
