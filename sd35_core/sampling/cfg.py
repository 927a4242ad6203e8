"""How a step's cond and uncond predictions become one: CFG and its variants, as ComfyUI's ``sampling_function``
and ``cfg_function`` (``comfy/samplers.py``) compute them.

The settings a :class:`~.request.SampleRequest` carries:

- :class:`CFGZeroStar`: ComfyUI's *CFGZeroStar* node (a post-CFG function): with ``alpha = <v_c, v_u> /
  (|v_u|^2 + 1e-8)`` per image, ``v = x - denoised``, the result becomes ``out + uncond * (alpha - 1) + cfg *
  uncond * (1 - alpha)``, i.e. CFG around ``alpha * uncond``. ``zero_init_steps`` = N makes the model's
  prediction zero on the first N steps (``denoised = x``; the CFG-Zero* paper's zero-init, its ``zero_steps`` =
  N - 1), without running the model on them.
- :class:`APG`: ComfyUI's *Adaptive Projected Guidance* node (a pre-CFG function): the guidance ``cond - uncond``,
  averaged with ``momentum`` over the run, scaled down to a norm of at most ``norm_threshold``, has its part
  parallel to ``cond`` scaled by ``eta``; ``cond`` becomes ``uncond + guidance + (cond - uncond) / cfg``.
- :class:`ModelHooks`: a ComfyUI MODEL's own ``sampler_pre_cfg_function`` list, ``sampler_cfg_function`` and
  ``sampler_post_cfg_function`` list (RescaleCFG, CFGNorm, third-party nodes), called with the argument
  dictionaries ComfyUI's samplers pass; ``extra`` supplies what only ComfyUI has (its model, model options and
  processed conds, for hooks that call back into it).

One step, in the order of a ComfyUI graph *model -> (its hooks) -> APG -> CFGZeroStar -> SkipLayerGuidanceSD3*:
the model's pre-CFG functions, APG; the model's CFG function or ``uncond + (cond - uncond) * cfg``; the model's
post-CFG functions, CFG-Zero*, and last the pack's skip-layer guidance ``+ (cond - skipped) * scale`` (with the
cond as APG left it, as ComfyUI's node reads ``cond_denoised``). Without any of these it is the reference's CFG,
bit for bit. When the negative is left out at ``cfg == 1`` its prediction is zero here, as in ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..validation import check_finite, check_int


@dataclass(frozen=True)
class CFGZeroStar:
    """CFG-Zero*: the optimised scale (ComfyUI's CFGZeroStar node) and zero-init of the first steps."""

    zero_init_steps: int = 0

    def __post_init__(self) -> None:
        check_int("cfg_zero_star zero_init_steps", self.zero_init_steps, 0)


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (ComfyUI's APG node; its defaults)."""

    eta: float = 1.0
    norm_threshold: float = 5.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", check_finite("apg eta", self.eta))
        object.__setattr__(self, "norm_threshold", check_finite("apg norm_threshold", self.norm_threshold, 0.0))
        object.__setattr__(self, "momentum", check_finite("apg momentum", self.momentum, hi=1.0))


@dataclass(frozen=True, eq=False)
class ModelHooks:
    """A ComfyUI MODEL's CFG functions (see the module doc); ``extra`` is called once per step for the entries
    only ComfyUI can give (``model``, ``model_options``, ``cond``, ``uncond``, ``input_cond``, ``input_uncond``)."""

    pre_cfg: tuple[Callable, ...] = ()
    cfg_function: Callable | None = None
    post_cfg: tuple[Callable, ...] = ()
    extra: Callable[[], Mapping] = field(default=lambda: {})

    @property
    def any(self) -> bool:
        return bool(self.pre_cfg or self.post_cfg or self.cfg_function is not None)


def optimized_scale(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``optimized_scale``: per image ``<p, n> / (|n|^2 + 1e-8)``, shaped to broadcast."""
    positive_flat = positive.reshape(positive.shape[0], -1)
    negative_flat = negative.reshape(negative.shape[0], -1)
    dot_product = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)
    squared_norm = torch.sum(negative_flat**2, dim=1, keepdim=True) + 1e-8
    st_star = dot_product / squared_norm
    return st_star.reshape([positive.shape[0]] + [1] * (positive.ndim - 1))


def cfg_zero_star(out: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  cfg: float) -> torch.Tensor:
    """ComfyUI's CFGZeroStar post-CFG function."""
    alpha = optimized_scale(x - cond, x - uncond)
    return out + uncond * (alpha - 1.0) + cfg * uncond * (1.0 - alpha)


def _project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])
    v0_parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    return v0_parallel, v0 - v0_parallel


class _APGState:
    """ComfyUI's APG pre-CFG function with its running average (one per run, reset when sigma rises)."""

    def __init__(self, apg: APG) -> None:
        self.apg = apg
        self.running_avg: torch.Tensor | int = 0
        self.prev_sigma: torch.Tensor | None = None

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, sigma: torch.Tensor, cfg: float) -> torch.Tensor:
        apg = self.apg
        sigma = sigma[0]
        if self.prev_sigma is not None and sigma > self.prev_sigma:
            self.running_avg = 0
        self.prev_sigma = sigma
        guidance = cond - uncond
        if apg.momentum != 0:
            if not torch.is_tensor(self.running_avg):
                self.running_avg = guidance
            else:
                self.running_avg = apg.momentum * self.running_avg + guidance
            guidance = self.running_avg
        if apg.norm_threshold > 0:
            guidance_norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            scale = torch.minimum(torch.ones_like(guidance_norm), apg.norm_threshold / guidance_norm)
            guidance = guidance * scale
        parallel, orthogonal = _project(guidance, cond)
        modified = orthogonal + apg.eta * parallel
        return (uncond + modified) + (cond - uncond) / cfg


