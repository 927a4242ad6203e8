"""The node classes' V1 API: what ComfyUI reads from them, and what the pack registers."""

import inspect
import os

import pytest
import torch

STANDARD_TYPES = {"LATENT", "IMAGE", "MASK", "CONDITIONING", "INT", "FLOAT", "STRING", "BOOLEAN", "MODEL", "VAE"}
OWN_TYPES = {"SD35_MODEL", "SD35_CLIP", "SD35_VAE", "SD35_CONTROLNET", "SD35_IPADAPTER", "SD35_CLIP_VISION"}
EXPECTED_NODES = {
    "SD35CheckpointLoader", "SD35TextEncoderLoader", "SD35VAELoader", "SD35ControlNetLoader", "SD35TextEncode",
    "SD35EmptyLatent", "SD35Sampler", "SD35VAEDecode", "SD35VAEEncode", "SD35VAEEncodeForInpaint",
    "SD35ControlNetApply",
    "SD35CannyPreprocessor", "SD35BlurPreprocessor", "SD35DepthNormalize", "SD35ToComfyModel",
    "SD35ToComfyVAE",
    "SD35LoraLoader",
    "SD35IPAdapterLoader", "SD35CLIPVisionLoader", "SD35ApplyIPAdapter",
}


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}, cls.__name__
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_pack_exports_only_the_mappings_and_web_directory(pack):
    public = {k for k in vars(pack) if not k.startswith("_")}
    subpackages = {"nodes", "sd35_core", "sd35_train"}
    assert public - subpackages == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"}
    assert set(pack.NODE_CLASS_MAPPINGS) == EXPECTED_NODES
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_NODES
    web = os.path.join(os.path.dirname(pack.__file__), pack.WEB_DIRECTORY)
    assert any(f.endswith(".js") for f in os.listdir(web))


@pytest.mark.parametrize("name", sorted(EXPECTED_NODES))
def test_node_class_is_well_formed(node_classes, models_env, name):
    cls = node_classes[name]
    assert cls.__name__ == name and name.startswith("SD35")
    assert cls.CATEGORY.startswith("sd35/")
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    for t in cls.RETURN_TYPES:
        assert t in STANDARD_TYPES | OWN_TYPES
    function = getattr(cls, cls.FUNCTION)
    params = inspect.signature(function).parameters
    inputs = _inputs(cls)
    assert inputs, name
    for input_name, spec in inputs.items():
        kind, options = spec[0], spec[1]
        # A socket may take several types ("SD35_MODEL,MODEL": ComfyUI's union syntax).
        assert isinstance(kind, list) or set(kind.split(",")) <= STANDARD_TYPES | OWN_TYPES, (name, input_name, kind)
        assert isinstance(options.get("tooltip"), str) and len(options["tooltip"]) > 10, (name, input_name)
        assert input_name in params, f"{name}.{cls.FUNCTION} has no parameter {input_name}"
        if isinstance(kind, list) and "default" in options:
            assert options["default"] in kind, (name, input_name)
        if kind in ("INT", "FLOAT") and "default" in options:
            assert options.get("min", -float("inf")) <= options["default"] <= options.get("max", float("inf"))
    required = cls.INPUT_TYPES()["required"]
    for p in list(params.values())[1:]:
        if p.default is inspect.Parameter.empty:
            assert p.name in required, f"{name}: parameter {p.name} has no default but is not a required input"


def test_sampler_inputs_are_the_documented_public_api(node_classes):
    required = node_classes["SD35Sampler"].INPUT_TYPES()["required"]
    assert list(required) == [
        "model", "positive", "negative", "latent", "seed", "steps", "cfg", "sampler", "schedule", "shift",
        "denoise", "slg_layers", "slg_scale", "slg_start", "slg_end", "slg_window",
    ]
    assert required["seed"][1]["control_after_generate"] is True
    assert required["seed"][1]["max"] == 2**64 - 1
    assert {"euler", "dpmpp_2m"} <= set(required["sampler"][0])
    assert "reference" in required["schedule"][0] and required["slg_window"][0] == ["steps", "sigma"]


def test_loaders_list_the_model_folders(node_classes, models_env):
    ckpts = node_classes["SD35CheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    assert "tiny-sd3.5_medium.safetensors" in ckpts  # checkpoints folder
    assert "tiny-sd3.5_medium-bare.safetensors" in ckpts  # diffusion_models folder
    t5 = node_classes["SD35TextEncoderLoader"].INPUT_TYPES()["required"]["t5xxl_name"][0]
    assert t5[0] == "none" and "t5xxl_fp16.safetensors" in t5
    assert node_classes["SD35VAELoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["tiny-sd3_vae.safetensors"]
    cns = node_classes["SD35ControlNetLoader"].INPUT_TYPES()["required"]["control_net_name"][0]
    # The three in the controlnet folder, then the pack's bundled tiny shapes ControlNet.
    assert cns == [f"tiny-sd3.5_large_controlnet_{t}.safetensors" for t in ("blur", "canny", "depth")] + [
        "tiny_shapes_controlnet_canny.safetensors"]


def test_host_falls_back_to_plain_torch_without_comfyui(pack):
    from comfyui_sd35.nodes import host

    assert not host.IN_COMFYUI
    assert host.torch_device() == torch.device("cpu")
    assert host.check_interrupt() is False
    progress = host.Progress(3)
    progress.update(0, 3, torch.zeros(1, 16, 4, 4))
    assert progress.current == 1 and progress.last_preview.shape == (4, 4, 3)


def test_error_messages_name_nodes_as_the_menu_shows_them(pack):
    """A node an error names can be found by typing that name into ComfyUI's node search."""
    import re

    folder = os.path.join(os.path.dirname(pack.__file__), "nodes")
    named = set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            source = open(os.path.join(folder, name), encoding="utf-8").read()
            assert "SD35 " not in source, f"{name} still names a node the old way (SD35 ...)"
            named |= set(re.findall(r'NODE = "([^"]+)"', source))
            named |= set(re.findall(r'"(SD3\.5 [A-Za-z ()-]+?):', source))
    assert named
    shown = list(pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    for name in named:
        assert any(d.startswith(name) for d in shown), f"{name!r} is not how the menu shows any node"
