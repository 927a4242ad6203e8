"""Reading ``.safetensors`` checkpoints: validation, key prefixes, and loading weights into modules.

A tensor already in its storage dtype is a zero-copy view of the memory-mapped file. One that needs a dtype
conversion has its own bytes mapped, converted in one ``copy_`` straight into its final tensor, and unmapped:
the file's pages do not stay in the process (so they do not add to its resident memory on top of the converted
weights), and each byte is read and converted once.
Pickle-based formats are refused: they can run code on load.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError
from ..models import ops
from ..quant.tensor import QuantizedTensor
from .scaled_fp8 import FP8_DTYPES, ScaledLayout, check_fp8_weights_have_scales, find_scales, read_scale

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# safetensors dtype names -> torch dtypes (the ones SD3 files use, and a few more)
FILE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write ``tensors`` as a ``.safetensors`` file created with the user's umask; returns the path.

    ``safetensors.torch.save_file`` creates its file with mode 0600 whatever the umask, so files a user
    writes to share (a model set, a saved latent) would be unreadable to the group and others. The bytes
    are serialised in memory and written through ``open``, which honours the umask like every other tool.
    """
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(data)
    return path


@dataclass(frozen=True)
class DTypePolicy:
    """Where weights are kept (``storage``) and what arithmetic runs in (``compute``).

    fp8 e4m3fn storage keeps only the large matrices of linear layers in fp8; norms, biases, embeddings
    and convolutions stay in the compute dtype, where their size does not matter and precision does.
    ``storage=None`` keeps every tensor as the file stores it (GGUF files: blocks, F16, F32 alike).
    """

    storage: torch.dtype | None = torch.float32
    compute: torch.dtype = torch.float32

    @classmethod
    def named(cls, name: str, device: torch.device | str = "cpu") -> DTypePolicy:
        """Policy for a user-facing name: ``default``, ``fp32``, ``fp16``, ``bf16`` or ``fp8_e4m3fn``."""
        name = name.lower()
        dev = torch.device(device)
        if name == "default":
            # Half precision is what the models were trained for; CPUs run bf16 but not fp16 well.
            name = "bf16" if dev.type != "cpu" else "fp32"
        table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if name in table:
            return cls(table[name], table[name])
        if name in ("fp8_e4m3fn", "fp8"):
            return cls(torch.float8_e4m3fn, torch.bfloat16)
        raise ValueError(f"weight dtype: expected one of default, fp32, fp16, bf16, fp8_e4m3fn; got {name!r}")


class SafetensorsFile:
    """A validated, memory-mapped ``.safetensors`` file: key shapes without reading data, tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self._header, self.metadata, self._data_start = _read_header(self.path)
        self._handle = safe_open(self.path, framework="pt", device="cpu")
        self.used: set[str] = set()  # keys some part has read (see loading.unused_tensors)

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, key: str) -> bool:
        return key in self._header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Shapes of every tensor under ``prefix``, keyed with the prefix removed."""
        n = len(prefix)
        return {k[n:]: tuple(v["shape"]) for k, v in self._header.items() if k.startswith(prefix)}

    def dtype(self, key: str) -> torch.dtype:
        name = self._header[key]["dtype"]
        if name not in FILE_DTYPES:
            raise self.error(f"tensor '{key}' in a supported dtype ({', '.join(FILE_DTYPES)}); found {name}")
        return FILE_DTYPES[name]

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as stored: a zero-copy view of the memory-mapped file."""
        return self._handle.get_tensor(key)

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Fill ``out`` (same number of elements, any dtype and device) with tensor ``key``, converting.

        ``rows`` ``(start, stop)`` reads only those rows of the first axis (a contiguous byte range), for layouts
        that store one official tensor in pieces or one piece of several. The tensor's bytes are mapped on
        their own and converted in one ``copy_`` (one parallel pass per tensor, as ComfyUI's ``to``), then
        unmapped: the file's pages never stay in the process, so resident memory is the loaded weights plus at
        most one tensor of the file.
        """
        src_dtype = self.dtype(key)
        begin, end = self._header[key]["data_offsets"]
        shape = self.shape(key)
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        if out.numel() != math.prod(shape):
            raise ValueError(f"read_into '{key}': {out.numel()} elements in out, {math.prod(shape)} stored")
        if end == begin:
            return out
        start = self._data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), end - begin + start - base, access=mmap.ACCESS_READ, offset=base)
        try:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead: the bytes are read once, front to back
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: the source is only read
                src = torch.frombuffer(mapped, dtype=src_dtype, count=(end - begin) // src_dtype.itemsize,
                                       offset=start - base)
            out.view(-1).copy_(src)
            del src  # the view must go before the mapping can close
        finally:
            mapped.close()
        return out

    def error(self, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: expected {expected}")


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Open and validate a checkpoint, refusing pickles, truncation and anything that is not safetensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            raise CheckpointError(
                f"{path}: expected a .safetensors file; this is a GGUF file, which loads only as an SD3/SD3.5 "
                "diffusion model (the checkpoint loader); VAEs, text encoders and ControlNets load from .safetensors"
            )
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code and are not "
            "loaded; expected a .safetensors file (convert it, or download the .safetensors release)"
        )
    return SafetensorsFile(path)


