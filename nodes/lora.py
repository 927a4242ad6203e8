"""The LoRA node: stack a LoRA / LyCORIS file (any trainer's format) onto SD35_MODEL and SD35_CLIP."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from ..sd35_core.loading.lora import LoraFile, applied, load_lora, read_lora
from . import host
from .loaders import LoadCache, _mtime_token, file_key
from .objects import SD35Clip, SD35Model, require_type

NODE = "SD3.5 LoRA Loader"


def lora_context(obj: SD35Model | SD35Clip, module):
    """A context manager that applies ``obj``'s LoRA stack to ``module`` for one run (nothing when empty).

    Backups of merged weights go to the offload device, so they never take GPU memory.
    """
    if not obj.loras:
        return contextlib.nullcontext(module)
    return applied(module, obj.loras, backup_device=host.offload_device())


class SD35LoraLoader:
    """Apply a LoRA to the diffusion model and (optionally) the text encoders."""

    _files = LoadCache(capacity=4)  # parsed files, keyed by path, mtime and size

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SD35_MODEL", {"tooltip": "The diffusion model (from SD3.5 Checkpoint Loader or another "
                                                    "LoRA node: LoRAs stack in order)."}),
                "lora_name": (host.list_models("loras"), {
                    "tooltip": "A LoRA / LyCORIS .safetensors file from the loras folder. kohya, diffusers/PEFT, "
                               "OneTrainer and SimpleTuner files all load; the format is detected from the keys."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly to apply the LoRA to the diffusion model "
                                                        "(negative inverts it; 0 leaves the model untouched)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly to apply it to the text encoders."}),
            },
            "optional": {
                "clip": ("SD35_CLIP", {"tooltip": "The text encoders; leave empty for a model-only LoRA."}),
            },
        }

    RETURN_TYPES = ("SD35_MODEL", "SD35_CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA (the input model is not changed).",
                       "The text encoders with the LoRA (empty when no clip was connected).")
    FUNCTION = "load"
    CATEGORY = "sd35/loaders"
    DESCRIPTION = ("Applies a LoRA or LyCORIS (LoHa, LoKr, DoRA) to an SD3 / SD3.5 model and its text encoders. "
                   "Chain several; the base model stays unchanged for other branches of the graph.")

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return _mtime_token("loras", lora_name)

    def load(self, model, lora_name: str, strength_model: float = 1.0, strength_clip: float = 1.0, clip=None):
        model = require_type(model, SD35Model, "model", NODE)
        if clip is not None:
            clip = require_type(clip, SD35Clip, "clip", NODE)
        path = host.resolve_model("loras", lora_name)
        lora: LoraFile = self._files.get(file_key(path), lambda: read_lora(path))
        resolved = load_lora(lora, model.mmdit, clip.modules if clip is not None else None)
        if resolved.model is not None:
            model = replace(model, loras=model.loras + ((resolved.model, float(strength_model)),))
        if clip is not None and resolved.clip is not None:
            clip = replace(clip, loras=clip.loras + ((resolved.clip, float(strength_clip)),))
        return (model, clip)
