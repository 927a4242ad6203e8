"""Latent and VAE nodes: empty latent, VAE decode and encode (whole or tiled), encode for inpainting."""

from __future__ import annotations

import logging

import torch

from ..sd35_core.models.vae import image_to_vae_input, vae_output_to_image
from ..sd35_core.sampling.mask import prepare_inpaint
from . import host
from .model_input import MODEL_TYPES, diffusion_input
from .objects import SD35VAE, require, require_type

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
SIZE_STEP = 16  # VAE downscale 8 x MMDiT patch 2
NO_VAE = "The checkpoint does not bundle a VAE: load one with SD3.5 VAE Loader."


def _vae(vae, node: str) -> SD35VAE:
    require(vae, "vae", node, NO_VAE)
    return require_type(vae, SD35VAE, "vae", node)


def _tile_progress(total_hint: int):
    progress = host.Progress(total_hint)

    def callback(done: int, total: int) -> None:
        host.check_interrupt()
        progress.update(done - 1, total)

    return callback


TILE_INPUTS = {
    "tiled": ("BOOLEAN", {"default": False,
                          "tooltip": "Work through overlapping tiles: much less memory for large images, "
                                     "blended seams."}),
    "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                          "tooltip": "Tile size in image pixels (when tiled)."}),
    "overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                        "tooltip": "Overlap between tiles in image pixels, blended linearly (when tiled)."}),
}


class SD35EmptyLatent:
    """An empty SD3 latent of the requested size."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 1024, "min": SIZE_STEP, "max": 16384, "step": SIZE_STEP,
                                  "tooltip": "Image width in pixels (a multiple of 16; about one megapixel in "
                                             "total suits SD3.5)."}),
                "height": ("INT", {"default": 1024, "min": SIZE_STEP, "max": 16384, "step": SIZE_STEP,
                                   "tooltip": "Image height in pixels (a multiple of 16)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                       "tooltip": "Number of images generated together."}),
            },
            "optional": {
                "model": (MODEL_TYPES, {"tooltip": "Optional: check the size against this model's largest "
                                                   "supported size now rather than at sampling time."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("An empty latent (16 channels, 1/8 of the image size), for SD3.5 Sampler.",)
    FUNCTION = "generate"
    CATEGORY = "sd35/latent"
    DESCRIPTION = "Creates an empty SD3 latent for text-to-image."

    def generate(self, width: int, height: int, batch_size: int = 1, model=None):
        for name, v in (("width", width), ("height", height)):
            if v < SIZE_STEP or v % SIZE_STEP:
                raise ValueError(f"SD3.5 Empty Latent: {name} {v} is not a positive multiple of {SIZE_STEP} pixels "
                                 "(SD3 models work on 16-pixel patches)")
        if model is not None:
            diffusion_input(model, "SD3.5 Empty Latent").config.check_image_size(width, height)
        samples = torch.zeros((batch_size, LATENT_CHANNELS, height // 8, width // 8), dtype=torch.float32)
        return ({"samples": samples},)


class SD35VAEDecode:
    """Latent -> image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode (from SD3.5 Sampler)."}),
                "vae": ("SD35_VAE", {"tooltip": "The SD3 VAE (from the checkpoint or SD3.5 VAE Loader)."}),
            },
            "optional": dict(TILE_INPUTS),
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "sd35/latent"
    DESCRIPTION = "Decodes an SD3 latent to an image, whole or in tiles."

    def decode(self, samples, vae, tiled: bool = False, tile_size: int = 512, overlap: int = 64):
        vae = _vae(vae, "SD3.5 VAE Decode")
        if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
            raise ValueError("SD3.5 VAE Decode: the samples input is not a LATENT")
        latent = samples["samples"]
        module = vae.managed.load()
        with torch.no_grad():
            if tiled:
                pixels = module.decode_tiled(latent, tile_size, overlap, callback=_tile_progress(1))
            else:
                pixels = module.decode(latent)
        return (vae_output_to_image(pixels).cpu(),)