def _read_header(path: str) -> tuple[dict, dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: expected a .safetensors file; it is {size} bytes, too short")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: expected a .safetensors file; its first bytes are not a safetensors header")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: expected a .safetensors file; its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected a .safetensors file; its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: file is truncated ({size} bytes, the header describes {8 + n + end}); download it again"
        )
    return header, metadata, 8 + n


def find_prefix(keys: Iterable[str], marker: str) -> str | None:
    """The prefix under which ``marker`` (a key suffix that identifies a model part) appears, if any."""
    best = None
    for k in keys:
        if k.endswith(marker):
            prefix = k[: len(k) - len(marker)]
            if best is None or len(prefix) < len(best):
                best = prefix
    return best


def _target_dtype(stored: torch.dtype, name: str, policy: DTypePolicy, fp8_keys: set[str]) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if policy.storage == torch.float8_e4m3fn and name not in fp8_keys:
        return policy.compute
    return policy.storage


def _is_view(file: SafetensorsFile, key: str, dtype: torch.dtype, device) -> bool:
    """Whether tensor ``key`` loads as a zero-copy view of the mapped file (its dtype, on the CPU)."""
    return dtype == file.dtype(key) and torch.device(device).type == "cpu"


def _read_all(file: SafetensorsFile, reads: Mapping[str, tuple[str, torch.dtype]], device) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for ``reads`` (``{name: (file key, dtype)}``), each read and converted into a new tensor.

    Tensors are read on ``torch.get_num_threads()`` threads at once: a conversion's time goes mostly to faulting
    in the source's and the new tensor's pages, which one thread does one page at a time whatever torch's own
    parallelism (``copy_`` releases the GIL, and each read maps and unmaps its own bytes).
    """

    def read(item: tuple[str, tuple[str, torch.dtype]]) -> tuple[str, torch.Tensor]:
        name, (key, dtype) = item
        return name, file.read_into(key, torch.empty(file.shape(key), dtype=dtype, device=device))

    workers = min(len(reads), max(1, torch.get_num_threads()))
    if workers <= 1:
        return dict(map(read, reads.items()))
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(read, reads.items()))


def load_weights(
    module: nn.Module,
    file: SafetensorsFile,
    prefix: str,
    policy: DTypePolicy,
    device: torch.device | str = "cpu",
    key_map: Mapping[str, str] | None = None,
    optional: Iterable[str] = (),
) -> nn.Module:
    """Fill ``module`` (built on the meta device or anywhere) with the tensors under ``prefix``.

    ``file`` is a :class:`SafetensorsFile`, a view with its interface (another key layout) or a GGUF file;
    GGUF-quantized linear weights stay quantized (see :func:`ops.store_quantized_weight`), whatever
    ``policy.storage`` says. fp8 weights with a per-tensor scale (ComfyUI's scaled fp8, see
    :mod:`.scaled_fp8`) stay fp8 with their scale beside them (:func:`ops.store_weight_scale`); a scale on a
    weight stored wider is folded into it here. ``key_map`` renames file keys (without prefix) to module keys.
    Module keys listed in ``optional`` may be absent from the file and keep their constructed values (buffers
    such as constant position grids). A missing or misshaped tensor is a :class:`CheckpointError` naming the
    file and the key. Every file key read is added to ``file.used`` (see :mod:`.unused_tensors`).
    """
    key_map = dict(key_map or {})
    layers = {f"{name}.weight" if name else "weight": m for name, m in module.named_modules()
              if isinstance(m, (ops.Linear, ops.Conv2d))}
    fp8_keys = (
        {k for k, m in layers.items() if isinstance(m, ops.Linear)} if policy.storage == torch.float8_e4m3fn else set()
    )
    dense = hasattr(file, "read_into")
    layout = find_scales(file, prefix, key_map) if dense else ScaledLayout()
    layout_keys = layout.keys()
    expected = dict(module.state_dict(keep_vars=True))
    file_keys = {key_map.get(k, k): prefix + k for k in file.shapes(prefix) if prefix + k not in layout_keys}
    for name, scale in layout.layers.items():
        if name not in layers:
            raise file.error(f"per-tensor scales only beside linear or convolution weights; '{scale.weight_scale}' "
                             f"scales '{name}', which {type(module).__name__} does not have as one")
    check_fp8_weights_have_scales(file, prefix, layout, file_keys, set(layers))
    state: dict[str, torch.Tensor] = {}
    reads: dict[str, tuple[str, torch.dtype]] = {}  # conversions, done together below
    scales: dict[str, torch.Tensor] = {}
    optional = set(optional)
    for name, target in expected.items():
        src = file_keys.get(name)
        if src is None:
            if name in optional:
                continue
            raise file.error(f"tensor '{prefix}{name}' for {type(module).__name__}; it is missing")
        if file.shape(src) != tuple(target.shape):
            raise file.error(
                f"'{src}' of shape {tuple(target.shape)} for {type(module).__name__}; found {file.shape(src)}"
            )
        file.used.add(src)
        if dense:
            scale = layout.layers.get(name)
            stored = file.dtype(src)
            if scale is not None and stored not in FP8_DTYPES:
                # A scale beside a wide weight: folded now, so LoRA merges and saves see the effective weight.
                wide = file.read_into(src, torch.empty(file.shape(src), dtype=torch.float32))
                dtype = _target_dtype(stored, name, policy, fp8_keys)
                state[name] = wide.mul_(read_scale(file, scale.weight_scale)).to(device=device, dtype=dtype)
                continue
            dtype = _target_dtype(stored, name, policy, fp8_keys)
            if scale is not None:  # stays fp8; the scale is applied where the weight is materialised
                dtype = stored
                scales[name] = read_scale(file, scale.weight_scale)
            if _is_view(file, src, dtype, device):
                state[name] = file.tensor(src)  # zero-copy view of the mapped file
            else:
                reads[name] = (src, dtype)
            continue
        t = file.tensor(src)
        if isinstance(t, QuantizedTensor):
            layer_name, _, leaf = name.rpartition(".")
            layer = module.get_submodule(layer_name)
            if leaf == "weight" and isinstance(layer, ops.Linear):
                ops.store_quantized_weight(layer, t.to(device))
                state[name] = layer.weight
                continue
            # Anything else quantized (converters keep such tensors dense; some may not) is small: dense now.
            t = t.dequantize(policy.compute if policy.storage is None else torch.float32)
        if t.is_floating_point() and policy.storage is not None:
            dtype = policy.storage if name in fp8_keys else policy.compute
            if policy.storage != torch.float8_e4m3fn:
                dtype = policy.storage
            t = t.to(dtype=dtype)
        state[name] = t.to(device)
    if reads:
        state.update(_read_all(file, reads, device))
    for name in optional - state.keys():
        t = expected[name]
        if t.is_meta:
            raise file.error(f"tensor '{prefix}{name}'; it is missing and has no default")
        state[name] = t.detach().to(device=device, dtype=policy.compute if t.is_floating_point() else t.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    for name, scale in scales.items():
        ops.store_weight_scale(layers[name], scale.to(device))
    file.used.update(layout_keys)
    return module.requires_grad_(False).eval()
