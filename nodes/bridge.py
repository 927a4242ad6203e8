"""Bridge nodes: the pack's diffusion model as a ComfyUI ``MODEL`` (for KSampler, LoRA loaders, model patches)
and its VAE as a ComfyUI ``VAE`` (for VAEDecode / VAEEncode and their tiled forms).

The reverse direction needs no node: SD3.5 Sampler, SD3.5 ControlNet Loader and SD3.5 Empty Latent take a
native ComfyUI SD3 ``MODEL`` on their ``model`` input, SD3.5 Apply ControlNet a ComfyUI ``VAE`` (see
comfy_bridge.py). Text encoders stay on the pack's side: CONDITIONING is their bridge (see
:data:`CLIP_NOTE`).
"""

from __future__ import annotations

from ..sd35_core.sampling.defaults import defaults_for
from . import host
from .objects import SD35VAE, SD35Model, require_type

NODE = "SD3.5 Model to ComfyUI MODEL"
VAE_NODE = "SD3.5 VAE to ComfyUI VAE"
# Why there is no SD35_CLIP -> CLIP node (also in SD3.5 Text Encoder Loader's description).
CLIP_NOTE = ("SD35_CLIP does not plug into ComfyUI's CLIPTextEncode: a ComfyUI CLIP is its own tokenizer and "
             "prompt-weighting pipeline in front of its own encoder classes, so wrapping these encoders in it would "
             "give ComfyUI's encoding, not this pack's. CONDITIONING is the bridge: SD3.5 Text Encode's output "
             "works with every ComfyUI sampler and conditioning node, and ComfyUI's CLIPTextEncode / "
             "CLIPTextEncodeSD3 output works with SD3.5 Sampler.")


class SD35ToComfyModel:
    """Hand our MMDiT-X to ComfyUI's own nodes as a ``MODEL`` (the weights stay where they are)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SD35_MODEL", {"tooltip": "The diffusion model from SD3.5 Checkpoint Loader."}),
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
    DESCRIPTION = ("Turns an SD3.5 diffusion model into a ComfyUI MODEL without copying its weights: ComfyUI's "
                   "samplers, LoRA loaders and block patches (skip-layer guidance, double_block replacements, "
                   "ControlNet residuals) run on the pack's own MMDiT-X, and ComfyUI's model management moves "
                   "the one copy of the weights. LoRAs from SD3.5 LoRA Loader come along as ComfyUI weight "
                   "patches, and IP-Adapters from SD3.5 Apply IP-Adapter as a per-row input of the blocks. Only "
                   "inside ComfyUI.")

    def convert(self, model, shift: float = 0.0):
        model = require_type(model, SD35Model, "model", NODE)
        bridge = host.comfy_bridge()
        if bridge is None:
            raise ValueError(f"{NODE}: a ComfyUI MODEL exists only inside ComfyUI")
        if model.managed.patcher is None or not isinstance(model.managed.patcher.model, bridge.SD35MMDiTX):
            raise ValueError(f"{NODE}: this model was not registered with ComfyUI's model management; load it "
                             "with SD3.5 Checkpoint Loader inside ComfyUI")
        if shift <= 0:
            shift = defaults_for(model.variant).shift
        from .ip_adapter import with_ip_adapters  # here: ip_adapter -> loaders -> this module

        patcher = bridge.with_loras(bridge.with_shift(model.managed.patcher, shift), model.loras)
        return (with_ip_adapters(patcher, model.ip_adapters),)


class SD35ToComfyVAE:
    """Hand our SD3 VAE to ComfyUI's own nodes as a ``VAE`` (the same module: no weight copy)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("SD35_VAE", {"tooltip": "The VAE from SD3.5 VAE Loader or SD3.5 Checkpoint "
                                                           "Loader."})}}

    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("A ComfyUI VAE over the same weights, for VAEDecode, VAEEncode and their tiled forms.",)
    FUNCTION = "convert"
    CATEGORY = "sd35/bridge"
    DESCRIPTION = ("Turns an SD3.5 VAE into a ComfyUI VAE without copying its weights: ComfyUI's VAE nodes call the "
                   "pack's own encoder and decoder, and ComfyUI's model management moves the one copy. Only "
                   "inside ComfyUI.")

    def convert(self, vae):
        vae = require_type(vae, SD35VAE, "vae", VAE_NODE)
        bridge = host.comfy_bridge()
        if bridge is None:
            raise ValueError(f"{VAE_NODE}: a ComfyUI VAE exists only inside ComfyUI")
        return (bridge.SD35ComfyVAE(vae.vae, vae.managed.patcher, vae.device),)
