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

Area and mask conditioning (ComfyUI's *Conditioning (Set Area)*, *(Set Area with Percentage)*, *(Set Mask)*): an
entry with an ``area`` runs on the latent cropped to it, weighted by ComfyUI's ``mult`` (strength, feathered
edges, the mask), and adds to its side only there; rows of equal crop size share a batch. The rules are
ComfyUI's ``calc_cond_batch`` and are described in :mod:`.regions`. Such entries compose with everything else:
their skip-layer rows are cropped the same way and combined with the same weights, a ControlNet sees its control
image fitted to the crop (:meth:`~.control.ControlHint.latent_for`, as ComfyUI's ControlNet resizes its hint to
the input it is given), the noise mask acts around the guider, and the step cache keys on the crops.

How the cond and uncond predictions combine (CFG, CFG-Zero*, APG, a ComfyUI MODEL's CFG functions, then the
skip-layer term) is :mod:`.cfg`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..validation import check_bool, check_finite
from .cfg import Combiner
from .passes import ModelPasses, PassStats, RowBatch, WholePasses, as_passes
from .regions import FULL, Placement, Region, accumulate, check_area, check_cond_mask, crop_rows, mirror_areas, place
from .regions import resolve as resolve_region
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
    strength and timestep range (fractions of the sampling run, 0 = start).

    Where it acts (:mod:`.regions`): ``area`` ``(h, w, y, x)`` in latent pixels or ``("percentage", h, w, y, x)``
    in fractions of the latent (``None``: everywhere); ``mask`` a ComfyUI ``MASK`` ``[B, H, W]`` at any size
    weighting it per pixel, times ``mask_strength``; ``set_area_to_bounds`` makes the area the mask's box.
    """

    context: torch.Tensor
    pooled: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    area: tuple | None = None
    mask: torch.Tensor | None = None
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False

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
    placement: Placement


@dataclass
class _Layout:
    """Both sides' entries on one latent shape, areas mirrored, with where each acts."""

    positive: list[tuple[CondEntry, Placement]]
    negative: list[tuple[CondEntry, Placement]]


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
        self._layouts: dict[tuple, _Layout] = {}
        self.combiner = Combiner(request.cfg, request.cfg_zero_star, request.apg, request.model_hooks)
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
            area = check_area(f"{name}[{k}] area", e.area)
            mask = check_cond_mask(f"{name}[{k}] mask", e.mask)
            mask_strength = check_finite(f"{name}[{k}] mask_strength", e.mask_strength)
            check_bool(f"{name}[{k}] set_area_to_bounds", e.set_area_to_bounds)
            # float32 on the model's device once, so no step pays for the copy again
            out.append(
                CondEntry(
                    ctx.to(device=device, dtype=torch.float32),
                    pooled.to(device=device, dtype=torch.float32),
                    strength,
                    start,
                    end,
                    area,
                    None if mask is None else mask.to(device),
                    mask_strength,
                    e.set_area_to_bounds,
                )
            )
        return out

    def _layout(self, shape: tuple[int, ...]) -> _Layout:
        """The entries of both sides on a latent of ``shape``: regions resolved, areas mirrored to the other
        side (:func:`~.regions.mirror_areas`), crops and weights placed. Computed once per shape."""
        if self._layouts.get(shape) is None:
            hw, device = tuple(shape[2:]), self.passes.device
            sides = [[(e, resolve_region(e, hw, device) if e.area is not None or e.mask is not None else FULL)
                      for e in entries] for entries in (self.positive, self.negative)]
            if any(r.area is not None for side in sides for _, r in side):
                mirror_areas(sides)
            placed = []
            for label, side in zip(("positive", "negative"), sides, strict=True):
                placed.append([(e, self._place(f"{label}[{k}]", e, r, shape)) for k, (e, r) in enumerate(side)])
            self._layouts[shape] = _Layout(*placed)
        return self._layouts[shape]

    def _place(self, name: str, entry: CondEntry, region: Region, shape) -> Placement:
        placement = place(name, region, entry.strength, entry.mask_strength, shape, self.passes.device)
        if placement.crop is not None:
            h, w = placement.crop[:2]
            p = self.passes.config.patch_size
            self.passes.config.check_image_size(-(-w // p) * p * 8, -(-h // p) * p * 8)
        return placement

    # ------------------------------------------------------------------------------------------
    # the guided denoiser

    def _combine(self, preds: list[tuple[torch.Tensor, float, Placement]], like: torch.Tensor) -> torch.Tensor:
        if not preds:
            if not self._warned_empty:
                log.warning("no conditioning entry is active at this step: that side predicts 0 (as ComfyUI)")
                self._warned_empty = True
            return torch.zeros_like(like)
        if len(preds) == 1 and preds[0][1] == 1.0 and preds[0][2].mult is None:
            return preds[0][0]  # the reference's case; ComfyUI's sum below gives the same bits
        # ComfyUI's calc_cond_batch: accumulate pred * strength and strength, then divide.
        out = torch.zeros_like(like)
        if all(p.mult is None for _, _, p in preds):
            count = torch.full((), 1e-37, dtype=torch.float32, device=like.device)
            for pred, strength, _ in preds:
                out += pred * strength
                count += strength
            return out / count
        counts = torch.full_like(like, 1e-37)  # per latent pixel, as entries weigh only inside their areas
        for pred, strength, placement in preds:
            accumulate(out, counts, pred, strength, placement)
        return out / counts

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step_index: int) -> torch.Tensor:
        request = self.request
        if self.combiner.zero_init(step_index):
            return x.clone()  # CFG-Zero*'s zero-init: the prediction is 0, denoised = x; no model call
        batch = x.shape[0]
        s = float(sigma[0])
        layout = self._layout(tuple(x.shape))
        jobs = [_Job(True, k, e, p) for k, (e, p) in enumerate(layout.positive) if e.active(s, request.shift)]
        if self.use_uncond:
            jobs += [_Job(False, k, e, p) for k, (e, p) in enumerate(layout.negative) if e.active(s, request.shift)]
        slg = request.slg
        slg_on = slg is not None and slg.active(step_index, request.steps, s, request.shift)
        hints = [h for h in request.controls if h.active(step_index, request.steps)]
        ip_adapters = tuple(h for h in request.ip_adapters if h.active(step_index, request.steps))

        # Entries that can share a batch: same context length and crop size. Positives come first in each
        # group, so with one entry a side the batch is the reference's [cond; uncond].
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            crop = job.placement.crop
            key = (tuple(job.entry.context.shape[1:]), tuple(job.entry.pooled.shape[1:]),
                   None if crop is None else crop[:2])
            groups.setdefault(key, []).append(job)

        patch = self.passes.config.patch_size
        batches = []
        for group in groups.values():
            n = len(group)
            crop = group[0].placement.crop
            rows = torch.cat([x] * n) if crop is None else torch.cat([crop_rows(x, j.placement.crop, patch)
                                                                      for j in group])
            batches.append(RowBatch(
                rows, torch.cat([sigma] * n),
                torch.cat([self._rows(j.entry.context, batch) for j in group]),
                torch.cat([self._rows(j.entry.pooled, batch) for j in group]),
                sum(j.positive for j in group) * batch if slg_on else 0,
                tuple((j.positive, j.index) for j in group),
                None if crop is None else crop[:2],
                ip_adapters=ip_adapters,
            ))
        skip_layers = slg.layers if slg_on else None
        if self.cache is not None:
            results = self.cache.step(batches, hints, skip_layers, step_index)
        else:
            results = [self.passes.run(g, hints, skip_layers) for g in batches]

        pos_preds: list[tuple[torch.Tensor, float, Placement]] = []
        neg_preds: list[tuple[torch.Tensor, float, Placement]] = []
        skip_preds: list[tuple[torch.Tensor, float, Placement]] = []
        for group, result in zip(groups.values(), results, strict=True):
            den, den_skip = result.rows, result.skipped
            crop = group[0].placement.crop
            if crop is not None:  # cut the padding to the patch size back off
                den = den[:, :, :crop[0], :crop[1]]
                den_skip = None if den_skip is None else den_skip[:, :, :crop[0], :crop[1]]
            chunks = den.split(batch)
            skip_chunks = den_skip.split(batch) if den_skip is not None else ()
            for j, (job, chunk) in enumerate(zip(group, chunks, strict=True)):
                pred = (chunk, job.entry.strength, job.placement)
                if job.positive:
                    pos_preds.append(pred)
                    if den_skip is not None:
                        skip_preds.append((skip_chunks[j], job.entry.strength, job.placement))
                else:
                    neg_preds.append(pred)

        pos = self._combine(pos_preds, x)
        neg = self._combine(neg_preds, x) if self.use_uncond else None
        out, pos = self.combiner(x, sigma, pos, neg)
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
