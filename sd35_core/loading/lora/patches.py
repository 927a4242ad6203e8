"""Weight updates a LoRA-style file can carry, as the trainers define them.

Every patch computes its update in float32 on the weight's device and adds it into a float32 view of the
target weight (or of a row slice of it, for diffusers' separate q/k/v on our fused ``qkv``):

* :class:`LowRank` (LoRA, LoCon): ``up @ down`` (``mid`` for Tucker-decomposed convolutions), times
  ``alpha / rank`` when the file gives an alpha (kohya), ``lora_alpha / r`` from diffusers' metadata, else 1.
* :class:`LoHa`: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product), times ``alpha / rank``.
* :class:`LoKr`: ``kron(w1, w2)``, each factor full or low-rank, times ``alpha / rank`` for a low-rank one.
* :class:`Diff`: a full difference (``.diff``, ``.diff_b``); :class:`SetWeight` replaces the weight.

Any of the first three may carry a DoRA magnitude (``dora_scale``, PEFT's ``lora_magnitude_vector``):
the merged weight ``W + dW`` is renormalised to that magnitude, per output row when the magnitude has one
entry per row (PEFT, LyCORIS' default), per input column otherwise, and strength interpolates between the
base and the DoRA weight. The norm is that of the merged weight, as PEFT and LyCORIS compute it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves of dim 0: diffusers' (scale, shift) rows <-> the official (shift, scale)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # LyCORIS' CP/Tucker form: core ``t`` [r, r, k, k] with factors a [out, r] and b [r, in].
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


@dataclass(frozen=True)
class Patch:
    """Base of the low-rank kinds: a delta with an optional DoRA magnitude."""

    def delta(self, device: torch.device) -> torch.Tensor:
        """The update in float32, shaped ``[rows, cols]`` (cols = the weight's trailing dims flattened)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of :meth:`delta`, from the factor shapes (no computation)."""
        raise NotImplementedError

    @property
    def magnitude(self) -> torch.Tensor | None:
        return None

    def apply_(self, weight: torch.Tensor, strength: float, swap: bool = False) -> None:
        """Add this patch at ``strength`` into the float32 ``weight`` (in place; a view is fine)."""
        d = self.delta(weight.device).reshape(weight.shape)
        if swap:
            d = swap_halves(d)
        mag = self.magnitude
        if mag is None:
            weight.add_(d, alpha=strength)
            return
        mag = _f32(mag, weight.device)
        if swap and mag.numel() == weight.shape[0]:
            mag = swap_halves(mag.reshape(weight.shape[0], -1)).reshape(mag.shape)
        merged = weight + d
        flat = merged.reshape(merged.shape[0], -1)
        eps = torch.finfo(torch.float32).eps
        if mag.numel() == weight.shape[0]:  # one magnitude per output row
            norm = flat.norm(dim=1, keepdim=True) + eps
            scaled = flat * (mag.reshape(-1, 1) / norm)
        else:  # one per input column (LyCORIS with wd_on_out=False)
            norm = flat.norm(dim=0, keepdim=True) + eps
            scaled = flat * (mag.reshape(1, -1) / norm)
        weight.add_(scaled.reshape(weight.shape) - weight, alpha=strength)


@dataclass(frozen=True)
class LowRank(Patch):
    up: torch.Tensor  # [out, r] (or [out, r, 1, 1])
    down: torch.Tensor  # [r, in] (or [r, in, k, k])
    scale: float = 1.0
    mid: torch.Tensor | None = None  # [r, r, k, k] (LoCon Tucker)
    dora: torch.Tensor | None = None

    @property
    def magnitude(self):
        return self.dora

    @property
    def shape(self):
        if self.mid is None:
            return (self.up.shape[0], math.prod(self.down.shape[1:]))
        return (self.up.shape[0], self.down.shape[1] * math.prod(self.mid.shape[2:]))

    def delta(self, device):
        up, down = _f32(self.up, device).flatten(1), _f32(self.down, device)
        if self.mid is not None:
            mid = _f32(self.mid, device)
            # down [r, in] x mid [r, r, k, k] -> [r, in, k, k]
            down = torch.einsum("r s k l, s i -> r i k l", mid, down.flatten(1))
        return (up @ down.flatten(1)).mul_(self.scale)


@dataclass(frozen=True)
class LoHa(Patch):
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    scale: float = 1.0
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora: torch.Tensor | None = None

    @property
    def magnitude(self):
        return self.dora

    @property
    def shape(self):
        if self.t1 is not None:
            return (self.w1_a.shape[1], self.w1_b.shape[1] * math.prod(self.t1.shape[2:]))
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def delta(self, device):
        w = [_f32(t, device) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)]
        if self.t1 is not None:
            m1 = _tucker(_f32(self.t1, device), w[0], w[1])
            m2 = _tucker(_f32(self.t2, device), w[2], w[3])
        else:
            m1, m2 = w[0] @ w[1], w[2] @ w[3]
        return (m1 * m2).flatten(1).mul_(self.scale)


@dataclass(frozen=True)
class LoKr(Patch):
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0
    dora: torch.Tensor | None = None

    @property
    def magnitude(self):
        return self.dora

    def _factor_shapes(self):
        s1 = tuple(self.w1.shape) if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            s2 = tuple(self.w2.shape)
        elif self.t2 is not None:
            s2 = (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])
        else:
            s2 = (self.w2_a.shape[0], self.w2_b.shape[1])
        return s1, s2

    @property
    def shape(self):
        s1, s2 = self._factor_shapes()
        return (s1[0] * s2[0], s1[1] * math.prod(s2[1:]))

    def delta(self, device):
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = _tucker(_f32(self.t2, device), _f32(self.w2_a, device), _f32(self.w2_b, device))
        else:
            w2 = _f32(self.w2_a, device) @ _f32(self.w2_b, device)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).flatten(1).mul_(self.scale)


@dataclass(frozen=True)
class Diff(Patch):
    """A full difference added to the weight (or bias)."""

    diff: torch.Tensor

    @property
    def shape(self):
        return (self.diff.shape[0], math.prod(self.diff.shape[1:]))

    def delta(self, device):
        return _f32(self.diff, device).reshape(self.shape)


@dataclass(frozen=True)
class SetWeight(Patch):
    """Replaces the weight outright (strength blends between the base and the new value)."""

    value: torch.Tensor

    @property
    def shape(self):
        return (self.value.shape[0], math.prod(self.value.shape[1:]))

    def apply_(self, weight, strength, swap=False):
        value = _f32(self.value, weight.device).reshape(weight.shape)
        weight.add_((swap_halves(value) if swap else value) - weight, alpha=strength)
