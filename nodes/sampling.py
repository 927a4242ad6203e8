"""The sampler node: CFG, skip-layer guidance, ControlNets and noise masks over sd35_core's pipeline."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..sd35_core.image.control_image import prepare_control_image
from ..sd35_core.models.controlnet import check_controlnet_fits
from ..sd35_core.models.latent import process_in
from ..sd35_core.sampling import pipeline
from ..sd35_core.sampling.control import ControlHint
from ..sd35_core.sampling.guidance import CondEntry
from ..sd35_core.sampling.mask import MASK_MODES, latent_mask
from ..sd35_core.sampling.request import SEED_MODES, SLG_WINDOWS, SampleRequest, SkipLayerGuidance
from ..sd35_core.sampling.samplers import SAMPLERS
from ..sd35_core.sampling.schedule import SCHEDULES
from ..sd35_core.validation import MAX_SEED
from . import host
from .conditioning import ControlSpec, to_entries
from .ip_adapter import ip_adapter_hints
from .lora import lora_context
from .model_input import MODEL_TYPES, compute_dtype, default_shift, diffusion_input, encode_pixels, load_for_sampling
from .objects import SD35Model

log = logging.getLogger(__name__)

NODE = "SD3.5 Sampler"


def parse_layers(text: str) -> tuple[int, ...]:
    """``"7,8,9"`` -> ``(7, 8, 9)``; empty means no skip-layer guidance. ValueError for anything else."""
    layers = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"slg_layers: expected comma-separated joint block numbers like 7,8,9; got {text!r}")
        layers.append(int(part))
    return tuple(layers)


def pad_context(entries: list[CondEntry], model) -> list[CondEntry]:
    """Zero-pad narrower contexts (CLIP-only encodings, made without T5) to the model's context width.

    The reference pads the CLIP states to the T5 width with zeros and uses zeros for a missing T5, so this
    gives exactly what encoding at the full width gives. Wider contexts are left for the guider to refuse.
    """
    width = model.config.context_dim
    out = []
    for e in entries:
        if isinstance(e.context, torch.Tensor) and e.context.ndim == 3 and e.context.shape[-1] < width:
            e = replace(e, context=F.pad(e.context, (0, width - e.context.shape[-1])))
        out.append(e)
    return out


def model_memory_estimate(model, latent: torch.Tensor, rows_per_image: int) -> int:
    """Rough activation memory of one sampling step, so ComfyUI keeps that much free next to the weights."""
    cfg = model.config
    b, _, h, w = latent.shape
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size) + 333
    itemsize = torch.empty((), dtype=compute_dtype(model)).element_size()
    return int(b * rows_per_image * tokens * cfg.hidden_size * itemsize * 16)


def _with_loras(model, runner):
    """Our LoRA stack (SD3.5 LoRA Loader), merged for this run and undone after it; a native MODEL's LoRAs are
    already in its weights."""
    return lora_context(model, runner) if isinstance(model, SD35Model) else contextlib.nullcontext(runner)


def build_hints(specs: list[ControlSpec], model, latent: torch.Tensor) -> list[ControlHint]:
    """Encode each attached control image at the generation size and make the sampler's hints."""
    hints = []
    b, _, h, w = latent.shape
    for spec in specs:
        cn = spec.controlnet
        path = check_controlnet_fits(cn.controlnet.config, model.config)
        kind = spec.control_type if spec.control_type != "auto" else cn.control_type
        if kind is None:
            raise ValueError(
                f"{NODE}: the ControlNet {cn.source} does not say whether it is a canny, blur or depth model; "
                "choose control_type on SD3.5 Apply ControlNet"
            )
        if spec.image.shape[0] not in (1, b):
            raise ValueError(f"{NODE}: the control image batch ({spec.image.shape[0]}) must be 1 or the latent "
                             f"batch ({b})")
        pixels = prepare_control_image(spec.image, w * 8, h * 8, kind, spec.invert, path=path,
                                       resize_mode=spec.resize_mode)
        cond_latent = process_in(encode_pixels(spec.vae, pixels))
        # A Cancel pressed during the encode stops here, before the (longer) sampling starts.
        host.check_interrupt()
        hints.append(ControlHint(cn.controlnet, cond_latent, spec.strength, spec.start, spec.end,
                                 encode=_area_encoder(spec, kind, path)))
    return hints


