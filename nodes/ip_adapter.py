"""IP-Adapter nodes: the adapter loader (ComfyUI's ``ipadapter`` folder, registered here when ComfyUI has none),
the SigLIP vision-tower loader (ComfyUI's ``clip_vision`` folder) and SD3.5 Apply IP-Adapter.

The vision tower is our own module, not ComfyUI's ``CLIP_VISION``: ComfyUI builds that object only for files it
recognises by their full-size key counts and prepares pictures its own way (torch bicubic), while the adapter was
trained on ``SiglipImageProcessor``'s pixels; using its object would mean a second copy of the weights for our
preprocessing. The tower runs once per picture when the adapter is applied and is then sent back to the
offload device through ComfyUI's model management; the adapter itself loads with the diffusion model.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..sd35_core.errors import CheckpointError
from ..sd35_core.image.siglip_input import encode_image
from ..sd35_core.loading.clip_vision import load_siglip_vision
from ..sd35_core.loading.ip_adapter import load_ip_adapter
from ..sd35_core.sampling.ip_adapter import IPAdapterHint, ip_rows
from . import host
from .loaders import WEIGHT_DTYPES, LoadCache, _mtime_token, file_key, resolve_weight_dtype
from .objects import IPApplication, SD35ClipVision, SD35IPAdapter, SD35Model, require_type

LOADER_NODE = "SD3.5 IP-Adapter Loader"
VISION_NODE = "SD3.5 CLIP Vision Loader (SigLIP)"
APPLY_NODE = "SD3.5 Apply IP-Adapter"
IPADAPTER_FOLDER = "ipadapter"
IPADAPTER_EXTENSIONS = (".safetensors", ".sft", ".bin")

host.register_model_folder(IPADAPTER_FOLDER, IPADAPTER_EXTENSIONS)


class SD35IPAdapterLoader:
    """Load the InstantX SD3.5 Large IP-Adapter."""

    _cache = LoadCache(capacity=1)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter_name": (host.list_models(IPADAPTER_FOLDER, IPADAPTER_EXTENSIONS), {
                    "tooltip": "The adapter from the ipadapter folder: InstantX's ip-adapter.bin (read with torch's "
                               "restricted unpickler: tensors only) or its .safetensors conversion "
                               "(sd35 convert-ip-adapter)."}),
            },
            "optional": {
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "default",
                    "tooltip": "Precision of the adapter weights. default: bf16 on GPUs, fp32 on the CPU "
                               "(fp8 keeps the adapter in bf16)."}),
            },
        }

    RETURN_TYPES = ("SD35_IPADAPTER",)
    RETURN_NAMES = ("ip_adapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter, for SD3.5 Apply IP-Adapter.",)
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = ("Loads an SD3.5 IP-Adapter (InstantX's SD3.5 Large release). Sizes are read from the file; "
                   "every tensor in it must be used.")

    @classmethod
    def IS_CHANGED(cls, ipadapter_name, **_):
        return _mtime_token(IPADAPTER_FOLDER, ipadapter_name)

    def load(self, ipadapter_name: str, weight_dtype: str = "default"):
        path = host.resolve_model(IPADAPTER_FOLDER, ipadapter_name)
        device = host.torch_device()
        dtype = resolve_weight_dtype(weight_dtype, device)

        def _load():
            try:
                adapter = load_ip_adapter(path, dtype, host.offload_device())
            except CheckpointError as e:
                raise CheckpointError(f"{LOADER_NODE}: {e}") from None
            return SD35IPAdapter(adapter, host.ManagedModule(adapter, device, name="IPAdapter"), path)

        ip = self._cache.get((file_key(path), dtype, str(device)), _load)
        cfg = ip.adapter.config
        info = {"kind": "ip_adapter", "blocks": cfg.blocks, "tokens": cfg.num_queries, "dtype": dtype}
        return {"ui": {"sd35_info": [info]}, "result": (ip,)}


class SD35CLIPVisionLoader:
    """Load the SigLIP vision tower the IP-Adapter reads pictures with."""

    _cache = LoadCache(capacity=1)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (host.list_models("clip_vision"), {
                    "tooltip": "SigLIP so400m-patch14-384 from the clip_vision folder "
                               "(sigclip_vision_patch14_384.safetensors)."}),
            },
            "optional": {
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "default",
                    "tooltip": "Precision of the tower. default: bf16 on GPUs, fp32 on the CPU."}),
            },
        }

    RETURN_TYPES = ("SD35_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The vision tower, for SD3.5 Apply IP-Adapter.",)
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = ("Loads a SigLIP vision tower (transformers' layout, as ComfyUI's clip_vision folder holds it) up to "
                   "the layer the IP-Adapter reads; its last layer and pooling head are not loaded.")

    @classmethod
    def IS_CHANGED(cls, clip_name, **_):
        return _mtime_token("clip_vision", clip_name)

    def load(self, clip_name: str, weight_dtype: str = "default"):
        path = host.resolve_model("clip_vision", clip_name)
        device = host.text_encoder_device()
        dtype = resolve_weight_dtype(weight_dtype, device)

        def _load():
            try:
                tower = load_siglip_vision(path, dtype, host.text_encoder_offload_device())
            except CheckpointError as e:
                raise CheckpointError(f"{VISION_NODE}: {e}") from None
            return SD35ClipVision(tower, host.ManagedModule(tower, device, host.text_encoder_offload_device(),
                                                            name="SiglipVision"), path)

        vision = self._cache.get((file_key(path), dtype, str(device)), _load)
        return {"ui": {"sd35_info": [{"kind": "clip_vision", "dtype": dtype}]}, "result": (vision,)}


class SD35ApplyIPAdapter:
    """Prompt with a picture: attach an IP-Adapter application to a model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SD35_MODEL", {"tooltip": "The SD3.5 Large model (SD3.5 Checkpoint Loader, or an earlier "
                                                    "SD3.5 Apply IP-Adapter: applications stack)."}),
                "ip_adapter": ("SD35_IPADAPTER", {"tooltip": "The adapter from SD3.5 IP-Adapter Loader."}),
                "clip_vision": ("SD35_CLIP_VISION", {"tooltip": "The SigLIP tower from SD3.5 CLIP Vision Loader."}),
                "image": ("IMAGE", {"tooltip": "The picture to prompt with; it is squashed to the tower's square "
                                               "size, as the adapter was trained. Each picture of a batch adds "
                                               "its own term."}),
                "weight": ("FLOAT", {"default": 0.5, "min": -2.0, "max": 5.0, "step": 0.01,
                                     "tooltip": "How strongly the picture steers (InstantX suggests 0.5); 0 leaves "
                                                "the model exactly as it was."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "First part of the run the adapter acts on (fraction of the "
                                                       "steps)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Where the adapter stops acting (fraction of the steps)."}),
            }
        }

    RETURN_TYPES = ("SD35_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the IP-Adapter attached, for SD3.5 Sampler or SD3.5 Model to ComfyUI MODEL.",)
    FUNCTION = "apply"
    CATEGORY = "sd35/ip_adapter"
    DESCRIPTION = ("Encodes the picture with the SigLIP tower and attaches the IP-Adapter to the model; SD3.5 "
                   "Sampler (and KSampler through SD3.5 Model to ComfyUI MODEL) gives the positive rows the "
                   "picture's tokens, the negative rows those of no picture, and skip-layer guidance's pass the "
                   "positive's. Chain several to stack pictures or adapters.")

    def apply(self, model, ip_adapter, clip_vision, image, weight, start_percent, end_percent):
        model = require_type(model, SD35Model, "model", APPLY_NODE)
        ip_adapter = require_type(ip_adapter, SD35IPAdapter, "ip_adapter", APPLY_NODE)
        clip_vision = require_type(clip_vision, SD35ClipVision, "clip_vision", APPLY_NODE)
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"{APPLY_NODE}: expected 0 <= start_percent <= end_percent <= 1; got {start_percent}, "
                             f"{end_percent}")
        cfg = model.config
        try:
            ip_adapter.adapter.config.check_fits(cfg.hidden_size, cfg.depth, cfg.num_heads,
                                                 clip_vision.tower.config.width)
        except ValueError as e:
            raise ValueError(f"{APPLY_NODE}: {e}") from None
        if weight == 0:
            return (model,)
        clip_vision.managed.load()
        try:
            features = encode_image(clip_vision.tower, image)
        except ValueError as e:
            raise ValueError(f"{APPLY_NODE}: {e}") from None
        finally:
            clip_vision.managed.unload()  # runs once per picture: give the room back to the diffusion model
        application = IPApplication(ip_adapter, features, float(weight), float(start_percent), float(end_percent))
        return (replace(model, ip_adapters=model.ip_adapters + (application,)),)


