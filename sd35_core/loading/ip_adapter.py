"""IP-Adapter files: the InstantX release ``ip-adapter.bin``, its safetensors conversion, diffusers' names.

The release exists only as a pickle, ``{"image_proj": {...}, "ip_adapter": {...}}`` in fp16. This is the
pack's one door for a pickle: it is read with ``torch.load(weights_only=True, mmap=True)``, torch's
restricted unpickler, which builds tensors and plain containers and refuses anything else (a class, a
function call); a refusal is a :class:`~..errors.CheckpointError` naming the file. Nothing else here or
anywhere in the pack unpickles. :func:`convert_ip_adapter` writes it once as a flat ``.safetensors`` with
``image_proj.`` / ``ip_adapter.`` prefixes, the layout that then loads natively.

Resampler keys may also come in diffusers' converted names (``layers.{i}.ln0``, ``attn.to_q``,
``ff.net.0.proj``, ``adaln_proj`` ...); they are renamed to the release names. Every tensor of a file is used
or the load fails naming it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from ..models.ip_adapter import IPAdapter, IPAdapterConfig
from .checkpoint import DTypePolicy, load_weights, open_safetensors, write_safetensors

PARTS = ("image_proj", "ip_adapter")
BIN_SUFFIXES = (".bin", ".pt", ".pth")
# diffusers' resampler names (after its _convert_ip_adapter_image_proj_to_diffusers) -> the release names
_DIFFUSERS_NAMES = (
    (re.compile(r"layers\.(\d+)\.ln0\."), r"layers.\1.0.norm1."),
    (re.compile(r"layers\.(\d+)\.ln1\."), r"layers.\1.0.norm2."),
    (re.compile(r"layers\.(\d+)\.attn\.to_q\."), r"layers.\1.0.to_q."),
    (re.compile(r"layers\.(\d+)\.attn\.to_kv\."), r"layers.\1.0.to_kv."),
    (re.compile(r"layers\.(\d+)\.attn\.to_out\.0\."), r"layers.\1.0.to_out."),
    (re.compile(r"layers\.(\d+)\.adaln_norm\."), r"layers.\1.1.0."),
    (re.compile(r"layers\.(\d+)\.ff\.net\.0\.proj\."), r"layers.\1.1.1."),
    (re.compile(r"layers\.(\d+)\.ff\.net\.2\."), r"layers.\1.1.3."),
    (re.compile(r"layers\.(\d+)\.adaln_proj\."), r"layers.\1.2.1."),
)


def release_name(key: str) -> str:
    """``key`` (with its ``image_proj.`` / ``ip_adapter.`` prefix) in the release layout."""
    part, _, rest = key.partition(".")
    if part == "image_proj":
        for pattern, repl in _DIFFUSERS_NAMES:
            rest = pattern.sub(repl, rest, count=1)
    return f"{part}.{rest}"


class TensorMap:
    """Tensors already in memory behind the file interface :func:`~.checkpoint.load_weights` reads."""

    def __init__(self, path: str, tensors: Mapping[str, torch.Tensor]):
        self.path = path
        self.name = os.path.basename(path)
        self._tensors = dict(tensors)
        self.used: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        n = len(prefix)
        return {k[n:]: tuple(v.shape) for k, v in self._tensors.items() if k.startswith(prefix)}

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def error(self, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: expected {expected}")


def read_release_bin(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The InstantX ``ip-adapter.bin`` as flat ``{"image_proj.…": tensor, "ip_adapter.…": tensor}``, read with
    torch's restricted unpickler, memory-mapped (see the module doc)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: expected the InstantX IP-Adapter (a torch file of tensors only); torch's restricted "
            f"unpickler (weights_only) refused it: {first}"
        ) from None
    if not isinstance(data, dict) or set(data) != set(PARTS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected a dict with the keys 'image_proj' and 'ip_adapter'; found {found}")
    flat: dict[str, torch.Tensor] = {}
    for part in PARTS:
        if not isinstance(data[part], dict):
            found = type(data[part]).__name__
            raise CheckpointError(f"{path}: expected '{part}' to be a dict of tensors, found {found}")
        for k, v in data[part].items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{path}: expected tensors only; '{part}.{k}' is a {type(v).__name__}")
            flat[f"{part}.{k}"] = v
    return flat


def _open(path: str) -> TensorMap:
    """The file's tensors in the release layout (``.bin`` through the one pickle door, else safetensors)."""
    if path.lower().endswith(BIN_SUFFIXES):
        tensors = read_release_bin(path)
    else:
        file = open_safetensors(path)
        tensors = {k: file.tensor(k) for k in file.keys()}
    foreign = [k for k in tensors if k.partition(".")[0] not in PARTS]
    if foreign:
        shown = ", ".join(f"'{k}'" for k in foreign[:5])
        raise CheckpointError(
            f"{path}: expected an SD3 IP-Adapter (tensors under 'image_proj.' and 'ip_adapter.'); "
            f"{len(foreign)} tensors are not: {shown}"
        )
    renamed = {release_name(k): v for k, v in tensors.items()}
    if len(renamed) != len(tensors):
        raise CheckpointError(f"{path}: the file holds the same resampler tensor under two names (release and "
                              "diffusers layouts mixed)")
    return TensorMap(path, renamed)


def load_ip_adapter(path: str | os.PathLike, dtype: str = "default",
                    device: str | torch.device = "cpu") -> IPAdapter:
    """Load an SD3 IP-Adapter (``ip-adapter.bin``, its ``.safetensors`` conversion, or diffusers' names) with
    every size read from its shapes; ``dtype`` as :meth:`~.checkpoint.DTypePolicy.named` (fp8 is kept
    for the MMDiT: the adapter is stored in the compute dtype)."""
    path = os.fspath(path)
    file = _open(path)
    try:
        config = IPAdapterConfig.from_shapes(file.shapes())
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    policy = DTypePolicy.named(dtype, device)
    policy = DTypePolicy(policy.compute, policy.compute)
    with torch.device("meta"):
        adapter = IPAdapter(config)
    load_weights(adapter, file, "", policy, device)
    unused = [k for k in file.keys() if k not in file.used]
    if unused:
        shown = ", ".join(f"'{k}'" for k in unused[:5])
        raise CheckpointError(f"{path}: expected every tensor to belong to the IP-Adapter; {len(unused)} would be "
                              f"ignored: {shown}")
    return adapter


def convert_ip_adapter(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """Write the adapter at ``source`` (the release ``.bin``, or any layout :func:`load_ip_adapter` reads) as
    a flat ``.safetensors`` in the release names, after checking it loads; returns ``target``."""
    source, target = os.fspath(source), os.fspath(target)
    if not target.lower().endswith(".safetensors"):
        raise ValueError(f"target {target!r}: expected a .safetensors file name")
    if os.path.abspath(source) == os.path.abspath(target):
        raise ValueError(f"target {target!r}: expected a file other than the source")
    file = _open(source)
    try:
        IPAdapterConfig.from_shapes(file.shapes())
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    tensors = {k: file.tensor(k).contiguous() for k in sorted(file.keys())}
    return write_safetensors(target, tensors, {"format": "pt", "converted_from": os.path.basename(source)})
