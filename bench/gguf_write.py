"""Write SD3/SD3.5 diffusion models as GGUF files the way city96's ComfyUI-GGUF tools do (tests, benchmarks).

Needs the ``gguf`` package (a test-only dependency): the files are written by its ``GGUFWriter`` and the
blocks by its ``gguf.quants.quantize``, so the loader is tested against an independent writer.

The tensor-type rules follow those tools: ``tools/convert.py`` writes architecture ``sd3`` with the
official keys minus ``model.diffusion_model.``, in F16 (BF16 for bf16 sources), keeping 1-D and small
(<= 1024 values) tensors of fp32/bf16 sources in F32; their llama.cpp quantizer patch then quantizes only
2-D ``*weight`` tensors outside the embedders, the final layer and ``pos_embed``, and a K-quant whose rows
are not whole 256-value super-blocks falls back to F16. The gguf package can quantize to Q4_0, Q4_1,
Q5_0, Q5_1 and Q8_0 (its K-quants are dequantize-only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

ARCH = "sd3"
QUANTIZATION_THRESHOLD = 1024
KEEP_DENSE = ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder.")
KEEP_DENSE_EXACT = ("proj_out.weight", "pos_embed")
PREFIX = "model.diffusion_model."


def tensor_type(key: str, t: torch.Tensor, qtype: str) -> str:
    """The GGML type city96's tools give tensor ``key`` of a file quantized to ``qtype``."""
    base = "BF16" if t.dtype == torch.bfloat16 else "F16"
    if t.dtype in (torch.float32, torch.bfloat16) and (t.ndim == 1 or t.numel() <= QUANTIZATION_THRESHOLD):
        base = "F32"
    if qtype in ("F16", "BF16", "F32"):
        return base
    quantize = (
        t.ndim == 2
        and key.endswith("weight")
        and not any(s in key for s in KEEP_DENSE)
        and key not in KEEP_DENSE_EXACT
    )
    if not quantize:
        return base
    if qtype.endswith("_K") and t.shape[-1] % 256:
        return "F16"
    return qtype


def write_gguf(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    qtype: str = "F16",
    metadata: Mapping[str, str] | None = None,
    arch: str = ARCH,
    types: Mapping[str, str] | None = None,
) -> str:
    """Write diffusion-model ``state`` (official keys, with or without the prefix) as a GGUF file.

    ``types`` overrides the type of single keys (e.g. to store one tensor in a type the tools never choose).
    """
    import gguf

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}", gguf.LlamaFileType.MOSTLY_F16))
    for k, v in (metadata or {}).items():
        writer.add_string(k, v)
    types = dict(types or {})
    for key, t in state.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        t = t.detach().to("cpu")
        name = types.get(key) or tensor_type(key, t, qtype)
        ggml = gguf.GGMLQuantizationType[name]
        if name == "BF16":
            data = gguf.quants.quantize(t.float().numpy(), ggml)
        else:
            data = gguf.quants.quantize(t.float().numpy().astype(np.float32), ggml)
        writer.add_tensor(key, data, raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized to float32 by the gguf package (an independent decoder)."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        out[t.name] = torch.from_numpy(values.reshape(shape).copy())
    return out


def patch_tensor_type(path: str | os.PathLike, name: str, type_id: int) -> None:
    """Rewrite one tensor's GGML type id in a GGUF header in place (to make files no writer would make)."""
    import gguf

    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    field = next(t for t in reader.tensors if t.name == name).field
    type_part = field.parts[-2]  # a tensor record's parts: name length, name, n_dims, dims, type, offset
    offset = int(type_part.ctypes.data - np.asarray(reader.data).ctypes.data)
    del reader, field, type_part
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(int(type_id).to_bytes(4, "little"))
