"""Tiny, seeded model sets in the official checkpoint layouts, for tests, the demo and benchmarks.

The real code paths (file detection, shape-derived configs, loaders, samplers) run unchanged on them;
only the sizes are small. Random weights draw noise: these files prove plumbing and numerics, not images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from safetensors.torch import save_file
from torch import nn


def randomize_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fill every parameter of ``module`` with seeded values that keep activations well scaled.

    Matrices get ``N(0, 1/fan_in)`` so deep stacks neither explode nor vanish; vectors (biases, norm
    scales) get ``1 + N(0, std)`` when they are norm weights and ``N(0, std)`` otherwise, so every
    tensor differs from its default and a parity test can catch a mixed-up key.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif _is_norm_weight(name):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return module


def _is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return name.endswith(".weight") and any("norm" in part or part.startswith("ln_") for part in leaf[:-1])


def save_state(
    path: str | os.PathLike,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``{prefix: state_dict}`` as one ``.safetensors`` file, optionally cast to ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    for prefix, state in parts.items():
        for k, v in state.items():
            t = v.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[prefix + k] = t.contiguous()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(out, path, metadata=dict(metadata or {}))
    return path
