"""What a ``model`` socket of the SD3.5 Sampler and ControlNet loader may carry: our ``SD35_MODEL``, or a native
ComfyUI SD3 / SD3.5 ``MODEL`` (CheckpointLoaderSimple, UNETLoader, a GGUF or fp8 loader pack, after LoRA and
other model nodes), and how each is made ready for sampling; likewise the ControlNet's ``vae`` socket, which
takes our ``SD35_VAE`` or a ComfyUI ``VAE``.

A native model is loaded the way ComfyUI's own samplers load it (its weight and object patches applied) and
then sampled by our reference-exact sampler, either through our MMDiT-X over its own tensors or, where that
would not compute the same, through its own forward pass (see comfy_bridge.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..sd35_core.sampling.defaults import defaults_for
from . import host
from .objects import SD35VAE, SD35Model, require_type

log = logging.getLogger(__name__)

# The socket types: ComfyUI's union syntax, so both kinds link to the same input.
MODEL_TYPES = "SD35_MODEL,MODEL"
VAE_TYPES = "SD35_VAE,VAE"


def diffusion_input(value, node: str):
    """``value`` as an :class:`~.objects.SD35Model` or a checked native model (``comfy_bridge.NativeModel``).

    Both answer ``config``, ``variant``, ``device`` and ``compute_dtype``; anything else is a ValueError
    naming the node.
    """
    if isinstance(value, SD35Model):
        return value
    bridge = host.comfy_bridge()
    if bridge is not None and bridge.is_native_model(value):
        return bridge.inspect_native(value, node)
    return require_type(value, SD35Model, "model", node)


def default_shift(model) -> float:
    """The shift for ``shift = 0``: the variant's (ours), or the native model's sampling (ModelSamplingSD3)."""
    if isinstance(model, SD35Model):
        return defaults_for(model.variant).shift
    return model.shift


def load_for_sampling(model, extra: Sequence[host.ManagedModule], memory_required: int):
    """Load ``model`` with the ``extra`` modules used beside it; return what the sampler runs: an MMDiT-X, or
    whole passes of a native model (``sd35_core.sampling.passes.WholePasses``)."""
    if isinstance(model, SD35Model):
        # the IP-Adapters it carries load with it (each once, however often it is applied)
        adapters = {id(a.ip_adapter): a.ip_adapter.managed for a in model.ip_adapters}
        model.managed.load(extra=[*extra, *adapters.values()], memory_required=memory_required)
        return model.mmdit
    return host.comfy_bridge().load_native(model, [m.patcher for m in extra], memory_required)


def compute_dtype(model) -> torch.dtype:
    """The dtype the model's activations run in."""
    return model.mmdit.compute_dtype if isinstance(model, SD35Model) else model.compute_dtype


def vae_input(value, node: str):
    """``value`` as an :class:`~.objects.SD35VAE` or a ComfyUI ``VAE``; anything else is a ValueError."""
    bridge = host.comfy_bridge()
    if bridge is not None and bridge.is_native_vae(value):
        return value
    return require_type(value, SD35VAE, "vae", node)


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Raw VAE-space latent of VAE-ready ``pixels`` ``[B, 3, H, W]`` through either kind of VAE."""
    if isinstance(vae, SD35VAE):
        vae.managed.load()
        with torch.no_grad():
            return vae.vae.encode(pixels)
    return host.comfy_bridge().encode_with_native_vae(vae, pixels)
