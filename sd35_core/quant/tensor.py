"""A weight kept in its GGML block format: raw bytes plus what it takes to turn them into values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dequant import dequantize
from .quant_types import QuantType


@dataclass(frozen=True)
class QuantFormat:
    """How a layer's raw uint8 weight bytes decode: the GGML type and the weight's logical (torch) shape."""

    qtype: QuantType
    shape: tuple[int, ...]

    def dequantize(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dense weight in ``dtype`` on ``raw``'s device."""
        return dequantize(raw, self.qtype, self.shape, dtype)


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor read from a GGUF file and left quantized: ``data`` holds the blocks as uint8 ``[rows, bytes]``."""

    data: torch.Tensor
    format: QuantFormat

    @property
    def shape(self) -> tuple[int, ...]:
        return self.format.shape

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.data.to(device), self.format)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.dequantize(self.data, dtype)
