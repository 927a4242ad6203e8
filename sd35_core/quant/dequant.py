"""GGML block formats to dense tensors, in torch, on whatever device the bytes are on.

Each ``_<type>`` function takes ``[n_blocks, type_size]`` uint8 blocks and returns ``[n_blocks, block_size]``
float32 values computed with the same float32 operations, in the same order, as ggml's reference
dequantizers (the ones the ``gguf`` Python package mirrors), so the results agree bit for bit. The cast to
the compute dtype comes last: for every type here the float32 value is the exact product of an fp16 scale
and a small integer (plus an fp16 offset), so casting once at the end rounds exactly like ggml does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .quant_types import QK_K, QuantType


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row (little-endian fp16) -> float32 ``[n, 1]``."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).view(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` packed bytes -> ``[n, 32]`` float32: the 16 low nibbles, then the 16 high ones (ggml's order)."""
    out = torch.empty((qs.shape[0], 32), dtype=torch.float32, device=qs.device)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    return out


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> its 32 bits ``[n, 32]``, bit 0 first."""
    return ((qh.unsqueeze(-1) >> _shifts(range(8), (1, 1, 8), qh)) & 1).reshape(qh.shape[0], 32)


# The 32-value formats work in place on one float32 buffer: small integers are exact in float32, so
# ``float(q) - 8`` is ggml's ``float(q - 8)``, and ``mul_``/``add_`` are its multiply and add, in its order.


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].view(torch.int8).to(torch.float32).mul_(d)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]).sub_(8).mul_(d)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:]).mul_(d).add_(m)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:]).add_(_bits32(b[:, 2:6]) << 4).sub_(16).mul_(d)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 8:]).add_(_bits32(b[:, 4:8]) << 4).mul_(d).add_(m)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b)) & 3
    return (dl * q.reshape(n, 16, 16).to(torch.float32) - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    # 16 six-bit scales: low four bits in bytes 0..7 (two per byte), high two bits in bytes 8..11.
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts((0, 4), (1, 2, 1), b)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), (1, 4, 1), b)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).view(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), b)).reshape(n, 16, 16) & 1
    # A set high bit means no offset; a clear one subtracts 4.
    q = ql.view(torch.int8) - ((qh ^ 1) << 2).view(torch.int8)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight six-bit scales and eight six-bit mins."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _shifts((0, 4), (1, 1, 2, 1), b)) & 0x0F
    return (d * q.reshape(n, 8, 32).to(torch.float32) - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    ql = ((b[:, 48:].reshape(n, 4, 1, 32) >> _shifts((0, 4), (1, 1, 2, 1), b)) & 0x0F).reshape(n, 8, 32)
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), b)) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> _shifts((0, 4), (1, 1, 2, 1), b)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), (1, 1, 4, 1), b)) & 0x03).reshape(n, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 16, 16)
    return (d * q.to(torch.float32)).reshape(n, QK_K)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an fp32: widen by shifting the bits, as ggml does.
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32,
    "F16": _f16_values,
    "BF16": _bf16,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(
    raw: torch.Tensor, qtype: QuantType, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense ``shape`` tensor in ``dtype`` from the raw uint8 bytes of a ``qtype`` tensor, on ``raw``'s device."""
    fn = DEQUANTIZERS.get(qtype.name)
    if fn is None:
        raise ValueError(f"GGML type {qtype.name}: no dequantizer; supported: {', '.join(DEQUANTIZERS)}")
    n = 1
    for s in shape:
        n *= int(s)
    if n % qtype.block_size or raw.numel() != qtype.nbytes(n):
        raise ValueError(
            f"{qtype.name} tensor of shape {tuple(shape)}: expected {qtype.nbytes(n)} bytes in whole "
            f"blocks of {qtype.block_size} values; got {raw.numel()}"
        )
    blocks = raw.reshape(-1, qtype.type_size)
    return fn(blocks).reshape(tuple(shape)).to(dtype)
