"""ComfyUI ``CONDITIONING`` <-> sd35_core :class:`~sd35_core.sampling.guidance.CondEntry`.

A ``CONDITIONING`` is ComfyUI's list of ``[context, options]`` pairs. The options this pack reads are the
ones ComfyUI's own nodes write: ``pooled_output`` (SD3 text encoding), ``strength``,
``start_percent`` / ``end_percent`` (Conditioning Set Timestep Range), ``area`` (Conditioning (Set Area) and
(Set Area with Percentage)), ``mask``, ``mask_strength`` and ``set_area_to_bounds`` (Conditioning (Set Mask));
Conditioning Combine simply makes the list longer. An option the sampler does not honour (ComfyUI's own
ControlNet, GLIGEN, hooks, anything unknown) is an error naming it and what to use instead: never dropped.
ControlNets applied with SD3.5 Apply ControlNet ride along under :data:`CONTROL_KEY`, the way ComfyUI's own
``control`` key does, and the sampler collects them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..sd35_core.sampling.guidance import CondEntry
from .objects import SD35VAE, SD35ControlNet

log = logging.getLogger(__name__)

CONTROL_KEY = "sd35_control"
# What the sampler honours: the text encoding, ComfyUI's strength, timestep range, area and mask options.
HONOURED_OPTIONS = ("pooled_output", "strength", "start_percent", "end_percent", "area", "mask", "mask_strength",
                    "set_area_to_bounds")
# Written by ComfyUI's SD3 text encoding and read by none of ComfyUI's SD3 sampling either.
INERT_OPTIONS = ("attention_mask",)
_HOOKS = ("conditioning hooks (ComfyUI's hook nodes: Set CLIP Hooks, Cond Set Props, Create Hook LoRA ...), which "
          "only ComfyUI's own samplers schedule; load LoRAs with SD3.5 LoRA Loader or LoraLoader on the model "
          "instead")
# Options of native ComfyUI conditioning this sampler does not honour, with what to use instead.
REFUSED_OPTIONS = {
    "control": "ComfyUI's Apply ControlNet: use SD3.5 Apply ControlNet: it loads the same files",
    "control_apply_to_uncond": "ComfyUI's Apply ControlNet: use SD3.5 Apply ControlNet: it loads the same files",
    "crossattn_controlnet": "a ControlNet's cross-attention conditioning: use SD3.5 Apply ControlNet",
    "gligen": "GLIGEN (GLIGENTextBoxApply), which SD3 models have no layers for: place a prompt with Conditioning "
              "(Set Area) or (Set Mask) instead",
    "hooks": _HOOKS,
    "clip_start_percent": _HOOKS,
    "clip_end_percent": _HOOKS,
    "default": "default conditioning (Conditioning Set Default Combine and the paired hook nodes): combine the "
               "prompts with Conditioning (Combine) instead",
}


@dataclass(eq=False)
class ControlSpec:
    """A ControlNet attached to conditioning; the control image is encoded at sampling time, when the
    generation size is known (the reference resizes the control image to it)."""

    controlnet: SD35ControlNet
    vae: SD35VAE | object  # or a ComfyUI VAE (see model_input.vae_input)
    image: torch.Tensor
    strength: float
    start: float
    end: float
    control_type: str  # "auto" (from the file), "canny", "blur" or "depth"
    invert: bool | str  # depth maps: False, True or "auto"
    resize_mode: str = "crop"  # another aspect ratio than the generation: crop, stretch or pad (sd35_core.image.fit)


def make_conditioning(context: torch.Tensor, pooled: torch.Tensor) -> list:
    """A one-entry ``CONDITIONING`` as ComfyUI's SD3 text encoding produces it."""
    return [[context, {"pooled_output": pooled}]]


def to_entries(conditioning, name: str) -> tuple[list[CondEntry], list[ControlSpec]]:
    """Convert a ``CONDITIONING`` to guidance entries and the ControlNets attached to it.

    Raises ``ValueError`` naming the input (``positive`` / ``negative``) and entry when something is not
    SD3 conditioning.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{name}: expected a CONDITIONING (a non-empty list of [context, options]); "
                         f"got {type(conditioning).__name__}")
    entries: list[CondEntry] = []
    controls: list[ControlSpec] = []
    for k, item in enumerate(conditioning):
        if not isinstance(item, (list, tuple)) or len(item) < 2 or not isinstance(item[1], dict):
            raise ValueError(f"{name}[{k}]: expected a [context, options] pair")
        context, options = item[0], item[1]
        if not isinstance(context, torch.Tensor) or context.ndim != 3:
            raise ValueError(f"{name}[{k}]: expected a context tensor [batch, tokens, width]; got "
                             f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
        pooled = options.get("pooled_output")
        if pooled is None:
            raise ValueError(
                f"{name}[{k}]: the conditioning has no pooled_output; SD3 models need conditioning from an SD3 "
                "text encoder (SD3.5 Text Encode, or ComfyUI's CLIPTextEncodeSD3 / CLIP Text Encode with an SD3 "
                "triple CLIP)"
            )
        check_options(options, f"{name}[{k}]")
        mask = options.get("mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name}[{k}] mask: expected a MASK [batch, height, width], got {shape}")
        area = options.get("area")
        entries.append(CondEntry(
            context=context,
            pooled=pooled,
            strength=float(options.get("strength", 1.0)),
            start_percent=float(options.get("start_percent", 0.0)),
            end_percent=float(options.get("end_percent", 1.0)),
            area=None if area is None else _area(area, f"{name}[{k}] area"),
            mask=mask,
            mask_strength=float(options.get("mask_strength", 1.0)),
            set_area_to_bounds=bool(options.get("set_area_to_bounds", False)) and mask is not None,
        ))
        for spec in options.get(CONTROL_KEY, ()):
            if all(spec is not c for c in controls):
                controls.append(spec)
    return entries, controls


def check_options(options: dict, where: str) -> None:
    """ValueError naming every option of a conditioning entry the sampler does not honour, and what to use."""
    refused = []
    for key, value in options.items():
        if value is None or key in HONOURED_OPTIONS or key in INERT_OPTIONS or key.startswith("sd35_"):
            continue
        refused.append(f"'{key}' ({REFUSED_OPTIONS.get(key, 'not an option SD3 sampling reads')})")
    if refused:
        raise ValueError(f"SD3.5 Sampler: {where} carries {'; '.join(refused)}; the sampler honours every option it "
                         "is given or refuses it, so remove the node that set it or sample with KSampler")


def _area(area, where: str) -> tuple:
    """ComfyUI's area option as CondEntry takes it: ``(h, w, y, x)`` latent pixels as whole numbers, or
    ``("percentage", h, w, y, x)``."""
    try:
        items = tuple(area)
    except TypeError:
        raise ValueError(f"{where}: expected ComfyUI's (height, width, y, x), got {area!r}") from None
    if items and items[0] == "percentage":
        return ("percentage",) + tuple(float(v) for v in items[1:])
    return tuple(int(v) if isinstance(v, (int, float)) and float(v).is_integer() else v for v in items)


def attach_control(conditioning, spec: ControlSpec) -> list:
    """A copy of ``conditioning`` with ``spec`` added to every entry (tensors are shared, not copied)."""
    out = []
    for item in conditioning:
        options = dict(item[1])
        options[CONTROL_KEY] = tuple(options.get(CONTROL_KEY, ())) + (spec,)
        out.append([item[0], options, *item[2:]])
    return out
