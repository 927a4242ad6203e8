"""Model passes: everything a sampling step asks of the diffusion model, in one place.

The :class:`~.guidance.Guider` decides *which* rows a step needs (cond, uncond, the skip-layer pass, per
conditioning entry); a :class:`ModelPasses` computes them. The step cache (:mod:`.step_cache`) uses the same
object, so a step the cache runs in full is the guider's step, operation for operation: a cache that never
hits is bit-identical to no cache because there is only one implementation.

A step's rows come as :class:`RowBatch` groups (rows of one context length). For each group,
:meth:`ModelPasses.embed` and :meth:`ModelPasses.first_block` run the patch/timestep/text embedding and joint
block 0, and :meth:`ModelPasses.finish` runs the rest:

- ControlNet residuals (summed over the active hints, computed for the whole batch as the reference does)
  are added after every joint block;
- the skip-layer rows (the group's first ``n_skip`` rows, positives) run again with the listed blocks left
  out. Without ControlNet residuals the blocks before the first skipped one see the same input as the
  positive rows of the main batch, so they run once and the skip rows fork there (``share_slg_prefix``);
  with residuals the reference's skip pass has none, so it runs separately from its own embedding.

:class:`ModelPasses` runs our :class:`~..models.mmditx.MMDiTX` block by block. A model that can only run
whole passes (ComfyUI's own MMDiT behind the MODEL bridge) implements :class:`WholePasses` instead: its
:meth:`~WholePasses.forward` is the one thing it provides, every skip pass is separate, and the step cache,
which needs block 0 on its own, is refused by name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.mmditx import JointState, MMDiTConfig, MMDiTX
from ..models.numerics import weights_label
from .control import ControlHint, controlnet_residuals, expand_residuals
from .ip_adapter import ip_rows, positive_rows

TIMESTEP_SCALE = 1000.0


@dataclass
class PassStats:
    """Counts of what the model computed, for tests, benchmarks and the step cache's log line."""

    calls: int = 0  # batched model passes
    shared_prefix_steps: int = 0  # group steps whose skip pass forked off the main batch
    separate_skip_steps: int = 0  # group steps whose skip pass ran from its own embedding
    row_blocks: int = 0  # joint-block evaluations times batch rows
    cache_hits: int = 0  # steps whose blocks after the first were reused from the step cache


@dataclass
class RowBatch:
    """One batched model pass of a step: latents, sigmas, conditioning rows, and how many leading rows also
    take the skip-layer pass (0 when SLG is off at this step). Rows of an area entry hold the latent cropped to
    it (padded to the patch size); ``crop`` is then the area's size ``(h, w)`` before padding."""

    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    n_skip: int
    entries: tuple = ()  # which conditioning entries the rows belong to (the step cache keys on it)
    crop: tuple[int, int] | None = None  # an area's size before padding; None: the whole latent
    ip_adapters: tuple = ()  # the IP-Adapter hints active at this step (sampling.ip_adapter.IPAdapterHint)


@dataclass
class Denoised:
    """A group's denoised rows and, when it has skip rows, their skip-layer prediction; block-wise passes also
    keep the image tokens after the last joint block of each (what the step cache stores)."""

    rows: torch.Tensor
    skipped: torch.Tensor | None = None
    final: JointState | None = None
    skip_final: JointState | None = None