def _area_encoder(spec: ControlSpec, kind: str, path: str):
    """The control latent for an area conditioning entry of ``h x w`` latent pixels: the control image fitted to
    the area's size and encoded (ComfyUI's ControlNet resizes its hint to the input it is given)."""

    def encode(h: int, w: int) -> torch.Tensor:
        if (h * 8) % 16 or (w * 8) % 16:
            raise ValueError(f"{NODE}: an area of {w * 8}x{h * 8} pixels with a ControlNet: the control image is "
                             "fitted to the area, which must then be a multiple of 16 pixels each way")
        pixels = prepare_control_image(spec.image, w * 8, h * 8, kind, spec.invert, path=path,
                                       resize_mode=spec.resize_mode)
        return process_in(encode_pixels(spec.vae, pixels))

    return encode


class SD35Sampler:
    """Denoise a latent with an SD3 / SD3.5 model: CFG, skip-layer guidance, ControlNets."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPES, {"tooltip": "The diffusion model: from SD3.5 Checkpoint Loader, or a "
                                                   "ComfyUI SD3 / SD3.5 MODEL (CheckpointLoaderSimple, "
                                                   "UNETLoader, GGUF loaders, after LoRA loaders)."}),
                "positive": ("CONDITIONING", {"tooltip": "What the image should show (SD3.5 Text Encode, or "
                                                         "ComfyUI's SD3 text encoding; timestep ranges and combine "
                                                         "are honoured)."}),
                "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
                "latent": ("LATENT", {"tooltip": "SD3.5 Empty Latent for text-to-image, or an encoded image for "
                                                 "image-to-image (with denoise below 1); a noise mask on it "
                                                 "(SD3.5 VAE Encode (for Inpainting), Set Latent Noise Mask) "
                                                 "repaints only the masked part."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the starting noise (the reference draws it on the CPU, so the "
                                            "same seed gives the same image on every device)."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 10000,
                                  "tooltip": "Number of sampling steps (recommended: 40 Large, 50 Medium, 4 Turbo)."}),
                "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (recommended: 4.5 Large, 5 Medium, "
                                             "4 Medium with SLG, 1 Turbo)."}),
                "sampler": (list(SAMPLERS), {"default": "dpmpp_2m",
                                             "tooltip": "Sampling method; euler and dpmpp_2m are the reference's."}),
                "schedule": (list(SCHEDULES), {"default": "reference",
                                               "tooltip": "Noise schedule: reference (Stability's), or ComfyUI's "
                                                          "normal / simple / sgm_uniform / beta."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "Schedule shift; 0 uses the model's default (3 for SD3.5, 1 for SD3)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 for text-to-image; lower keeps more of the input latent "
                                                 "(the reference drops the first steps*(1-denoise) steps)."}),
                "slg_layers": ("STRING", {"default": "7,8,9", "multiline": False,
                                          "tooltip": "Skip-layer guidance: joint blocks skipped in the extra pass, "
                                                     "comma-separated (SD3.5 Medium: 7,8,9)."}),
                "slg_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                        "tooltip": "Skip-layer guidance strength; 0 turns it off "
                                                   "(SD3.5 Medium: 2.5)."}),
                "slg_start": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Where skip-layer guidance starts, as a fraction of the run."}),
                "slg_end": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Where skip-layer guidance ends, as a fraction of the run."}),
                "slg_window": (list(SLG_WINDOWS), {"default": "steps",
                                                   "tooltip": "How start/end are measured: steps (the reference) or "
                                                              "sigma (ComfyUI's SkipLayerGuidanceSD3 node)."}),
            },
            "optional": {
                "seed_mode": (list(SEED_MODES), {
                    "default": "batch",
                    "tooltip": "batch: one noise draw for the whole batch (reference); per_image: image i uses "
                               "seed + i, so it equals a single run with that seed."}),
                "mask_mode": (list(MASK_MODES), {
                    "default": "standard",
                    "tooltip": "With a noise mask on the latent (inpainting): standard repaints the masked part as "
                               "ComfyUI's KSampler does; differential treats a soft mask as per-pixel strength "
                               "(a pixel of value m is repainted only over the last m of the noise range)."}),
                "cache_threshold": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Step cache: 0 is off. Above 0, a step whose first joint block changed less than "
                               "this (relative) since the last full step reuses what the other blocks added then, "
                               "for cond, uncond, the skip-layer pass and ControlNets together. Higher is faster "
                               "and further from the uncached image; the first and last steps always run in "
                               "full."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent (raw VAE space), for SD3.5 VAE Decode.",)
    FUNCTION = "sample"
    CATEGORY = "sd35/sampling"
    DESCRIPTION = ("Samples an SD3 / SD3.5 model as the Stability reference does, with skip-layer guidance, "
                   "the ControlNets attached by SD3.5 Apply ControlNet, and the latent's noise mask (inpainting "
                   "and outpainting, as ComfyUI's KSampler).")

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, schedule, shift, denoise,
               slg_layers, slg_scale, slg_start, slg_end, slg_window, seed_mode="batch", mask_mode="standard",
               cache_threshold=0.0):
        model = diffusion_input(model, NODE)
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise ValueError(f"{NODE}: the latent input is not a LATENT")
        samples = latent["samples"]
        noise_mask = latent.get("noise_mask")
        if noise_mask is not None:
            try:
                latent_mask(noise_mask, samples.shape)  # the mask's checks, named after this node
            except ValueError as e:
                raise ValueError(f"{NODE}: the latent's {e}") from None
        if denoise <= 0.0:
            return (dict(latent),)
        pos, pos_controls = to_entries(positive, "positive")
        neg, neg_controls = to_entries(negative, "negative")
        specs = pos_controls + [c for c in neg_controls if all(c is not p for p in pos_controls)]
        pos, neg = pad_context(pos, model), pad_context(neg, model)

        layers = parse_layers(slg_layers)
        slg = None
        if slg_scale > 0 and layers:
            slg = SkipLayerGuidance(layers=layers, scale=slg_scale, start=slg_start, end=slg_end, window=slg_window)
            slg.check_depth(model.config.depth)
        if shift <= 0:
            shift = default_shift(model)

        hints = build_hints(specs, model, samples) if specs else []
        bridge = None if isinstance(model, SD35Model) else host.comfy_bridge()
        request = SampleRequest(steps=steps, cfg=cfg, sampler=sampler, schedule=schedule, shift=shift, seed=seed,
                                seed_mode=seed_mode, denoise=min(denoise, 1.0), slg=slg, controls=hints,
                                skip_uncond_at_cfg1=bridge is None or bridge.cfg1_optimization(model),
                                noise_mask=noise_mask, mask_mode=mask_mode, cache_threshold=cache_threshold,
                                ip_adapters=ip_adapter_hints(model))
        rows = 2 + (1 if slg is not None else 0)
        runner = load_for_sampling(model, [s.controlnet.managed for s in specs],
                                   model_memory_estimate(model, samples, rows))
        progress = host.Progress(steps, model.device, model.preview)

        def callback(info):
            progress.update(info.index, info.total, info.denoised)

        hooks = pipeline.RunHooks(callback=callback, should_cancel=host.check_interrupt)
        cfg_hooks = (bridge.model_hooks(model, positive, negative, samples.shape, cfg, request.sigmas())
                     if bridge is not None and bridge.has_cfg_hooks(model) else contextlib.nullcontext())
        with _with_loras(model, runner), cfg_hooks as model_hooks:
            if model_hooks is not None:
                request = replace(request, model_hooks=model_hooks)
            if request.denoise == 1.0 and request.noise_mask is None:
                b, _, h, w = samples.shape
                out = pipeline.txt2img(runner, pos, neg, request, width=w * 8, height=h * 8, batch_size=b, hooks=hooks)
            else:  # an image to start from, or a noise mask that keeps part of the latent
                out = pipeline.img2img(runner, pos, neg, request, init_latent=samples, hooks=hooks)
        result = dict(latent)  # the noise mask stays on the latent, as ComfyUI's KSampler leaves it
        result["samples"] = out.to(device="cpu", dtype=torch.float32)
        return (result,)
