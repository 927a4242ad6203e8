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
computes with the same operations in the same order as the uncached Guider, so a run whose threshold never
triggers a hit is bit-identical to one without the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models.mmditx import JointState

if TYPE_CHECKING:
    from .guidance import Guider


@dataclass
class GroupBatch:
    """One batched model pass of a step: latents, sigmas, conditioning rows, and how many leading rows also
    take the skip-layer pass (0 when SLG is off at this step)."""

    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    n_skip: int
    entries: tuple = ()  # which conditioning entries the rows belong to: a change means a full step


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
    """Per-run state of the step cache (see the module doc); ``threshold`` > 0, ``last_step`` the index of
    the run's final step, which is never reused."""

    def __init__(self, threshold: float, last_step: int) -> None:
        self.threshold = threshold
        self.last_step = last_step
        self.full_steps = 0
        self.cached_steps = 0
        self.last_change: float | None = None
        self._key: tuple | None = None
        self._cached: _Cached | None = None

    def step(self, guider: Guider, groups: list[GroupBatch], hints, slg_layers: tuple[int, ...] | None,
             step_index: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Denoised predictions ``(all rows, skip-pass rows or None)`` of each group for this step."""
        model = guider.model
        dtype = model.compute_dtype
        key = (tuple((tuple(g.x.shape), tuple(g.context.shape), g.n_skip, g.entries) for g in groups), slg_layers,
               tuple(id(h) for h in hints))
        firsts = []
        for g in groups:
            state0 = model.embed(g.x.to(dtype), guider._timestep(g.sigma), g.context.to(dtype), g.pooled.to(dtype))
            context1, x1 = model.joint_blocks[0](state0.context, state0.x, state0.c)
            firsts.append((state0, context1, x1))
        probes = [x1 - state0.x for state0, _, x1 in firsts]
        cached = self._cached
        hit = False
        if cached is not None and key == self._key and step_index != self.last_step:
            self.last_change = relative_change(probes, cached.probes)
            hit = self.last_change < self.threshold
        depth = model.config.depth
        if hit:
            self.cached_steps += 1
            guider.stats.cache_hits += 1
            out = []
            for g, (state0, _, x1), res, skip_res in zip(groups, firsts, cached.residuals, cached.skip_residuals,
                                                         strict=True):
                guider.stats.row_blocks += g.x.shape[0]
                den = guider._denoised(g.x, g.sigma, model.unembed(JointState(x1 + res, None, state0.c, state0.hw)))
                den_skip = None
                if g.n_skip:
                    rows = slice(0, g.n_skip)
                    skipped = JointState(x1[rows] + skip_res, None, state0.c[rows], state0.hw)
                    den_skip = guider._denoised(g.x[rows], g.sigma[rows], model.unembed(skipped))
                out.append((den, den_skip))
            return out

        self.full_steps += 1
        out, residuals, skip_residuals = [], [], []
        for g, (state0, context1, x1) in zip(groups, firsts, strict=True):
            block_res = guider._residuals(hints, g.x, g.sigma, g.pooled) if hints else None
            final, skip_final = self._full(guider, g, state0, context1, x1, block_res, slg_layers)
            residuals.append(final.x - x1)
            den = guider._denoised(g.x, g.sigma, model.unembed(final))
            den_skip = None
            if skip_final is not None:
                rows = slice(0, g.n_skip)
                skip_residuals.append(skip_final.x - x1[rows])
                den_skip = guider._denoised(g.x[rows], g.sigma[rows], model.unembed(skip_final))
            else:
                skip_residuals.append(None)
            guider.stats.calls += 1
            guider.stats.row_blocks += g.x.shape[0] * depth
            out.append((den, den_skip))
        self._key = key
        self._cached = _Cached(probes, residuals, skip_residuals)
        return out

    @staticmethod
    def _full(guider: Guider, g: GroupBatch, state0: JointState, context1, x1, block_res, slg_layers):
        """The rest of a full step from the first block on, in the uncached Guider's order of operations."""
        model = guider.model
        dtype = model.compute_dtype
        x1r = x1 if block_res is None or block_res[0] is None else x1 + block_res[0].to(x1.dtype)
        state1 = JointState(x1r, context1, state0.c, state0.hw)
        if not g.n_skip:
            return model.run_blocks(state1, 1, block_residuals=block_res), None
        rows = slice(0, g.n_skip)
        depth = model.config.depth
        if block_res is None and guider.request.share_slg_prefix:
            # As Guider.run_with_skip: the blocks before the first skipped one run once for all rows.
            k = min(slg_layers)
            fork_from = state0 if k == 0 else model.run_blocks(state1, 1, k)
            rest_from = state1 if k == 0 else fork_from
            final = model.run_blocks(rest_from, max(k, 1))
            skip_final = model.run_blocks(fork_from.select(rows), k, skip_layers=slg_layers)
            guider.stats.shared_prefix_steps += 1
            n_after = len({s for s in slg_layers if s >= k})
            guider.stats.row_blocks += g.n_skip * (depth - k - n_after)
            return final, skip_final
        # As the uncached separate skip pass: its own embedding of the positive rows, no ControlNet residuals.
        final = model.run_blocks(state1, 1, block_residuals=block_res)
        skip0 = model.embed(g.x[rows].to(dtype), guider._timestep(g.sigma[rows]), g.context[rows].to(dtype),
                            g.pooled[rows].to(dtype))
        skip_final = model.run_blocks(skip0, skip_layers=slg_layers)
        guider.stats.separate_skip_steps += 1
        guider.stats.calls += 1
        guider.stats.row_blocks += g.n_skip * (depth - len(set(slg_layers)))
        return final, skip_final
