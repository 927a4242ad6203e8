"""Shared pieces of the IP-Adapter tests: the tiny SD3.5 Large model with an adapter, their diffusers twins, and
the hand-batched IP input an independent computation builds row by row."""

from __future__ import annotations

import functools

import torch

from bench.diffusers_convert import diffusers_model, to_diffusers
from sd35_core.loading.tiny_ip_adapter import SIGLIP_TINY, tiny_ip_adapter
from sd35_core.models.ip_adapter import IPAdapter, IPRows, IPTokens
from sd35_core.models.mmditx import MMDiTX

from .sampling_common import model as tiny_model


def large(seed: int = 0) -> MMDiTX:
    """The tiny SD3.5 Large-shaped model (width 128, depth 4, 2 heads of 64)."""
    return tiny_model("sd3.5_large", seed=seed)


@functools.cache
def adapter(seed: int = 0) -> IPAdapter:
    return tiny_ip_adapter(seed)


def features(n: int = 1, seed: int = 11) -> torch.Tensor:
    """Stand-in SigLIP features ``[n, 16, 144]`` of the tiny tower's shape."""
    return torch.randn(n, SIGLIP_TINY.tokens, SIGLIP_TINY.width, generator=torch.Generator().manual_seed(seed))


def release_state(ip: IPAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter as the release pickles it: ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    state = ip.state_dict()
    return {part: {k[len(part) + 1:]: v.clone() for k, v in state.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")}


def diffusers_twin(model: MMDiTX, ip: IPAdapter, scale: float):
    """diffusers' SD3Transformer2DModel with our weights and the adapter loaded by its own IP-Adapter loader."""
    ref = diffusers_model(model.config)
    ref.load_state_dict(to_diffusers(model.state_dict(), model.config), strict=True)
    ref._load_ip_adapter_weights(release_state(ip), low_cpu_mem_usage=False)
    for proc in ref.attn_processors.values():
        proc.scale = scale
    return ref.requires_grad_(False).eval()


def hand_ip(terms: list[tuple[IPAdapter, torch.Tensor, float]], positive: list[bool], sigma: torch.Tensor) -> IPRows:
    """IP input built row by row: each row runs the resampler alone on its picture (positive) or on zeros."""
    out = []
    for ip, feats, scale in terms:
        for k in range(feats.shape[0]):
            tokens, tembs = [], []
            for pos, s in zip(positive, sigma.tolist(), strict=True):
                source = feats[k:k + 1] if pos else torch.zeros_like(feats[:1])
                tok, temb = ip.image_proj(source, torch.tensor([s * 1000.0]))
                tokens.append(tok)
                tembs.append(temb)
            out.append(IPTokens(ip, torch.cat(tokens), torch.cat(tembs), scale))
    return IPRows(tuple(out))