def ip_adapter_hints_of(applications: tuple[IPApplication, ...]) -> tuple[IPAdapterHint, ...]:
    """The sampling hints of ``applications``."""
    return tuple(IPAdapterHint(a.ip_adapter.adapter, a.features, a.weight, a.start, a.end) for a in applications)


def ip_adapter_hints(model) -> tuple[IPAdapterHint, ...]:
    """The sampler's hints for the applications a model carries (none for a native ComfyUI MODEL)."""
    return ip_adapter_hints_of(model.ip_adapters) if isinstance(model, SD35Model) else ()



# ------------------------------------------------------------------------------------ into ComfyUI's MODEL

class IPAdapterOption:
    """IP-Adapter applications riding in a ComfyUI ``MODEL``'s ``transformer_options`` (SD3.5 Model to ComfyUI
    MODEL), read by :class:`.comfy_model.ComfyMMDiT` at every model call.

    ComfyUI batches cond and uncond itself and says which chunk of the batch is which in
    ``transformer_options["cond_or_uncond"]`` (0 cond, 1 uncond); each row gets its tokens from that, so
    KSampler's batches, its cfg-1 shortcut and SkipLayerGuidanceSD3's skip pass (a cond chunk) all get the
    right ones. The windows are placed by the current sigma in ``sample_sigmas``. ComfyUI deep-copies model
    options on every clone; this object is handed on as it is, so the adapters are never copied.
    """

    KEY = "sd35_ip_adapters"

    def __init__(self, hints: tuple[IPAdapterHint, ...]):
        self.hints = tuple(hints)

    def __deepcopy__(self, memo):
        return self

    def active(self, options) -> list[IPAdapterHint]:
        """The hints whose window holds the step ComfyUI is at (all of them when it does not say)."""
        sigmas, current = options.get("sample_sigmas"), options.get("sigmas")
        if sigmas is None or current is None or len(sigmas) < 2:
            return [h for h in self.hints if h.weight != 0.0]
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
        step = int((sigmas[:-1] - float(torch.as_tensor(current).reshape(-1)[0])).abs().argmin())
        return [h for h in self.hints if h.active(step, len(sigmas) - 1)]

    def rows(self, options, batch: int, timestep: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """The joint blocks' IP input (``IPRows``) for a model call of ``batch`` rows, or ``None``."""
        hints = self.active(options)
        if not hints:
            return None
        chunks = options.get("cond_or_uncond")
        if not chunks or batch % len(chunks):
            raise ValueError(f"{APPLY_NODE}: ComfyUI did not say which rows of this model call are cond and which "
                             "uncond (transformer_options['cond_or_uncond']); the IP-Adapter needs it")
        per = batch // len(chunks)
        positive = [c == 0 for c in chunks for _ in range(per)]
        return ip_rows(hints, positive, timestep.reshape(-1).float(), dtype, device)


def with_ip_adapters(patcher, applications: tuple[IPApplication, ...]):
    """A clone of ComfyUI ``patcher`` carrying ``applications``: the option above, and the adapters as additional
    models, which ComfyUI loads with the diffusion model. ``patcher`` itself when there are none."""
    if not applications:
        return patcher
    patcher = patcher.clone()
    hints = ip_adapter_hints_of(applications)
    patcher.model_options.setdefault("transformer_options", {})[IPAdapterOption.KEY] = IPAdapterOption(hints)
    adapters = {id(a.ip_adapter): a.ip_adapter.managed.patcher for a in applications}
    patcher.set_additional_models(IPAdapterOption.KEY, list(adapters.values()))
    return patcher