def denoised(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The flow model's x0 estimate ``x - velocity * sigma`` (float32; ``sigma`` one per row)."""
    return x - velocity.float() * sigma.view(sigma.shape[:1] + (1,) * (velocity.ndim - 1))


def timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The timestep the model is given: ``sigma * 1000`` in float32."""
    return (sigma * TIMESTEP_SCALE).float()


class _Passes:
    """What both kinds of passes share: the model's config and dtype, the stats, and the ControlNet residuals."""

    blockwise: bool

    def __init__(self, model, share_slg_prefix: bool = True) -> None:
        self.model = model
        self.share_slg_prefix = share_slg_prefix
        self.stats = PassStats()

    @property
    def config(self) -> MMDiTConfig:
        return self.model.config

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.model.context_embedder.weight.device

    @property
    def weights(self) -> str:
        """How the model's weights are stored, for the non-finite guard's message."""
        return weights_label(self.model)

    def control_residuals(self, hints: Sequence[ControlHint], g: RowBatch) -> list[torch.Tensor | None] | None:
        """The active hints' outputs summed per joint block, or ``None`` without hints."""
        total: list[torch.Tensor | None] | None = None
        for hint in hints:
            outputs = controlnet_residuals(self.control_input, hint.controlnet, g.x, g.sigma, g.pooled,
                                           hint.latent_for(tuple(g.x.shape[-2:]), g.crop), hint.strength)
            per_block = expand_residuals(outputs, self.config.depth)
            if total is None:
                total = list(per_block)
            else:
                total = [a if b is None else b if a is None else a + b for a, b in zip(total, per_block, strict=True)]
        return total


class ModelPasses(_Passes):
    """Passes over our MMDiT-X, block by block (see the module doc)."""

    blockwise = True

    def __init__(self, model: MMDiTX, share_slg_prefix: bool = True) -> None:
        super().__init__(model, share_slg_prefix)
        self.control_input = model  # what the ControlNets take their input embeddings from

    def embed(self, g: RowBatch, rows: slice = slice(None)):
        """Patch, timestep and text embedding of the group's ``rows``, with their IP-Adapter tokens (positive
        rows the pictures', negative rows those of zero features) when the group has active adapters."""
        dtype = self.compute_dtype
        state = self.model.embed(g.x[rows].to(dtype), timestep(g.sigma[rows]), g.context[rows].to(dtype),
                                 g.pooled[rows].to(dtype))
        if g.ip_adapters:
            positive = positive_rows(g.entries, g.x.shape[0])[rows]
            state.ip = ip_rows(g.ip_adapters, positive, timestep(g.sigma[rows]), dtype, self.device)
        return state

    def first_block(self, state):
        """Joint block 0 on an embedded state: ``(context, x)`` after it, before any ControlNet residual."""
        self.stats.row_blocks += state.x.shape[0]
        if state.ip is not None:
            return self.model.joint_blocks[0](state.context, state.x, state.c, functools.partial(state.ip.add_to, 0))
        return self.model.joint_blocks[0](state.context, state.x, state.c)

    def blocks(self, state, start: int, stop: int | None = None, skip_layers: Sequence[int] = (),
               residuals: Sequence[torch.Tensor | None] | None = None):
        """Joint blocks ``start .. stop - 1`` without ``skip_layers``, residuals added after each."""
        stop = self.config.depth if stop is None else stop
        ran = sum(1 for i in range(start, stop) if i not in set(skip_layers))
        self.stats.row_blocks += state.x.shape[0] * ran
        return self.model.run_blocks(state, start, stop, skip_layers=skip_layers, block_residuals=residuals)

    def to_denoised(self, g: RowBatch, state, rows: slice = slice(None)) -> torch.Tensor:
        """Final layer of ``state`` and the x0 estimate of the group's ``rows``."""
        return denoised(g.x[rows], g.sigma[rows], self.model.unembed(state))

    def run(self, g: RowBatch, hints: Sequence[ControlHint], skip_layers: Sequence[int] | None) -> Denoised:
        """The group's whole step: :meth:`embed`, :meth:`first_block`, then :meth:`finish`."""
        state0 = self.embed(g)
        return self.finish(g, state0, self.first_block(state0), hints, skip_layers)

    def finish(self, g: RowBatch, state0, first, hints: Sequence[ControlHint],
               skip_layers: Sequence[int] | None) -> Denoised:
        """The rest of a group's step after block 0 (``first``, from :meth:`first_block` on ``state0``)."""
        self.stats.calls += 1
        residuals = self.control_residuals(hints, g) if hints else None
        context1, x1 = first
        if residuals is not None and residuals[0] is not None:
            x1 = x1 + residuals[0].to(x1.dtype)
        state1 = JointState(x1, context1, state0.c, state0.hw, state0.ip)
        if not g.n_skip:
            final = self.blocks(state1, 1, residuals=residuals)
            return Denoised(self.to_denoised(g, final), final=final)
        rows = slice(0, g.n_skip)
        if residuals is None and self.share_slg_prefix:
            k = min(skip_layers)
            fork_from = state0 if k == 0 else self.blocks(state1, 1, k)
            final = self.blocks(state1 if k == 0 else fork_from, max(k, 1))
            skip_final = self.blocks(fork_from.select(rows), k, skip_layers=skip_layers)
            self.stats.shared_prefix_steps += 1
        else:
            final = self.blocks(state1, 1, residuals=residuals)
            self.stats.calls += 1
            skip_final = self.blocks(self.embed(g, rows), 0, skip_layers=skip_layers)
            self.stats.separate_skip_steps += 1
        return Denoised(self.to_denoised(g, final), self.to_denoised(g, skip_final, rows), final, skip_final)


class WholePasses(_Passes):
    """Passes over a model that runs whole forward passes only; subclasses implement :meth:`forward` and
    :meth:`patch_embed`, and give ``model`` a ``config``, ``compute_dtype``, ``y_embedder`` and
    ``context_embedder``."""

    blockwise = False

    @property
    def control_input(self) -> WholePasses:
        return self

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Sequence[int], residuals: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
        """The velocity prediction (float32) of one pass; ``residuals`` one per joint block or ``None``."""
        raise NotImplementedError

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus cropped position grid (what the 8b ControlNets take as input)."""
        raise NotImplementedError

    @property
    def y_embedder(self):
        """The pooled-vector embedder (what the 2b ControlNets take their conditioning through)."""
        return self.model.y_embedder

    def _pass(self, g: RowBatch, rows: slice, skip_layers: Sequence[int], residuals) -> torch.Tensor:
        self.stats.calls += 1
        self.stats.row_blocks += g.x[rows].shape[0] * (self.config.depth - len(set(skip_layers)))
        dtype = self.compute_dtype
        velocity = self.forward(g.x[rows].to(dtype), timestep(g.sigma[rows]), g.context[rows].to(dtype),
                                g.pooled[rows].to(dtype), tuple(skip_layers), residuals)
        return denoised(g.x[rows], g.sigma[rows], velocity)

    def run(self, g: RowBatch, hints: Sequence[ControlHint], skip_layers: Sequence[int] | None) -> Denoised:
        """The group's step: one pass with the ControlNet residuals, and a separate skip pass without them."""
        if g.ip_adapters:
            raise ValueError("IP-Adapter: it adds attention inside our MMDiT-X's joint blocks, and this model runs "
                             "only whole passes (a ComfyUI MODEL on its own forward); load the model with the "
                             "pack's SD3.5 loaders to use an IP-Adapter")
        residuals = self.control_residuals(hints, g) if hints else None
        out = Denoised(self._pass(g, slice(None), (), residuals))
        if g.n_skip:
            out.skipped = self._pass(g, slice(0, g.n_skip), skip_layers, None)
            self.stats.separate_skip_steps += 1
        return out


def as_passes(model: MMDiTX | ModelPasses | WholePasses, share_slg_prefix: bool = True):
    """``model`` as passes: an :class:`~..models.mmditx.MMDiTX` gets :class:`ModelPasses`; passes stay as
    they are (with ``share_slg_prefix`` set for this run)."""
    if isinstance(model, _Passes):
        model.share_slg_prefix = share_slg_prefix
        return model
    return ModelPasses(model, share_slg_prefix)
