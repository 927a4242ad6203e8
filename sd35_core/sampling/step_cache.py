"""The step cache: reuse the last full step's contribution of the joint blocks after the first one.

Every step first runs the patch/timestep/text embedding and the first joint block for all rows the Guider
batches (cond and uncond, of every batch group). The first block's residual (its output minus its input, on
the image tokens) is the probe: when its mean absolute change since the last *full* step, relative to its
mean absolute value then, is below the threshold for all rows taken together, the step is a cache hit and
the output of the remaining blocks is estimated as the first block's new output plus the residual those
blocks added at the last full step (``x_final - x_first``, cached per row). Otherwise the step is run in
full, exactly as without a cache, and the probe and residuals are stored.

All rows are decided together, so cond and uncond never mix a cached and a fresh prediction (the failure of
caches that see ComfyUI's separate cond and uncond calls), and every row kind has its cached residual:

- the skip-layer pass: its residual is taken relative to the same first-block output of its positive rows,
  so a hit reuses what the skipped branch added, whichever blocks it skipped;
- ControlNets: their outputs are part of what the remaining blocks added, so they are inside the cached
  residual; on a hit the ControlNet is not run either (the probe is the block output before any ControlNet
  residual is added, so deciding does not need it).

A step is always run in full when nothing is cached yet, when the set of passes changes (the SLG window or
a ControlNet's window opens or closes, a timestep-ranged conditioning entry turns on or off, shapes change)
and on the last step of the run. With the threshold at 0 the cache is off. A full step through the cache
is the uncached Guider's own step (:meth:`~.passes.ModelPasses.finish` after the block 0 the probe needed), so
a run whose threshold never triggers a hit is bit-identical to one without the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.mmditx import JointState
from .control import ControlHint
from .passes import Denoised, ModelPasses, RowBatch


@dataclass
class _Cached:
    probes: list[torch.Tensor]  # per group: first-block residual at the last full step
    residuals: list[torch.Tensor]  # per group: x_final - x_first of all rows
    skip_residuals: list[torch.Tensor | None]  # per group: skipped-branch x_final - x_first of its rows


def relative_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
    """``sum |new - old| / sum |old|`` over all tensors together (float32)."""
    num = sum(float((a.float() - b.float()).abs().sum()) for a, b in zip(new, old, strict=True))
    den = sum(float(b.float().abs().sum()) for b in old)
    return num / den if den > 0 else float("inf")


class StepCache:
    """Per-run state of the step cache (see the module doc) over a run's block-wise ``passes``; ``threshold``
    > 0, ``last_step`` the index of the run's final step, which is never reused."""

    def __init__(self, passes: ModelPasses, threshold: float, last_step: int) -> None:
        self.passes = passes
        self.threshold = threshold
        self.last_step = last_step
        self.full_steps = 0
        self.cached_steps = 0
        self.last_change: float | None = None
        self._key: tuple | None = None
        self._cached: _Cached | None = None

    def step(self, groups: list[RowBatch], hints: Sequence[ControlHint], skip_layers: tuple[int, ...] | None,
             step_index: int) -> list[Denoised]:
        """Each group's denoised rows (and skip-pass rows) for this step, reused or computed in full."""
        passes = self.passes
        key = (tuple((tuple(g.x.shape), tuple(g.context.shape), g.n_skip, g.entries,
                      tuple(id(a) for a in g.ip_adapters)) for g in groups), skip_layers, tuple(id(h) for h in hints))
        states = [passes.embed(g) for g in groups]
        firsts = [passes.first_block(state0) for state0 in states]
        probes = [x1 - state0.x for state0, (_, x1) in zip(states, firsts, strict=True)]
        cached = self._cached
        if cached is not None and key == self._key and step_index != self.last_step:
            self.last_change = relative_change(probes, cached.probes)
            if self.last_change < self.threshold:
                return self._reuse(groups, states, firsts, cached)

        self.full_steps += 1
        out = [passes.finish(g, state0, first, hints, skip_layers)
               for g, state0, first in zip(groups, states, firsts, strict=True)]
        self._key = key
        self._cached = _Cached(
            probes,
            [r.final.x - x1 for r, (_, x1) in zip(out, firsts, strict=True)],
            [None if r.skip_final is None else r.skip_final.x - x1[: g.n_skip]
             for g, r, (_, x1) in zip(groups, out, firsts, strict=True)],
        )
        return out

    def _reuse(self, groups, states, firsts, cached: _Cached) -> list[Denoised]:
        self.cached_steps += 1
        self.passes.stats.cache_hits += 1
        out = []
        for g, state0, (_, x1), res, skip_res in zip(groups, states, firsts, cached.residuals, cached.skip_residuals,
                                                     strict=True):
            den = Denoised(self.passes.to_denoised(g, JointState(x1 + res, None, state0.c, state0.hw)))
            if g.n_skip:
                rows = slice(0, g.n_skip)
                skipped = JointState(x1[rows] + skip_res, None, state0.c[rows], state0.hw)
                den.skipped = self.passes.to_denoised(g, skipped, rows)
            out.append(den)
        return out
