"""A memory-mapped reader for GGUF files (the format of llama.cpp and city96's ComfyUI-GGUF).

Layout (little-endian): magic ``GGUF``, version (2 or 3), tensor count, metadata count; the metadata
key/value pairs; one info record per tensor (name, dims innermost-first, GGML type, data offset); then,
at the next multiple of ``general.alignment`` (32 by default), the tensor data. Everything is checked
against the file's size when it is opened, so a truncated download fails at once with a clear message,
and so does a tensor whose type cannot be dequantized here.

The interface mirrors :class:`~sd35_core.loading.checkpoint.SafetensorsFile` (``keys``, ``shape``, ``shapes``,
``tensor``, ``error``, ``metadata``), so the same weight loader fills modules from either format.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import CheckpointError
from ...quant.quant_types import SUPPORTED, TYPES, QuantType
from ...quant.tensor import QuantFormat, QuantizedTensor

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# city96's converter writes a tensor's torch shape here when it stored the tensor reshaped.
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# GGUF metadata value types: id -> struct format of a scalar (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TORCH_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's record: torch-order ``shape``, GGML type, absolute byte ``offset`` and ``nbytes``."""

    name: str
    shape: tuple[int, ...]
    qtype: QuantType
    offset: int
    nbytes: int


class _Cursor:
    """Sequential little-endian reads over the mapped header; running past the end means truncation."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: file is truncated: its GGUF header needs more than its {self.size} bytes; "
                "download it again"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: expected a GGUF file; a header string is not UTF-8") from None

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if count > self.size - self.pos:  # every item takes at least one byte
                self.take(count)  # raises the truncation error
            if item in _SCALARS:  # numeric arrays in one read (tokenizer tables can be long)
                fmt = _SCALARS[item]
                width = struct.calcsize(fmt)
                return tuple(np.frombuffer(self.take(width * count), dtype=np.dtype(fmt)).tolist())
            return tuple(self.value(item) for _ in range(count))
        raise CheckpointError(f"{self.path}: expected a GGUF file; metadata value type {vtype} is not defined")


class GGUFFile:
    """A validated, memory-mapped ``.gguf`` file: metadata and tensor shapes at once, tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        size = os.path.getsize(self.path)
        if size < 24:
            raise CheckpointError(f"{self.path}: expected a GGUF file; it is {size} bytes, too short")
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.used: set[str] = set()  # keys some part has read (see loading.unused_tensors)
        try:
            self.version, self.metadata, self.tensors = self._parse(_Cursor(self._map, self.path))
        except BaseException:
            self._map.close()
            raise

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` ("sd3", "flux", "llama", ...), or None when the file does not say."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def _parse(self, cur: _Cursor) -> tuple[int, dict, dict[str, TensorInfo]]:
        path = self.path
        if cur.take(4) != MAGIC:
            raise CheckpointError(f"{path}: expected a GGUF file; its first bytes are not the GGUF magic")
        version = cur.scalar("<I")
        if version not in VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            what = "a big-endian GGUF file" if swapped in VERSIONS else f"GGUF version {version}"
            raise CheckpointError(f"{path}: expected a little-endian GGUF file of version 2 or 3; it is {what}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > cur.size or n_kv > cur.size:
            raise CheckpointError(f"{path}: expected a GGUF file; its header counts are impossible for its size")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        records = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise CheckpointError(f"{path}: tensor '{name}': expected 1 to {MAX_DIMS} dimensions, got {n_dims}")
            dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
            records.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise CheckpointError(f"{path}: 'general.alignment': expected a positive integer, got {alignment!r}")
        data_start = -(-cur.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in records:
            info = self._tensor_info(name, dims, type_id, data_start + offset, metadata)
            if info.offset + info.nbytes > cur.size:
                raise CheckpointError(
                    f"{path}: file is truncated ({cur.size} bytes; tensor '{name}' ends at byte "
                    f"{info.offset + info.nbytes}); download it again"
                )
            tensors[name] = info
        return version, metadata, tensors

    def _tensor_info(self, name: str, dims: tuple[int, ...], type_id: int, offset: int, metadata) -> TensorInfo:
        qtype = TYPES.get(type_id)
        if qtype is None:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has GGML type id {type_id}, which is not a known GGML type; "
                f"expected one of {', '.join(SUPPORTED)}"
            )
        if not qtype.supported:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' is stored as {qtype.name}, which this loader cannot dequantize; "
                f"supported types: {', '.join(SUPPORTED)}"
            )
        if dims[0] % qtype.block_size:
            raise CheckpointError(
                f"{self.path}: tensor '{name}': its rows of {dims[0]} values are not whole {qtype.name} blocks "
                f"of {qtype.block_size}"
            )
        numel = 1
        for d in dims:
            numel *= d
        shape = tuple(reversed(dims))  # ggml lists dims innermost first
        orig = metadata.get(ORIG_SHAPE_KEY + name)
        if orig is not None:
            orig = tuple(int(v) for v in orig) if isinstance(orig, tuple) else ()
            count = 1
            for d in orig:
                count *= d
            if not orig or count != numel:
                raise CheckpointError(
                    f"{self.path}: '{ORIG_SHAPE_KEY}{name}': expected a shape of {numel} values, got {orig}"
                )
            shape = orig
        return TensorInfo(name, shape, qtype, offset, qtype.nbytes(numel))

    # -- the SafetensorsFile interface ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Shapes of every tensor under ``prefix``, keyed with the prefix removed."""
        n = len(prefix)
        return {k[n:]: v.shape for k, v in self.tensors.items() if k.startswith(prefix)}

    def qtype(self, key: str) -> QuantType:
        return self.tensors[key].qtype

    def tensor(self, key: str) -> torch.Tensor | QuantizedTensor:
        """A copy of the tensor's data: a dense tensor for F32/F16/BF16, a :class:`QuantizedTensor` otherwise."""
        info = self.tensors[key]
        if self._map.closed:
            raise CheckpointError(f"{self.path}: the file was closed; tensor '{key}' can no longer be read")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        data = torch.from_numpy(raw.copy())  # own memory: the mapping can close, the file can change
        del raw
        if info.qtype.is_float:
            return data.view(_TORCH_FLOAT[info.qtype.name]).reshape(info.shape)
        bs, ts = info.qtype.block_size, info.qtype.type_size
        # Rows of whole blocks when the torch shape allows (a shape from orig_shape metadata may not).
        data = data.view(-1, info.shape[-1] // bs * ts) if info.shape[-1] % bs == 0 else data.view(1, -1)
        return QuantizedTensor(data, QuantFormat(info.qtype, info.shape))

    def error(self, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: expected {expected}")

    def close(self) -> None:
        """Unmap the file (tensors already read keep their own copies)."""
        self._map.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file starts with the GGUF magic (the content decides, not the file name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
