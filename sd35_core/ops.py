"""Layers that compute in the dtype of their input, whatever dtype their weights are stored in.

Storing weights in one dtype (fp8 e4m3fn, fp16, bf16) and computing in another is what lets a 16 GB
SD3.5 Large run in 8 GB. Every model in this package builds on these layers instead of ``torch.nn``'s,
so a checkpoint can be loaded straight into its storage dtype and the compute dtype is chosen by
whatever dtype the caller feeds in. When the two match, ``Tensor.to`` returns the same tensor: no copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, with an optional learned scale (SD3.5 qk-norm, T5)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * _cast(self.weight, x)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention over ``[B, L, heads*dim]`` tensors through PyTorch's fused SDPA kernels."""
    b, _, inner = q.shape
    dim = inner // heads
    q, k, v = (t.view(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, inner)
