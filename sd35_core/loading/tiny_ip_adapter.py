"""Tiny IP-Adapter parts for tests and demos: a SigLIP vision tower and an InstantX-layout adapter at toy widths,
written in the real key layouts (``vision_model.*`` with the last layer, post-layernorm and pooling head a full
file has; ``image_proj.*`` / ``ip_adapter.*``, or the release's pickled ``{"image_proj", "ip_adapter"}``).

The widths keep the real structure: SigLIP heads of 72, resampler heads of 64 and four resampler blocks (what
diffusers can build), one IP attention per joint block of the tiny SD3.5 Large model (width 128, depth 4).
"""

from __future__ import annotations

import os

import torch

from ..models.ip_adapter import IPAdapter, IPAdapterConfig
from ..models.siglip import SiglipConfig, SiglipVisionTower
from .checkpoint import write_safetensors
from .tiny import MMDIT_WIDTH, randomize_

SIGLIP_TINY = SiglipConfig(width=144, layers=3, heads=2, mlp_width=288, patch_size=14, image_size=56)


def ip_adapter_config(model_hidden: int = MMDIT_WIDTH, blocks: int = 4, embed_dim: int = SIGLIP_TINY.width,
                      hidden: int = 128, num_queries: int = 8, timestep_dim: int = 32) -> IPAdapterConfig:
    """A tiny adapter for an MMDiT of ``model_hidden`` width and ``blocks`` joint blocks."""
    return IPAdapterConfig(embed_dim=embed_dim, hidden=hidden, output_dim=model_hidden, depth=4, heads=hidden // 64,
                           num_queries=num_queries, ffn_width=4 * hidden, timestep_dim=timestep_dim, blocks=blocks,
                           model_hidden=model_hidden, head_dim=64)


def tiny_ip_adapter(seed: int = 0, **kw) -> IPAdapter:
    """A seeded tiny :class:`IPAdapter` (``kw`` as :func:`ip_adapter_config`)."""
    adapter = randomize_(IPAdapter(ip_adapter_config(**kw)), seed)
    with torch.no_grad():  # learned latents of the release's scale (randn / sqrt(width))
        gen = torch.Generator().manual_seed(seed + 1)
        adapter.image_proj.latents.copy_(torch.randn(adapter.image_proj.latents.shape, generator=gen)
                                         / adapter.config.hidden**0.5)
        # the feed-forward's LayerNorm (key "layers.{i}.1.0") has no "norm" in its name: give it a norm's scale
        for layer in adapter.image_proj.layers:
            layer[1][0].weight.copy_(1.0 + 0.02 * torch.randn(layer[1][0].weight.shape, generator=gen))
    return adapter.requires_grad_(False).eval()


def tiny_siglip_state(seed: int = 0, config: SiglipConfig = SIGLIP_TINY) -> dict[str, torch.Tensor]:
    """A full ``SiglipVisionModel`` state (keys without ``vision_model.``): the tower, plus a last layer,
    post-layernorm and pooling head that ``hidden_states[-2]`` does not use."""
    tower = randomize_(SiglipVisionTower(config), seed)
    state = dict(tower.state_dict())
    last = randomize_(SiglipVisionTower(SiglipConfig(**{**config.__dict__, "layers": 2})), seed + 1)
    state.update({k.replace("encoder.layers.0.", f"encoder.layers.{config.layers - 1}."): v
                  for k, v in last.state_dict().items() if k.startswith("encoder.layers.0.")})
    gen = torch.Generator().manual_seed(seed + 2)
    w, m = config.width, config.mlp_width
    extras = {
        "post_layernorm.weight": (w,), "post_layernorm.bias": (w,), "head.probe": (1, 1, w),
        "head.attention.in_proj_weight": (3 * w, w), "head.attention.in_proj_bias": (3 * w,),
        "head.attention.out_proj.weight": (w, w), "head.attention.out_proj.bias": (w,),
        "head.layernorm.weight": (w,), "head.layernorm.bias": (w,),
        "head.mlp.fc1.weight": (m, w), "head.mlp.fc1.bias": (m,), "head.mlp.fc2.weight": (w, m),
        "head.mlp.fc2.bias": (w,),
    }
    state.update({k: torch.randn(shape, generator=gen) * 0.05 for k, shape in extras.items()})
    return state


def write_siglip(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """Write a tiny SigLIP vision file in ComfyUI's ``clip_vision`` layout (``vision_model.*``)."""
    state = {f"vision_model.{k}": v.to(dtype).contiguous() for k, v in tiny_siglip_state(seed).items()}
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    return write_safetensors(path, state)


def write_ip_adapter(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16, **kw) -> str:
    """Write a tiny adapter: ``.safetensors`` (flat, prefixed) or, for a ``.bin`` name, the release's pickle
    layout ``{"image_proj": {...}, "ip_adapter": {...}}`` saved by ``torch.save``."""
    state = {k: v.to(dtype).contiguous() for k, v in tiny_ip_adapter(seed, **kw).state_dict().items()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.lower().endswith(".bin"):
        nested = {part: {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
                  for part in ("image_proj", "ip_adapter")}
        torch.save(nested, path)
        return path
    return write_safetensors(path, state)
