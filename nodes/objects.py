"""What travels on the pack's own socket types (SD35_MODEL, SD35_CLIP, SD35_VAE, SD35_CONTROLNET, SD35_IPADAPTER,
SD35_CLIP_VISION).

Each object pairs the loaded sd35_core module with its :class:`~.host.ManagedModule`, so every node asks
ComfyUI's model management for the room before computing and the loaders' cache hands back the same object
(and the same registration) on a re-queue.

SD35_MODEL and SD35_CLIP also carry ``loras``: the ordered ``(LoraPatches, strength)`` stack that the LoRA
node appends to. A LoRA'd object is a new, light object sharing the loaded module; the sampler and the text
encode node apply its stack only while they run, so the input object, and every other branch of the graph
that uses it, stays the unpatched base. SD35_MODEL's ``ip_adapters`` grow the same way (SD3.5 Apply IP-Adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sd35_core.loading.loader import DiffusionModel
from ..sd35_core.loading.lora import LoraPatches
from ..sd35_core.models.controlnet import ControlNet
from ..sd35_core.models.ip_adapter import IPAdapter
from ..sd35_core.models.latent import LatentPreview
from ..sd35_core.models.siglip import SiglipVisionTower
from ..sd35_core.models.vae import VAE
from . import host


@dataclass(eq=False)
class SD35Model:
    """SD35_MODEL: a diffusion model ready to sample."""

    diffusion: DiffusionModel
    managed: host.ManagedModule
    loras: tuple[tuple[LoraPatches, float], ...] = ()
    ip_adapters: tuple[IPApplication, ...] = ()  # from SD3.5 Apply IP-Adapter, in the order applied

    @property
    def mmdit(self):
        return self.diffusion.mmdit

    @property
    def config(self):
        return self.diffusion.config

    @property
    def variant(self) -> str:
        return self.diffusion.variant

    @property
    def preview(self) -> LatentPreview:
        return self.diffusion.preview

    @property
    def device(self) -> torch.device:
        return self.managed.load_device


@dataclass(eq=False)
class SD35Clip:
    """SD35_CLIP: CLIP-L, CLIP-G and optionally T5-XXL, with the device they encode on.

    The tokenizer is looked up on first use, so a checkpoint loader used only for its diffusion model
    never fails for want of tokenizer files.
    """

    clip_l: torch.nn.Module
    clip_g: torch.nn.Module
    t5: torch.nn.Module | None
    managed: host.ManagedModule
    source: str
    _encoder: object | None = field(default=None, repr=False)
    loras: tuple[tuple[LoraPatches, float], ...] = ()

    @property
    def device(self) -> torch.device:
        return self.managed.load_device

    @property
    def modules(self) -> torch.nn.Module:
        """The encoders as one module (children ``clip_l``, ``clip_g``, ``t5xxl``): what LoRAs patch."""
        return self.managed.module


@dataclass(eq=False)
class SD35VAE:
    """SD35_VAE: the SD3 autoencoder."""

    vae: VAE
    managed: host.ManagedModule
    source: str

    @property
    def device(self) -> torch.device:
        return self.managed.load_device


@dataclass(eq=False)
class SD35ControlNet:
    """SD35_CONTROLNET: a ControlNet, loaded for (and checked against) one diffusion model."""

    controlnet: ControlNet
    managed: host.ManagedModule
    source: str

    @property
    def control_type(self) -> str | None:
        return self.controlnet.control_type_name


@dataclass(eq=False)
class SD35ClipVision:
    """SD35_CLIP_VISION: the SigLIP vision tower of the IP-Adapter."""

    tower: SiglipVisionTower
    managed: host.ManagedModule
    source: str


@dataclass(eq=False)
class SD35IPAdapter:
    """SD35_IPADAPTER: an SD3.5 IP-Adapter (resampler and per-block IP attention)."""

    adapter: IPAdapter
    managed: host.ManagedModule
    source: str


@dataclass(frozen=True, eq=False)
class IPApplication:
    """One SD3.5 Apply IP-Adapter on a model: the adapter, the pictures' SigLIP features (CPU float32,
    ``[n, tokens, width]``), its weight and its window (fractions of the steps)."""

    ip_adapter: SD35IPAdapter
    features: torch.Tensor
    weight: float
    start: float
    end: float


def require(value, socket: str, node: str, hint: str):
    """``value`` unless it is ``None``: then a clear error for the node that needed it."""
    if value is None:
        raise ValueError(f"{node}: the {socket} input is empty. {hint}")
    return value


def require_type(value, cls: type, socket: str, node: str):
    """Check that an input carries this pack's object (and not, say, a native ComfyUI MODEL)."""
    if value is None:
        raise ValueError(f"{node}: the {socket} input is empty")
    if not isinstance(value, cls):
        raise ValueError(
            f"{node}: the {socket} input got a {type(value).__name__}; it expects the output of an SD3.5 loader "
            "node (native ComfyUI models cannot be used with the SD3.5 nodes)"
        )
    return value
