"""Applying LoRA patches to a module for the duration of one run, leaving the module as it was after.

Two ways, chosen per parameter by its storage dtype:

* **merge** (fp32 / fp16 / bf16 storage): the patched weight is computed once (in float32, then rounded to
  the storage dtype) and written into the parameter in place; only the patched tensors are backed up (on
  ``backup_device``) and they are restored bit for bit on exit, exceptions included. No per-step cost.
* **at compute time** (fp8 and other storage that would round the update away): the layer's weight is
  materialised in the compute dtype as it always is (``ops.Linear`` / ``ops.Conv2d``), and the update is
  added there through the layer's ``weight_patch`` hook, so the LoRA is not lost to fp8 rounding and no
  full-precision copy of the weights is kept.

``stack`` is an ordered sequence of ``(LoraPatches, strength)``; strength 0 patches are skipped, so a zero
strength (or an empty stack) leaves the module bit-identical to the base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ...models import ops
from .formats import Target
from .loading import LoraPatches
from .patches import LowRank, Patch, swap_halves

MERGEABLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
Entry = tuple[Target, Patch, float]


def collect(stack: Sequence[tuple[LoraPatches, float]]) -> dict[str, list[Entry]]:
    """``{parameter key: [(target, patch, strength), ...]}`` in stack order, zero strengths left out."""
    out: dict[str, list[Entry]] = {}
    for patches, strength in stack:
        if strength == 0:
            continue
        for key, entries in patches.patches.items():
            out.setdefault(key, []).extend((t, p, float(strength)) for t, p in entries)
    return out


def patched_weight(weight: torch.Tensor, entries: Sequence[Entry]) -> torch.Tensor:
    """``weight`` with ``entries`` applied in order, as a new float32 tensor on the weight's device."""
    w = weight.to(torch.float32, copy=True)
    for target, patch, strength in entries:
        view = w if target.rows is None else w.narrow(0, target.rows[0], target.rows[1])
        patch.apply_(view, strength, target.swap_halves)
    return w


def _low_rank_factors(entries: Sequence[Entry], device, dtype):
    """``[(rows, up * strength * scale, down)]`` in ``dtype`` when every entry is a plain low-rank update of a
    matrix (no DoRA, no Tucker core), else ``None``."""
    out = []
    for target, patch, strength in entries:
        if not isinstance(patch, LowRank) or patch.mid is not None or patch.dora is not None:
            return None
        up = patch.up.flatten(1).to(device=device, dtype=torch.float32) * (patch.scale * strength)
        if target.swap_halves:
            up = swap_halves(up)
        out.append((target.rows, up.to(dtype), patch.down.flatten(1).to(device=device, dtype=dtype)))
    return out


class WeightPatch:
    """A layer's ``weight_patch`` hook: adds the entries to the weight materialised in the compute dtype.

    Plain low-rank updates are added with one ``addmm`` per entry in the compute dtype (factors converted
    once per dtype and device); DoRA and the other kinds go through the float32 path of the merge.
    """

    def __init__(self, entries: Sequence[Entry], stored: torch.Tensor, previous=None):
        self.entries = list(entries)
        self.stored = stored
        self.previous = previous
        self._factors: dict[tuple, list | None] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            weight = self.previous(weight)
        key = (weight.device, weight.dtype)
        if key not in self._factors:
            self._factors[key] = _low_rank_factors(self.entries, *key)
        factors = self._factors[key]
        if factors is None or weight.ndim != 2:
            return patched_weight(weight, self.entries).to(weight.dtype)
        if weight.untyped_storage().data_ptr() == self.stored.untyped_storage().data_ptr():
            weight = weight.clone()  # never add into the stored weight itself
        for rows, up, down in factors:
            view = weight if rows is None else weight.narrow(0, rows[0], rows[1])
            view.addmm_(up, down)
        return weight


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


@contextlib.contextmanager
def applied(
    module: nn.Module,
    stack: Sequence[tuple[LoraPatches, float]],
    backup_device: torch.device | str | None = None,
) -> Iterator[nn.Module]:
    """Apply ``stack`` to ``module`` inside the ``with`` block; everything is undone on exit.

    Backups go to ``backup_device`` (default: where each weight is; pass the offload device for GPU
    weights to keep the copies out of GPU memory).
    """
    entries = collect(stack)
    backups: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks: list[tuple[nn.Module, object]] = []
    try:
        with torch.no_grad():
            for key, items in entries.items():
                owner, leaf = _owner(module, key)
                param = getattr(owner, leaf)
                if param.dtype in MERGEABLE and type(param.data) is torch.Tensor:
                    device = param.device if backup_device is None else torch.device(backup_device)
                    backup = param.data.to(device, copy=True)
                    backups.append((param.data, backup))
                    param.data.copy_(patched_weight(param.data, items))
                    continue
                if leaf != "weight" or not isinstance(owner, (ops.Linear, ops.Conv2d)):
                    raise TypeError(f"LoRA: '{key}' is stored as {param.dtype}, which cannot take a patch in place, "
                                    f"and its layer ({type(owner).__name__}) has no compute-time hook")
                hooks.append((owner, owner.weight_patch))
                owner.weight_patch = WeightPatch(items, param, owner.weight_patch)
        yield module
    finally:
        with torch.no_grad():
            for target, backup in reversed(backups):
                target.copy_(backup)
            for owner, previous in reversed(hooks):
                if previous is None:
                    del owner.weight_patch  # back to the class default: no hook
                else:
                    owner.weight_patch = previous
