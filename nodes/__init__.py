"""ComfyUI node classes over sd35_core. Class names are public API (saved workflows refer to them)."""

from .bridge import SD35ToComfyModel, SD35ToComfyVAE
from .controlnet import SD35BlurPreprocessor, SD35CannyPreprocessor, SD35ControlNetApply, SD35DepthNormalize
from .ip_adapter import SD35ApplyIPAdapter, SD35CLIPVisionLoader, SD35IPAdapterLoader
from .latent_vae import SD35EmptyLatent, SD35VAEDecode, SD35VAEEncode, SD35VAEEncodeForInpaint
from .loaders import SD35CheckpointLoader, SD35ControlNetLoader, SD35TextEncoderLoader, SD35VAELoader
from .lora import SD35LoraLoader
from .sampling import SD35Sampler
from .text import SD35TextEncode

NODE_CLASS_MAPPINGS = {
    "SD35CheckpointLoader": SD35CheckpointLoader,
    "SD35TextEncoderLoader": SD35TextEncoderLoader,
    "SD35VAELoader": SD35VAELoader,
    "SD35ControlNetLoader": SD35ControlNetLoader,
    "SD35LoraLoader": SD35LoraLoader,
    "SD35TextEncode": SD35TextEncode,
    "SD35EmptyLatent": SD35EmptyLatent,
    "SD35Sampler": SD35Sampler,
    "SD35VAEDecode": SD35VAEDecode,
    "SD35VAEEncode": SD35VAEEncode,
    "SD35VAEEncodeForInpaint": SD35VAEEncodeForInpaint,
    "SD35ControlNetApply": SD35ControlNetApply,
    "SD35CannyPreprocessor": SD35CannyPreprocessor,
    "SD35BlurPreprocessor": SD35BlurPreprocessor,
    "SD35DepthNormalize": SD35DepthNormalize,
    "SD35ToComfyModel": SD35ToComfyModel,
    "SD35ToComfyVAE": SD35ToComfyVAE,
    "SD35IPAdapterLoader": SD35IPAdapterLoader,
    "SD35CLIPVisionLoader": SD35CLIPVisionLoader,
    "SD35ApplyIPAdapter": SD35ApplyIPAdapter,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SD35CheckpointLoader": "SD3.5 Checkpoint Loader",
    "SD35TextEncoderLoader": "SD3.5 Text Encoder Loader (CLIP-L, CLIP-G, T5)",
    "SD35VAELoader": "SD3.5 VAE Loader",
    "SD35ControlNetLoader": "SD3.5 ControlNet Loader",
    "SD35LoraLoader": "SD3.5 LoRA Loader",
    "SD35TextEncode": "SD3.5 Text Encode",
    "SD35EmptyLatent": "SD3.5 Empty Latent",
    "SD35Sampler": "SD3.5 Sampler (CFG + Skip-Layer Guidance)",
    "SD35VAEDecode": "SD3.5 VAE Decode",
    "SD35VAEEncode": "SD3.5 VAE Encode",
    "SD35VAEEncodeForInpaint": "SD3.5 VAE Encode (for Inpainting)",
    "SD35ControlNetApply": "SD3.5 Apply ControlNet",
    "SD35CannyPreprocessor": "SD3.5 Canny (ControlNet preprocessor)",
    "SD35BlurPreprocessor": "SD3.5 Blur (ControlNet preprocessor)",
    "SD35DepthNormalize": "SD3.5 Depth Normalize (ControlNet preprocessor)",
    "SD35ToComfyModel": "SD3.5 Model to ComfyUI MODEL",
    "SD35ToComfyVAE": "SD3.5 VAE to ComfyUI VAE",
    "SD35IPAdapterLoader": "SD3.5 IP-Adapter Loader",
    "SD35CLIPVisionLoader": "SD3.5 CLIP Vision Loader (SigLIP)",
    "SD35ApplyIPAdapter": "SD3.5 Apply IP-Adapter",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
