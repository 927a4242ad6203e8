"""Classifier-free guidance, skip-layer guidance and ControlNet hints around an MMDiT(-X).

:class:`Guider` turns a model and its conditioning into the ``model(x, sigma, step_index) -> denoised``
callable the samplers drive. With one positive and one negative entry it computes exactly what the
Stability reference's ``CFGDenoiser`` / ``SkipLayerCFGDenoiser`` compute:

- cond and uncond run as one batch ``[cond; uncond]`` at timestep ``sigma * 1000`` (float32), the
  latent cast to the model's compute dtype, the output cast back to float32;
  ``denoised = x - output * sigma``; ``out = uncond + (cond - uncond) * cfg``.
- skip-layer guidance (SLG): on the steps of its window one more pass of the positive conditioning
  with the listed joint blocks skipped; ``out += (cond - skipped) * scale``. The reference's window is
  on the step index ``i``: ``start * steps < i < end * steps``, where ``steps`` is the requested step
  count and ``i`` counts from the first step actually sampled (so an img2img run starts at ``i = 0``,
  as the reference's call counter does). The reference counts model calls; for the samplers with one
  call per step that is the step index, and for ``heun`` (two calls per step) we use the step index, so
  the window covers the same part of the schedule. ``window="sigma"`` instead uses ComfyUI's
  ``SkipLayerGuidanceSD3`` rule ``percent_to_sigma(end) <= sigma <= percent_to_sigma(start)``.
- ControlNet: for every :class:`~.controlnet.ControlHint` active at the step, its per-block residuals
  (computed for the whole cond/uncond batch, as the reference does) are summed and added after each
  joint block. The skip-layer pass gets no residuals, as in the reference.

Beyond the reference, the skip-layer pass shares the work it has in common with the positive half of
the CFG batch: the blocks before the first skipped one see the same input, timestep and conditioning,
so the batch runs them once, the positive rows are forked there, and both branches finish from that
block (:class:`~.passes.ModelPasses`). Without ControlNet residuals this equals the separate pass up
to float round-off from the different batch sizes; with residuals the branches' prefixes would differ
(the reference's skip pass has none), so the separate pass is used.

Several entries per side (ComfyUI's *Conditioning (Combine)* and *Timestep Range*): an entry is active
while ``percent_to_sigma(end_percent) <= sigma <= percent_to_sigma(start_percent)``, and a side's
prediction is the strength-weighted average of its active entries' predictions, computed as ComfyUI's
``calc_cond_batch`` does (``sum(pred * strength) / (1e-37 + sum(strength))``). When no entry of a side
is active, that sum is empty and the side predicts 0, again as in ComfyUI; a warning is logged once.
Entries whose context lengths differ cannot share a batch and run in separate model calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..validation import check_finite
from .passes import ModelPasses, PassStats, RowBatch, WholePasses, as_passes
from .request import SampleRequest
from .schedule import percent_to_sigma
from .step_cache import StepCache

if TYPE_CHECKING:
    from ..models.mmditx import MMDiTX

log = logging.getLogger(__name__)

TIMESTEP_SCALE = 1000.0


def _as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


@dataclass
class CondEntry:
    """One conditioning: T5/CLIP context ``[1, L, D]``, pooled vector ``[1, P]`` and ComfyUI's
    strength and timestep range (fractions of the sampling run, 0 = start)."""

    context: torch.Tensor
    pooled: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def active(self, sigma: float, shift: float) -> bool:
        """Whether this entry takes part at noise level ``sigma`` (ComfyUI's timestep-range test)."""
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            return True
        # ComfyUI compares the float32 sigma tensor with the bounds, i.e. in float32.
        s = _as_float32(sigma)
        return _as_float32(percent_to_sigma(self.end_percent, shift)) <= s <= _as_float32(
            percent_to_sigma(self.start_percent, shift)
        )


def as_entries(name: str, conds) -> list[CondEntry]:
    """Normalise one :class:`CondEntry` or a sequence of them to a non-empty list (ValueError otherwise)."""
    if isinstance(conds, CondEntry):
        return [conds]
    try:
        entries = list(conds)
    except TypeError:
        raise ValueError(f"{name}: expected a CondEntry or a list of them, got {type(conds).__name__}") from None
    if not entries:
        raise ValueError(f"{name}: expected at least one conditioning entry, got none")
    for e in entries:
        if not isinstance(e, CondEntry):
            raise ValueError(f"{name}: expected CondEntry items, got {type(e).__name__}")
    return entries


@dataclass
class _Job:
    positive: bool
    index: int
    entry: CondEntry


class Guider:
    """The guided denoiser ``guider(x, sigma_batch, step_index) -> denoised`` (see module doc).

    Of the :class:`~.request.SampleRequest` it reads ``cfg``, ``steps`` (the requested number of
    steps: the SLG and ControlNet windows are fractions of it), ``shift`` (for sigma-percent windows
    and timestep ranges), ``slg``, ``controls`` and two batching options: ``share_slg_prefix`` enables
    the shared skip-layer prefix; ``skip_uncond_at_cfg1`` leaves the negative out when ``cfg == 1``
    (ComfyUI does the same): the result then differs from the reference's full batch only by float
    round-off (``uncond + (cond - uncond) * 1`` vs ``cond``).
    """

    def __init__(
        self,
        model: MMDiTX | ModelPasses | WholePasses,
        positive: CondEntry | Sequence[CondEntry],
        negative: CondEntry | Sequence[CondEntry],
        request: SampleRequest,
    ) -> None:
        if not isinstance(request, SampleRequest):
            raise ValueError(f"request: expected a SampleRequest, got {type(request).__name__}")
        self.passes = as_passes(model, request.share_slg_prefix)
        self.request = request
        if request.slg is not None:
            request.slg.check_depth(self.passes.config.depth)
        for hint in request.ip_adapters:
            hint.check_fits(self.passes.config)
        self.use_uncond = not (request.skip_uncond_at_cfg1 and request.cfg == 1.0)
        self.positive = self._prepare("positive", positive)
        self.negative = self._prepare("negative", negative)
        self._warned_empty = False
        self.cache = None
        if request.cache_threshold > 0:
            if not self.passes.blockwise:
                raise ValueError("cache_threshold: the step cache runs joint block 0 on its own, and this model "
                                 "only runs whole passes (a ComfyUI MODEL on its own forward); set it to 0")
            self.cache = StepCache(self.passes, request.cache_threshold, last_step=len(request.sigmas()) - 2)

    @property
    def stats(self) -> PassStats:
        """What the model computed so far (shared with the step cache)."""
        return self.passes.stats

    @stats.setter
    def stats(self, stats: PassStats) -> None:
        self.passes.stats = stats

    # ------------------------------------------------------------------------------------------
    # setup

    def _prepare(self, name: str, conds) -> list[CondEntry]:
        entries = as_entries(name, conds)
        cfg = self.passes.config
        device = self.passes.device
        out = []
        for k, e in enumerate(entries):
            ctx, pooled = e.context, e.pooled
            if not isinstance(ctx, torch.Tensor) or ctx.ndim != 3 or ctx.shape[-1] != cfg.context_dim:
                shape = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
                raise ValueError(
                    f"{name}[{k}] context: expected a tensor [1, tokens, {cfg.context_dim}] for this model, got {shape}"
                )
            if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_dim:
                shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
                raise ValueError(
                    f"{name}[{k}] pooled: expected a tensor [1, {cfg.pooled_dim}] for this model, got {shape}"
                )
            if ctx.shape[0] != pooled.shape[0]:
                raise ValueError(
                    f"{name}[{k}]: context batch {ctx.shape[0]} and pooled batch {pooled.shape[0]} differ"
                )
            strength = check_finite(f"{name}[{k}] strength", e.strength, 0.0)
            start = check_finite(f"{name}[{k}] start_percent", e.start_percent, 0.0, 1.0)
            end = check_finite(f"{name}[{k}] end_percent", e.end_percent, 0.0, 1.0)
            # float32 on the model's device once, so no step pays for the copy again
            out.append(
                CondEntry(
                    ctx.to(device=device, dtype=torch.float32),
                    pooled.to(device=device, dtype=torch.float32),
                    strength,
                    start,
                    end,
                )
            )
        return out

    # ------------------------------------------------------------------------------------------
    # the guided denoiser

    def _combine(self, preds: list[tuple[torch.Tensor, float]], like: torch.Tensor) -> torch.Tensor:
        if not preds:
            if not self._warned_empty:
                log.warning("no conditioning entry is active at this step: that side predicts 0 (as ComfyUI)")
                self._warned_empty = True
            return torch.zeros_like(like)
        if len(preds) == 1 and preds[0][1] == 1.0:
            return preds[0][0]  # the reference's case; ComfyUI's sum below gives the same bits
        # ComfyUI's calc_cond_batch: accumulate pred * strength and strength, then divide.
        out = torch.zeros_like(like)
        count = torch.full((), 1e-37, dtype=torch.float32, device=like.device)
        for pred, strength in preds:
            out += pred * strength
            count += strength
        return out / count

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step_index: int) -> torch.Tensor:
        request = self.request
        batch = x.shape[0]
        s = float(sigma[0])
        jobs = [_Job(True, k, e) for k, e in enumerate(self.positive) if e.active(s, request.shift)]
        if self.use_uncond:
            jobs += [_Job(False, k, e) for k, e in enumerate(self.negative) if e.active(s, request.shift)]
        slg = request.slg
        slg_on = slg is not None and slg.active(step_index, request.steps, s, request.shift)
        hints = [h for h in request.controls if h.active(step_index, request.steps)]
        ip_adapters = tuple(h for h in request.ip_adapters if h.active(step_index, request.steps))

        # Entries that can share a batch: same context length. Positives come first in each group, so
        # with one entry a side the batch is the reference's [cond; uncond].
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            key = (tuple(job.entry.context.shape[1:]), tuple(job.entry.pooled.shape[1:]))
            groups.setdefault(key, []).append(job)

        batches = []
        for group in groups.values():
            n = len(group)
            batches.append(RowBatch(
                torch.cat([x] * n), torch.cat([sigma] * n),
                torch.cat([self._rows(j.entry.context, batch) for j in group]),
                torch.cat([self._rows(j.entry.pooled, batch) for j in group]),
                sum(j.positive for j in group) * batch if slg_on else 0,
                tuple((j.positive, j.index) for j in group),
                ip_adapters=ip_adapters,
            ))
        skip_layers = slg.layers if slg_on else None
        if self.cache is not None:
            results = self.cache.step(batches, hints, skip_layers, step_index)
        else:
            results = [self.passes.run(g, hints, skip_layers) for g in batches]

        pos_preds: list[tuple[torch.Tensor, float]] = []
        neg_preds: list[tuple[torch.Tensor, float]] = []
        skip_preds: list[tuple[torch.Tensor, float]] = []
        for group, result in zip(groups.values(), results, strict=True):
            den, den_skip = result.rows, result.skipped
            chunks = den.split(batch)
            skip_chunks = den_skip.split(batch) if den_skip is not None else ()
            for j, (job, chunk) in enumerate(zip(group, chunks, strict=True)):
                if job.positive:
                    pos_preds.append((chunk, job.entry.strength))
                    if den_skip is not None:
                        skip_preds.append((skip_chunks[j], job.entry.strength))
                else:
                    neg_preds.append((chunk, job.entry.strength))

        pos = self._combine(pos_preds, x)
        if self.use_uncond:
            neg = self._combine(neg_preds, x)
            out = neg + (pos - neg) * request.cfg
        else:
            out = pos
        if slg_on:
            skipped = self._combine(skip_preds, x) if skip_preds else pos
            out = out + (pos - skipped) * slg.scale
        return out

    @staticmethod
    def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
        if t.shape[0] == batch:
            return t
        if t.shape[0] != 1:
            raise ValueError(f"conditioning: batch {t.shape[0]} does not match the latent batch {batch}")
        return t.expand((batch,) + tuple(t.shape[1:]))
