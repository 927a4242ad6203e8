"""Layers that compute in the dtype of their input, whatever dtype their weights are stored in.

Storing weights in one dtype (fp8 e4m3fn, fp16, bf16) and computing in another is what lets a 16 GB
SD3.5 Large run in 8 GB. Every model in this package builds on these layers instead of ``torch.nn``'s,
so a checkpoint can be loaded straight into its storage dtype and the compute dtype is chosen by
whatever dtype the caller feeds in. When the two match, ``Tensor.to`` returns the same tensor: no copy.

A weight may also stay in a GGUF block format (Q8_0, Q4_0, ...): then the layer holds the raw bytes as its
``weight`` and their format as ``weight_quant``, and :func:`materialize_weight` dequantizes it on the
compute device each time the layer runs.

A weight from a scaled-fp8 file (ComfyUI's ``scaled_fp8`` layout) stays fp8 and carries its per-tensor scale as
the non-persistent buffer ``weight_scale``: :func:`materialize_weight` multiplies it in, so the stored fp8 values
times the scale are the weight every caller (the forward pass, compute-time LoRA) sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.tensor import QuantFormat, QuantizedTensor


def materialize_weight(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``layer.weight`` as a dense tensor in ``dtype`` on ``device``, whatever form it is stored in.

    The one place where a stored weight becomes the weight the layer computes with: a cast for
    fp32/fp16/bf16/fp8 storage, the cast times the per-tensor scale for scaled fp8, dequantization for a
    GGUF-quantized weight (moved as raw bytes, so only the compact form crosses devices). Compute-time patches
    (LoRA) belong here too, on top of the returned weight, so they apply to every storage format alike.
    """
    quant: QuantFormat | None = getattr(layer, "weight_quant", None)
    scale: torch.Tensor | None = getattr(layer, "weight_scale", None)
    if quant is not None:
        weight = quant.dequantize(layer.weight.to(device), dtype)
    elif scale is not None:
        # The product is formed in float32 (fp8 values are exact there) and rounded once to the compute dtype,
        # so a bf16/fp16 run sees the effective weight rounded once, as if the file had stored it plainly.
        weight = layer.weight.to(device=device, dtype=torch.float32, copy=True)  # never scale the stored tensor
        weight = weight.mul_(scale.to(device=device, dtype=torch.float32)).to(dtype)
    else:
        weight = layer.weight.to(device=device, dtype=dtype)
    # ``weight_patch`` is set only while a LoRA is applied at compute time (sd35_core.loading.lora.apply): storage
    # that would round the update away (fp8, GGUF blocks) gets it here, in the compute dtype.
    patch = getattr(layer, "weight_patch", None)
    return weight if patch is None else patch(weight)


def store_quantized_weight(layer: nn.Module, weight: QuantizedTensor) -> None:
    """Make ``layer`` keep ``weight`` in its block format: raw bytes as ``layer.weight``, format alongside.

    The parameter keeps its name, so ``state_dict()`` still lists the official key (holding the raw bytes);
    ``Module.to(dtype)`` leaves uint8 parameters alone, and ``Module.to(device)`` moves the bytes.
    """
    layer.weight = nn.Parameter(weight.data, requires_grad=False)
    layer.weight_quant = weight.format


def store_weight_scale(layer: nn.Module, scale: torch.Tensor) -> None:
    """Give ``layer`` a per-tensor weight scale (a one-value float32 tensor): its weight is ``weight * scale``.

    A non-persistent buffer, so ``Module.to(device)`` moves it along with the weight and ``state_dict()`` keeps
    only the official keys (LoRA key maps and checkpoint saving see the same names as for a plain file).
    """
    layer.register_buffer("weight_scale", scale.detach().reshape(()).to(torch.float32), persistent=False)


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    weight_patch = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, materialize_weight(self, x.dtype, x.device), _cast(self.bias, x))


class Conv2d(nn.Conv2d):
    weight_patch = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, materialize_weight(self, x.dtype, x.device), _cast(self.bias, x))


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
