"""Bridge nodes: the pack's diffusion model as a ComfyUI ``MODEL`` (for KSampler, LoRA loaders, model patches).

The reverse direction needs no node: SD35 Sampler and SD35 ControlNet Loader take a native ComfyUI SD3
``MODEL`` on their ``model`` input directly (see comfy_bridge.py).
"""

from __future__ import annotations

from ..sd35_core.defaults import defaults_for
from . import host
from .objects import SD35Model, require_type

NODE = "SD35 Model to ComfyUI MODEL"


class SD35ToComfyModel:
    """Hand our MMDiT-X to ComfyUI's own nodes as a ``MODEL`` (the weights stay where they are)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SD35_MODEL", {"tooltip": "The diffusion model from SD35 Checkpoint Loader."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "Flow shift of the MODEL's sampling; 0 uses the model's default "
                                               "(3 for SD3.5, 1 for SD3). ModelSamplingSD3 can change it later."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A ComfyUI MODEL over the same weights: KSampler, SamplerCustomAdvanced, LoraLoader, "
                       "SkipLayerGuidanceSD3, ModelSamplingSD3 and other MODEL patches work on it.",)
    FUNCTION = "convert"
    CATEGORY = "sd35/bridge"
    DESCRIPTION = ("Turns an SD35 diffusion model into a ComfyUI MODEL without copying its weights: ComfyUI's "
                   "samplers, LoRA loaders and block patches (skip-layer guidance, double_block replacements, "
                   "ControlNet residuals) run on the pack's own MMDiT-X, and ComfyUI's model management moves "
                   "the one copy of the weights. Only inside ComfyUI.")

    def convert(self, model, shift: float = 0.0):
        model = require_type(model, SD35Model, "model", NODE)
        if model.loras:
            # The MODEL shares the base module and ComfyUI's own patching; an SD3.5 LoRA Loader stack would be lost.
            raise ValueError(f"{NODE}: this model comes through SD3.5 LoRA Loader, whose LoRAs do not travel into a "
                             "ComfyUI MODEL; connect the checkpoint's model here and apply the LoRA to the MODEL "
                             "with ComfyUI's LoraLoaderModelOnly (it patches our model by its official keys)")
        bridge = host.comfy_bridge()
        if bridge is None:
            raise ValueError(f"{NODE}: a ComfyUI MODEL exists only inside ComfyUI")
        if model.managed.patcher is None or not isinstance(model.managed.patcher.model, bridge.SD35MMDiTX):
            raise ValueError(f"{NODE}: this model was not registered with ComfyUI's model management; load it "
                             "with SD35 Checkpoint Loader inside ComfyUI")
        if shift <= 0:
            shift = defaults_for(model.variant).shift
        return (bridge.with_shift(model.managed.patcher, shift),)