class Combiner:
    """One run's CFG step (see the module doc); keeps APG's running average between calls."""

    def __init__(self, cfg: float, zero_star: CFGZeroStar | None, apg: APG | None, hooks: ModelHooks | None) -> None:
        self.cfg = cfg
        self.zero_star = zero_star
        self.apg = _APGState(apg) if apg is not None else None
        self.hooks = hooks if hooks is not None and hooks.any else None

    @property
    def plain(self) -> bool:
        """No variant and no hook: the reference's CFG."""
        return self.zero_star is None and self.apg is None and self.hooks is None

    def zero_init(self, step_index: int) -> bool:
        """Whether this step's prediction is zero (CFG-Zero*'s zero-init)."""
        return self.zero_star is not None and step_index < self.zero_star.zero_init_steps

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(denoised, cond)``: the guided prediction and the cond the skip-layer term is taken from. ``neg`` is
        ``None`` when the negative was left out (cfg 1)."""
        cfg = self.cfg
        if self.plain:
            out = pos if neg is None else neg + (pos - neg) * cfg
            return out, pos
        if neg is None:
            neg = torch.zeros_like(pos)  # ComfyUI's calc_cond_batch for a left-out uncond
        hooks = self.hooks
        extra = dict(hooks.extra()) if hooks is not None else {}
        conds = [extra.get("cond"), extra.get("uncond")]
        if hooks is not None:
            out_list = [pos, neg]
            for fn in hooks.pre_cfg:
                args = {"conds": conds, "conds_out": out_list, "cond_scale": cfg, "timestep": sigma, "input": x,
                        "sigma": sigma, "model": extra.get("model"), "model_options": extra.get("model_options")}
                out_list = fn(args)
            pos, neg = out_list[0], out_list[1]
        if self.apg is not None:
            pos = self.apg(pos, neg, sigma, cfg)
        if hooks is not None and hooks.cfg_function is not None:
            args = {"cond": x - pos, "uncond": x - neg, "cond_scale": cfg, "timestep": sigma, "input": x,
                    "sigma": sigma, "cond_denoised": pos, "uncond_denoised": neg, "model": extra.get("model"),
                    "model_options": extra.get("model_options"), "input_cond": conds[0], "input_uncond": conds[1]}
            out = x - hooks.cfg_function(args)
        else:
            out = neg + (pos - neg) * cfg
        if hooks is not None:
            for fn in hooks.post_cfg:
                args = {"denoised": out, "cond": conds[0], "uncond": conds[1], "cond_scale": cfg,
                        "model": extra.get("model"), "uncond_denoised": neg, "cond_denoised": pos, "sigma": sigma,
                        "model_options": extra.get("model_options"), "input": x}
                out = fn(args)
        if self.zero_star is not None:
            out = cfg_zero_star(out, x, pos, neg, cfg)
        return out, pos
