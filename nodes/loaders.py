"""Loader nodes: checkpoint, triple text encoder, VAE, ControlNet.

Caching: ComfyUI already reuses a node's outputs while its inputs stay the same, but that cache is per
node id and is dropped when another workflow runs. Each loader class therefore also keeps a small LRU
(:class:`LoadCache`, one instance per loader class, held by the class because ComfyUI instantiates node
classes itself and offers no other place that lives as long as the server) keyed by file path,
modification time, size, dtype and device: queueing the same loader settings again, from any workflow,
returns the same loaded object without touching the disk, and a replaced file is loaded afresh.
``IS_CHANGED`` reports the files' modification times, so ComfyUI's own cache also notices replaced files
(ComfyUI calls it with the constant inputs only, never with linked ones such as ``model``).
Capacities are small (one diffusion model, one text-encoder set, ...) because each entry holds gigabytes.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from ..sd35_core.loading.loader import (
    DiffusionModel,
    TextEncoders,
    load_checkpoint,
    load_controlnet,
    load_text_encoders,
    load_vae,
)
from ..sd35_core.loading.text_roles import role_default
from ..sd35_core.models.compile import compile_model
from ..sd35_core.sampling.defaults import defaults_for
from ..sd35_train.bundled import tiny_shapes_checkpoint, tiny_shapes_controlnet
from . import host
from .bridge import CLIP_NOTE
from .model_input import MODEL_TYPES, diffusion_input
from .objects import SD35VAE, SD35Clip, SD35ControlNet, SD35Model

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ["default", "fp16", "bf16", "fp32", "fp8_e4m3fn"]
TEXT_DEVICES = ["default", "cpu", "gpu"]
NONE = "none"


class LoadCache:
    """A small least-recently-used map from load settings to loaded objects."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, load: Callable[[], object]) -> object:
        """The cached value for ``key``, or ``load()``'s result (cached; the oldest entry is dropped)."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = load()
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def file_key(path: str) -> tuple:
    """Identity of a file's content for caching: real path, modification time and size; for a model folder, its
    real path and the identities of the weight and index files in it."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if f.endswith((".safetensors", ".json")))
        return (os.path.realpath(path), tuple(file_key(f) for f in files))
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def bundled_files(kind: str) -> dict[str, str]:
    """The pack's own model files for a loader (``checkpoint`` or ``controlnet``): ``{name: path}``.

    The tiny shapes model ships with the pack (``assets/tiny_shapes``), so a fresh ComfyUI with no downloaded
    weights still has a model to run every node with; the loaders list it after ComfyUI's own folders.
    """
    try:
        path = tiny_shapes_checkpoint() if kind == "checkpoint" else tiny_shapes_controlnet()
    except FileNotFoundError:
        return {}
    return {os.path.basename(path): path} if os.path.isfile(path) else {}


def resolve_file(folders, name: str, kind: str) -> str:
    """``name`` from ComfyUI's ``folders`` (a file there wins), else the pack's bundled file of that name; a
    diffusers model folder's name (see :func:`diffusers_folder_names`) resolves to the folder."""
    if name.endswith(DIFFUSERS_FOLDER):
        return os.path.dirname(host.resolve_model(folders, os.path.join(name[: -len(DIFFUSERS_FOLDER)], FOLDER_INDEX)))
    try:
        return host.resolve_model(folders, name)
    except FileNotFoundError:
        bundled = bundled_files(kind).get(name)
        if bundled is None:
            raise
        return bundled


def _with_bundled(names: list[str], kind: str) -> list[str]:
    return names + [n for n in bundled_files(kind) if n not in names]


def _mtime_token(folders, name: str, kind: str = "checkpoint") -> str:
    try:
        return repr(file_key(resolve_file(folders, name, kind)))
    except (FileNotFoundError, OSError):
        return ""  # the node itself reports the missing file when it runs


