"""ComfyUI ``CONDITIONING`` <-> sd35_core :class:`~sd35_core.sampling.guidance.CondEntry`.

A ``CONDITIONING`` is ComfyUI's list of ``[context, options]`` pairs. The options this pack reads are the
ones ComfyUI's own nodes write: ``pooled_output`` (SD3 text encoding), ``strength``, and
``start_percent`` / ``end_percent`` (Conditioning Set Timestep Range); Conditioning Combine simply makes
the list longer. ControlNets applied with SD35 Apply ControlNet ride along under :data:`CONTROL_KEY`, the
way ComfyUI's own ``control`` key does, and the sampler collects them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..sd35_core.sampling.guidance import CondEntry
from .objects import SD35VAE, SD35ControlNet

log = logging.getLogger(__name__)

CONTROL_KEY = "sd35_control"
# Options of native ComfyUI conditioning this sampler cannot honour; they are ignored with a warning.
UNSUPPORTED_OPTIONS = ("area", "mask", "control", "gligen", "hooks")


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
                "text encoder (SD35 Text Encode, or ComfyUI's CLIPTextEncodeSD3 / CLIP Text Encode with an SD3 "
                "triple CLIP)"
            )
        ignored = [key for key in UNSUPPORTED_OPTIONS if options.get(key) is not None]
        if ignored:
            log.warning("sd35: %s[%d]: ignoring conditioning options this sampler does not support: %s",
                        name, k, ", ".join(ignored))
        entries.append(CondEntry(
            context=context,
            pooled=pooled,
            strength=float(options.get("strength", 1.0)),
            start_percent=float(options.get("start_percent", 0.0)),
            end_percent=float(options.get("end_percent", 1.0)),
        ))
        for spec in options.get(CONTROL_KEY, ()):
            if all(spec is not c for c in controls):
                controls.append(spec)
    return entries, controls


def attach_control(conditioning, spec: ControlSpec) -> list:
    """A copy of ``conditioning`` with ``spec`` added to every entry (tensors are shared, not copied)."""
    out = []
    for item in conditioning:
        options = dict(item[1])
        options[CONTROL_KEY] = tuple(options.get(CONTROL_KEY, ())) + (spec,)
        out.append([item[0], options, *item[2:]])
    return out
