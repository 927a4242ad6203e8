"""The text-encode node: prompts -> SD3 ``CONDITIONING``."""

from __future__ import annotations

from ..sd35_core.text.encoder import SD3TextEncoder
from ..sd35_core.text.tokenization import T5_MAX_LENGTH, T5_MIN_LENGTH, SD3Tokenizer, find_tokenizer_files
from . import host
from .conditioning import make_conditioning
from .lora import lora_context
from .objects import SD35Clip, require

NODE = "SD3.5 Text Encode"
TOKENIZER_HINT = (
    f"Set {host.TOKENIZERS_ENV} to a folder holding clip/vocab.json, clip/merges.txt and t5/tokenizer.json "
    "before starting ComfyUI (this ComfyUI's own comfy/ folder should bundle both tokenizers)."
)


def text_encoder(clip: SD35Clip) -> SD3TextEncoder:
    """The clip's encoder, built on first use (that is when the tokenizer files are looked up).

    Tokenizers are found in this order: a ``tokenizers`` folder beside the file the encoders came from (the
    bundled tiny shapes model ships its own), then ``SD35_TOKENIZERS``, then the tokenizer folders bundled with
    the running ComfyUI (``comfy/sd1_tokenizer``, ``comfy/text_encoders/t5_tokenizer``).
    """
    if clip._encoder is None:
        clip_dir, t5_json = find_tokenizer_files(host.tokenizer_path(), *host.comfyui_tokenizer_dirs(),
                                                 model_path=clip.source, hint=TOKENIZER_HINT)
        tokenizer = SD3Tokenizer.from_files(clip_dir, t5_json)
        # Without T5 the context is only as wide as the CLIP states; the sampler zero-pads it to the
        # model's width, which is what the reference's padding to the T5 width gives.
        width = None if clip.t5 is not None else clip.clip_l.config.hidden_size + clip.clip_g.config.hidden_size
        clip._encoder = SD3TextEncoder(clip.clip_l, clip.clip_g, clip.t5, tokenizer, clip.device, context_dim=width)
    return clip._encoder


class SD35TextEncode:
    """Encode a prompt with CLIP-L, CLIP-G and T5-XXL."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("SD35_CLIP", {"tooltip": "The text encoders (SD3.5 Text Encoder Loader, or a checkpoint "
                                                  "that bundles them)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt, for all three encoders. (word:1.2) weights work as in "
                                               "ComfyUI."}),
            },
            "optional": {
                "clip_l_text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                           "tooltip": "A different prompt for CLIP-L; empty uses text."}),
                "clip_g_text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                           "tooltip": "A different prompt for CLIP-G; empty uses text."}),
                "t5xxl_text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                          "tooltip": "A different prompt for T5-XXL; empty uses text."}),
                "t5_max_length": ("INT", {"default": T5_MIN_LENGTH, "min": T5_MIN_LENGTH, "max": T5_MAX_LENGTH,
                                          "tooltip": "Longest T5 token sequence; longer prompts are cut there "
                                                     "(77 as the reference; up to 512 keeps long prompts)."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("SD3 conditioning, usable with ComfyUI's conditioning nodes too.",)
    FUNCTION = "encode"
    CATEGORY = "sd35/conditioning"
    DESCRIPTION = "Encodes a prompt the way the SD3 reference does (long prompts and weights as ComfyUI does)."

    def encode(self, clip, text: str, clip_l_text: str = "", clip_g_text: str = "", t5xxl_text: str = "",
               t5_max_length: int = T5_MIN_LENGTH):
        clip = require(clip, "clip", NODE,
                       "The checkpoint does not bundle text encoders: load them with SD3.5 Text Encoder Loader.")
        if not isinstance(clip, SD35Clip):
            raise ValueError(f"{NODE}: the clip input expects an SD35_CLIP; got {type(clip).__name__}")
        encoder = text_encoder(clip)
        clip.managed.load()
        try:
            with lora_context(clip, clip.modules):
                context, pooled = encoder.encode(
                    text,
                    clip_l_prompt=clip_l_text or None,
                    clip_g_prompt=clip_g_text or None,
                    t5_prompt=t5xxl_text or None,
                    t5_max_length=t5_max_length,
                )
        finally:
            clip.managed.unload()  # text encoders leave the GPU right after encoding
        return (make_conditioning(context, pooled),)