def resolve_weight_dtype(name: str, device: torch.device) -> str:
    """The concrete weight dtype for ``default``: bf16 (fp16 where bf16 is slow) on GPUs, fp32 on the CPU."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: expected one of {', '.join(WEIGHT_DTYPES)}; got {name!r}")
    if name != "default":
        return name
    return host.default_weight_dtype(device)


def _text_dtype(name: str, device: torch.device) -> str:
    if name != "default":
        return resolve_weight_dtype(name, device)
    # Text encoders were released in fp16 and are run in it by ComfyUI; the CPU computes fp32.
    return "fp32" if device.type == "cpu" else "fp16"


def _make_clip(text: TextEncoders, device: torch.device, source: str) -> SD35Clip:
    modules = torch.nn.ModuleDict({"clip_l": text.clip_l, "clip_g": text.clip_g})
    if text.t5 is not None:
        modules["t5xxl"] = text.t5
    managed = host.ManagedModule(modules, device, host.text_encoder_offload_device(), name="TextEncoders")
    return SD35Clip(text.clip_l, text.clip_g, text.t5, managed, source)


def managed_diffusion(diffusion: DiffusionModel, device: torch.device) -> host.ManagedModule:
    """The diffusion model's registration with ComfyUI: inside ComfyUI a ``ModelPatcher`` over ComfyUI's SD3
    model wrapper (see comfy_bridge.py), so that SD3.5 Model to ComfyUI MODEL hands out clones of it."""
    bridge = host.comfy_bridge()
    patcher = None
    if bridge is not None:
        patcher = bridge.model_patcher(diffusion.mmdit, defaults_for(diffusion.variant).shift, device,
                                       host.offload_device(), diffusion.preview)
    return host.ManagedModule(diffusion.mmdit, device, patcher=patcher)


def _with_default(default: str | None, options: dict) -> dict:
    return options if default is None else {"default": default, **options}


def checkpoint_names() -> list[str]:
    """Files offered by the checkpoint loader: ComfyUI's checkpoints, then diffusion_models (GGUF included), then
    diffusers model folders found in either."""
    extensions = host.MODEL_EXTENSIONS + host.GGUF_EXTENSIONS
    names = host.list_models("checkpoints", extensions)
    seen = set(names)
    names += [n for n in host.list_models("diffusion_models", extensions) if n not in seen]
    return _with_bundled(names, "checkpoint") + diffusers_folder_names()


CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")
# A diffusers model folder (the official HF repositories as downloaded) is offered by its folder name and this mark.
DIFFUSERS_FOLDER = " (diffusers folder)"
FOLDER_INDEX = "model_index.json"


def diffusers_folder_names() -> list[str]:
    """diffusers model folders under the checkpoint folders: a ``model_index.json`` beside a ``transformer/``."""
    names: list[str] = []
    for folder in CHECKPOINT_FOLDERS:
        for index in host.list_models(folder, (FOLDER_INDEX,)):
            name = os.path.dirname(index)
            if not name or name + DIFFUSERS_FOLDER in names:
                continue
            try:
                path = host.resolve_model(folder, index)
            except FileNotFoundError:
                continue
            if os.path.isdir(os.path.join(os.path.dirname(path), "transformer")):
                names.append(name + DIFFUSERS_FOLDER)
    return sorted(names)


def model_info(model: SD35Model, clip: SD35Clip | None, vae: SD35VAE | None, dtype: str) -> dict:
    """What the checkpoint loader detected, for the frontend (its ``sd35_info`` UI output)."""
    encoders = [] if clip is None else ["clip_l", "clip_g"] + (["t5xxl"] if clip.t5 is not None else [])
    return {"kind": "model", "variant": model.variant, "label": model.diffusion.label, "depth": model.config.depth,
            "dtype": dtype, "max_image_size": model.config.max_image_size, "encoders": encoders,
            "vae": vae is not None}


class SD35CheckpointLoader:
    """Load an SD3 / SD3.5 checkpoint; the variant and sizes are read from the weights."""

    _cache = LoadCache(capacity=1)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (checkpoint_names(), {
                    "tooltip": "An SD3 / SD3.5 .safetensors file from the checkpoints or diffusion_models folder "
                               "(single files with the VAE, with or without text encoders, or bare diffusion "
                               "models; official, ComfyUI scaled-fp8 or diffusers layout), a GGUF diffusion model "
                               "(Q8_0, Q4_0, ...: kept quantized, dequantized layer by layer), or a diffusers model "
                               "folder (transformer/, vae/, text_encoder*/)."}),
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "default",
                    "tooltip": "Precision the diffusion model's weights are kept in. default: bf16 on GPUs, fp32 on "
                               "the CPU. fp8_e4m3fn halves the memory again and computes in bf16. For a GGUF "
                               "file the quantized weights stay quantized and this is the dtype they compute in."}),
            },
            "optional": {
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Run the diffusion model's joint blocks through torch.compile. The first sampling "
                               "step of each image size compiles (slow), later steps are faster. Where compiling "
                               "is unavailable it logs one warning and runs as usual."}),
            },
        }

    RETURN_TYPES = ("SD35_MODEL", "SD35_CLIP", "SD35_VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = (
        "The diffusion model.",
        "The text encoders, when the file bundles them (empty otherwise: use SD3.5 Text Encoder Loader).",
        "The VAE, when the file bundles it (empty otherwise: use SD3.5 VAE Loader).",
    )
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = ("Loads an SD3 Medium, SD3.5 Medium, SD3.5 Large or Large Turbo checkpoint. Which model it is, and "
                   "every size, is detected from the weights.")

    @classmethod
    def IS_CHANGED(cls, ckpt_name, **_):
        return _mtime_token(CHECKPOINT_FOLDERS, ckpt_name)

    def load(self, ckpt_name: str, weight_dtype: str = "default", compile: bool = False):
        path = resolve_file(CHECKPOINT_FOLDERS, ckpt_name, "checkpoint")
        device = host.torch_device()
        dtype = resolve_weight_dtype(weight_dtype, device)
        key = (file_key(path), dtype, str(device), bool(compile))
        model, clip, vae = self._cache.get(key, lambda: self._load(path, dtype, device, bool(compile)))
        return {"ui": {"sd35_info": [model_info(model, clip, vae, dtype)]}, "result": (model, clip, vae)}

    @staticmethod
    def _load(path: str, dtype: str, device: torch.device, compile: bool = False):
        # Weights are read onto the offload device; ComfyUI moves them to the GPU when a node needs them.
        text_device = host.text_encoder_device()
        parts = load_checkpoint(path, dtype, host.offload_device(), text_dtype=host.default_weight_dtype(text_device))
        if compile:
            compile_model(parts.model.mmdit)
        model = SD35Model(parts.model, managed_diffusion(parts.model, device))
        clip = _make_clip(parts.text_encoders, host.text_encoder_device(), path) if parts.text_encoders else None
        vae = SD35VAE(parts.vae, host.ManagedModule(parts.vae, host.vae_device()), path) if parts.vae else None
        log.info("sd35: loaded %s (%s)%s%s", os.path.basename(path), parts.model.label,
                 ", text encoders" if clip else "", ", VAE" if vae else "")
        return model, clip, vae


class SD35TextEncoderLoader:
    """Load CLIP-L, CLIP-G and (optionally) T5-XXL from separate files."""

    _cache = LoadCache(capacity=1)

    @classmethod
    def INPUT_TYPES(cls):
        names = host.list_models("text_encoders")
        # Each slot starts on the file named for its role (ComfyUI would otherwise pick the first name, so
        # clip_l would start as clip_g.safetensors).
        defaults = {role: role_default(names, role) for role in ("clip_l", "clip_g", "t5xxl")}
        return {
            "required": {
                "clip_l_name": (names, _with_default(defaults["clip_l"], {
                    "tooltip": "CLIP-L text encoder (clip_l.safetensors) from the text_encoders folder."})),
                "clip_g_name": (names, _with_default(defaults["clip_g"], {
                    "tooltip": "CLIP-G text encoder (clip_g.safetensors) from the text_encoders folder."})),
                "t5xxl_name": ([NONE] + names, {
                    "default": defaults["t5xxl"] or NONE,
                    "tooltip": "T5-XXL text encoder (t5xxl_fp16 or t5xxl_fp8_e4m3fn), or none to run without it "
                               "(less prompt adherence, much less memory)."}),
                "device": (TEXT_DEVICES, {
                    "default": "default",
                    "tooltip": "Where the text encoders run: default lets ComfyUI choose, cpu keeps them off the "
                               "GPU entirely, gpu always uses the GPU. They leave the GPU after encoding."}),
            },
            "optional": {
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "default",
                    "tooltip": "Precision of the text encoder weights. default: fp16 on GPUs, fp32 on the CPU."}),
            },
        }

    RETURN_TYPES = ("SD35_CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The text encoders, for SD3.5 Text Encode.",)
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = ("Loads the three SD3 text encoders (T5-XXL optional) from ComfyUI's text_encoders folder. "
                   + CLIP_NOTE)

    @classmethod
    def IS_CHANGED(cls, clip_l_name, clip_g_name, t5xxl_name="none", **_):
        names = [clip_l_name, clip_g_name] + ([t5xxl_name] if t5xxl_name != NONE else [])
        return "|".join(_mtime_token("text_encoders", n) for n in names)

    def load(self, clip_l_name: str, clip_g_name: str, t5xxl_name: str, device: str = "default",
             weight_dtype: str = "default"):
        dev = host.text_encoder_device(device)
        dtype = _text_dtype(weight_dtype, dev)
        paths = {"clip_l": host.resolve_model("text_encoders", clip_l_name),
                 "clip_g": host.resolve_model("text_encoders", clip_g_name)}
        if t5xxl_name != NONE:
            paths["t5xxl"] = host.resolve_model("text_encoders", t5xxl_name)
        key = (tuple((role, file_key(p)) for role, p in paths.items()), dtype, str(dev))

        def _load():
            # Loaded onto the offload device; encoding brings them to ``dev`` and sends them back.
            text = load_text_encoders(paths, dtype, host.text_encoder_offload_device())
            return _make_clip(text, dev, ", ".join(os.path.basename(p) for p in paths.values()))

        clip = self._cache.get(key, _load)
        info = {"kind": "text_encoders", "encoders": list(paths), "dtype": dtype, "device": str(dev)}
        return {"ui": {"sd35_info": [info]}, "result": (clip,)}


class SD35VAELoader:
    """Load the SD3 VAE from a VAE file (or any checkpoint that bundles one)."""

    _cache = LoadCache(capacity=1)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (host.list_models("vae"), {"tooltip": "The SD3 VAE (.safetensors) from the vae folder."}),
            },
            "optional": {
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "default",
                    "tooltip": "Precision of the VAE weights. default: bf16 on GPUs, fp32 on the CPU "
                               "(fp8 is not used for the VAE: it keeps the compute dtype)."}),
            },
        }

    RETURN_TYPES = ("SD35_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for SD3.5 VAE Decode / Encode and SD3.5 Apply ControlNet.",)
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = "Loads the SD3 / SD3.5 VAE (16 latent channels) from ComfyUI's vae folder."

    @classmethod
    def IS_CHANGED(cls, vae_name, **_):
        return _mtime_token("vae", vae_name)

    def load(self, vae_name: str, weight_dtype: str = "default"):
        path = host.resolve_model("vae", vae_name)
        device = host.vae_device()
        dtype = resolve_weight_dtype(weight_dtype, device)
        key = (file_key(path), dtype, str(device))

        def _load():
            vae = load_vae(path, dtype, host.offload_device())
            return SD35VAE(vae, host.ManagedModule(vae, device), path)

        return {"ui": {"sd35_info": [{"kind": "vae", "dtype": dtype}]}, "result": (self._cache.get(key, _load),)}


class SD35ControlNetLoader:
    """Load an SD3.5 ControlNet (blur, canny, depth) for a diffusion model."""

    _cache = LoadCache(capacity=2)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPES, {"tooltip": "The diffusion model the ControlNet will steer (SD3.5 Large for "
                                                   "the released ControlNets; an SD3.5 model or a ComfyUI SD3 "
                                                   "MODEL); the loader checks that they fit."}),
                "control_net_name": (_with_bundled(host.list_models("controlnet"), "controlnet"), {
                    "tooltip": "An SD3.5 ControlNet .safetensors file from the controlnet folder "
                               "(Stability's release layout)."}),
            },
            "optional": {
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "default",
                    "tooltip": "Precision of the ControlNet weights. default: bf16 on GPUs, fp32 on the CPU."}),
            },
        }

    RETURN_TYPES = ("SD35_CONTROLNET",)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The ControlNet, for SD3.5 Apply ControlNet.",)
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = "Loads an SD3.5 Large ControlNet (canny, blur or depth) and checks it against the diffusion model."

    @classmethod
    def IS_CHANGED(cls, control_net_name, **_):
        return _mtime_token("controlnet", control_net_name, "controlnet")

    def load(self, model, control_net_name: str, weight_dtype: str = "default"):
        model = diffusion_input(model, "SD3.5 ControlNet Loader")
        path = resolve_file("controlnet", control_net_name, "controlnet")
        device = model.device
        dtype = resolve_weight_dtype(weight_dtype, device)
        # The fit check depends only on the model's shapes, so the key holds its config, not the object.
        key = (file_key(path), dtype, str(device), model.config)

        def _load():
            cn = load_controlnet(path, model, dtype, host.offload_device())  # checked against model.config
            return SD35ControlNet(cn, host.ManagedModule(cn, device), path)

        cn = self._cache.get(key, _load)
        info = {"kind": "controlnet", "control_type": cn.control_type, "layers": cn.controlnet.config.num_layers,
                "dtype": dtype}
        return {"ui": {"sd35_info": [info]}, "result": (cn,)}
