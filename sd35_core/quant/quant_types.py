"""The GGML tensor types a GGUF file can declare: their ids, block geometry, and which ones load here.

Geometry (values per block, bytes per block) follows ggml's type traits. Every id ggml defines is listed,
so a file with a type this package cannot dequantize (the IQ and ternary families, Q8_1, Q8_K) gets an
error that names the type instead of "unknown".
"""

from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # values per super-block of the K-quants


@dataclass(frozen=True)
class QuantType:
    """One GGML tensor type: ``block_size`` values stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int
    supported: bool

    @property
    def is_float(self) -> bool:
        """A plain floating-point layout (no blocks, no scales): read it as a tensor of that dtype."""
        return self.name in ("F32", "F16", "BF16")

    def nbytes(self, n_values: int) -> int:
        return n_values // self.block_size * self.type_size


def _t(id_: int, name: str, block_size: int, type_size: int, supported: bool = True) -> QuantType:
    return QuantType(id_, name, block_size, type_size, supported)


TYPES: dict[int, QuantType] = {
    t.id: t
    for t in (
        _t(0, "F32", 1, 4),
        _t(1, "F16", 1, 2),
        _t(2, "Q4_0", 32, 2 + 16),
        _t(3, "Q4_1", 32, 2 + 2 + 16),
        _t(6, "Q5_0", 32, 2 + 4 + 16),
        _t(7, "Q5_1", 32, 2 + 2 + 4 + 16),
        _t(8, "Q8_0", 32, 2 + 32),
        _t(9, "Q8_1", 32, 4 + 4 + 32, False),
        _t(10, "Q2_K", QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
        _t(11, "Q3_K", QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
        _t(12, "Q4_K", QK_K, 2 + 2 + 12 + QK_K // 2),
        _t(13, "Q5_K", QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        _t(14, "Q6_K", QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
        _t(15, "Q8_K", QK_K, 4 + QK_K + QK_K // 8, False),
        _t(16, "IQ2_XXS", QK_K, 2 + QK_K // 4, False),
        _t(17, "IQ2_XS", QK_K, 2 + QK_K // 4 + QK_K // 32, False),
        _t(18, "IQ3_XXS", QK_K, 2 + QK_K // 4 + QK_K // 8, False),
        _t(19, "IQ1_S", QK_K, 2 + QK_K // 8 + QK_K // 16, False),
        _t(20, "IQ4_NL", 32, 2 + 16, False),
        _t(21, "IQ3_S", QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4, False),
        _t(22, "IQ2_S", QK_K, 2 + QK_K // 4 + QK_K // 16, False),
        _t(23, "IQ4_XS", QK_K, 2 + 2 + QK_K // 2 + QK_K // 64, False),
        _t(24, "I8", 1, 1, False),
        _t(25, "I16", 1, 2, False),
        _t(26, "I32", 1, 4, False),
        _t(27, "I64", 1, 8, False),
        _t(28, "F64", 1, 8, False),
        _t(29, "IQ1_M", QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32, False),
        _t(30, "BF16", 1, 2),
        _t(34, "TQ1_0", QK_K, 2 + 4 * 13, False),
        _t(35, "TQ2_0", QK_K, 2 + 64, False),
        _t(39, "MXFP4", 32, 1 + 16, False),
    )
}
BY_NAME: dict[str, QuantType] = {t.name: t for t in TYPES.values()}
SUPPORTED = tuple(t.name for t in TYPES.values() if t.supported)


def quant_type(name: str) -> QuantType:
    """The type called ``name`` (``"Q8_0"``, ``"F16"``, ...)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"GGML type: expected one of {', '.join(BY_NAME)}; got {name!r}") from None