class SD35VAEEncode:
    """Image -> latent (the VAE's mean, so the same image always gives the same latent)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to encode; it is centre-cropped to a multiple of 16 "
                                                "pixels."}),
                "vae": ("SD35_VAE", {"tooltip": "The SD3 VAE (from the checkpoint or SD3.5 VAE Loader)."}),
            },
            "optional": dict(TILE_INPUTS),
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The image's latent, for image-to-image with SD3.5 Sampler (denoise below 1).",)
    FUNCTION = "encode"
    CATEGORY = "sd35/latent"
    DESCRIPTION = "Encodes an image to an SD3 latent, whole or in tiles."

    def encode(self, pixels, vae, tiled: bool = False, tile_size: int = 512, overlap: int = 64):
        vae = _vae(vae, "SD3.5 VAE Encode")
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            raise ValueError("SD3.5 VAE Encode: the pixels input is not an IMAGE [B, H, W, C]")
        _, h, w, _ = pixels.shape
        hh, ww = h - h % SIZE_STEP, w - w % SIZE_STEP
        if hh == 0 or ww == 0:
            raise ValueError(f"SD3.5 VAE Encode: the image ({w}x{h}) is smaller than {SIZE_STEP} pixels")
        if (hh, ww) != (h, w):
            top, left = (h - hh) // 2, (w - ww) // 2
            log.info("sd35: cropping %dx%d to %dx%d for the VAE", w, h, ww, hh)
            pixels = pixels[:, top : top + hh, left : left + ww]
        module = vae.managed.load()
        x = image_to_vae_input(pixels)
        with torch.no_grad():
            if tiled:
                latent = module.encode_tiled(x, tile_size, overlap, callback=_tile_progress(1))
            else:
                latent = module.encode(x)
        return ({"samples": latent.cpu()},)


class SD35VAEEncodeForInpaint:
    """Image + mask -> latent with a noise mask, as ComfyUI's VAE Encode (for Inpainting) does for its VAEs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to repaint; it is centre-cropped to a multiple of 16 "
                                                "pixels."}),
                "vae": ("SD35_VAE", {"tooltip": "The SD3 VAE (from the checkpoint or SD3.5 VAE Loader)."}),
                "mask": ("MASK", {"tooltip": "Where to repaint (1 = repaint): LoadImage's mask from the mask "
                                             "editor, ImagePadForOutpaint's, or any mask node's."}),
                "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1,
                                         "tooltip": "Grow the (rounded) mask by this many pixels so the repainted "
                                                    "part blends in."}),
            },
            "optional": dict(TILE_INPUTS),
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent of the image with the masked part greyed out, carrying the grown mask as its "
                       "noise mask, for SD3.5 Sampler (denoise 1).",)
    FUNCTION = "encode"
    CATEGORY = "sd35/latent"
    DESCRIPTION = ("Encodes an image for inpainting or outpainting: the masked pixels are set to grey before "
                   "encoding, and the rounded mask, grown by grow_mask_by pixels, is attached as the latent's "
                   "noise mask (ComfyUI's VAE Encode (for Inpainting), for the SD3 VAE).")

    def encode(self, pixels, vae, mask, grow_mask_by: int = 6, tiled: bool = False, tile_size: int = 512,
               overlap: int = 64):
        node = "SD3.5 VAE Encode (for Inpainting)"
        vae = _vae(vae, node)
        try:
            prepared = prepare_inpaint(pixels, mask, grow_mask_by, multiple=SIZE_STEP)
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
        module = vae.managed.load()
        x = image_to_vae_input(prepared.pixels)
        with torch.no_grad():
            if tiled:
                latent = module.encode_tiled(x, tile_size, overlap, callback=_tile_progress(1))
            else:
                latent = module.encode(x)
        return ({"samples": latent.cpu(), "noise_mask": prepared.noise_mask.cpu()},)
