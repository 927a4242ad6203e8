"""``sd35 generate``'s CFG variants, pinned to ComfyUI's nodes of the same name (see docs/guidance.md):

- ``--cfg_zero_star``: CFG-Zero*'s optimised scale (ComfyUI's CFGZeroStar); ``--zero_init_steps N`` also makes
  the first N steps' prediction zero (the paper's zero-init) and turns CFG-Zero* on;
- ``--apg``: adaptive projected guidance (ComfyUI's APG) with its defaults; ``--apg_eta``,
  ``--apg_norm_threshold`` and ``--apg_momentum`` set its values and turn it on.

Both compose with skip-layer guidance, in the order of a ComfyUI graph model -> APG -> CFGZeroStar ->
SkipLayerGuidanceSD3 (sd35_core.sampling.cfg).
"""

from __future__ import annotations

import math
from typing import Any

from ..main import UsageError

OPTIONS = ("cfg_zero_star", "zero_init_steps", "apg", "apg_eta", "apg_norm_threshold", "apg_momentum")
APG_VALUES = ("apg_eta", "apg_norm_threshold", "apg_momentum")


def add_cfg_options(ext, opt, flag, parse_int, parse_float) -> None:
    """Register the options on ``ext`` with options.py's helpers (``_opt``, ``_flag`` and its parsers)."""
    flag(ext, "cfg_zero_star", "CFG-Zero*: guidance around the optimised scale of the negative, as ComfyUI's "
                               "CFGZeroStar node")
    opt(ext, "zero_init_steps", type=parse_int, metavar="N",
        help="CFG-Zero*'s zero-init: the first N steps predict zero (the noise stays); turns --cfg_zero_star on")
    flag(ext, "apg", "adaptive projected guidance, as ComfyUI's APG node (eta 1, norm threshold 5, momentum 0 "
                     "unless --apg_* say otherwise)")
    opt(ext, "apg_eta", type=parse_float, metavar="E",
        help="APG: scale of the guidance's part parallel to the cond (1 = CFG's); turns --apg on")
    opt(ext, "apg_norm_threshold", type=parse_float, metavar="T",
        help="APG: the guidance is scaled down to at most this norm (0 = no limit); turns --apg on")
    opt(ext, "apg_momentum", type=parse_float, metavar="M",
        help="APG: running average of the guidance over the steps, in [-5, 1) as ComfyUI's (0 = none); turns --apg on")


def check_cfg_options(opts) -> None:
    """Checks that need no files; ``UsageError`` naming the option."""
    n = opts.zero_init_steps
    if n is not None and n < 0:
        raise UsageError(f"--zero_init_steps {n}: expected a whole number of steps >= 0")
    for name in APG_VALUES:
        v = getattr(opts, name)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name} {v}: expected a finite number")
    if opts.apg_norm_threshold is not None and opts.apg_norm_threshold < 0:
        raise UsageError(f"--apg_norm_threshold {opts.apg_norm_threshold}: expected a number >= 0 (0 = no limit)")
    if opts.apg_momentum is not None and opts.apg_momentum > 1:
        raise UsageError(f"--apg_momentum {opts.apg_momentum}: expected a number <= 1")


def apg_requested(opts) -> bool:
    return bool(opts.apg) or any(getattr(opts, n) is not None for n in APG_VALUES)


def cfg_variants(opts) -> dict[str, Any]:
    """The request's ``cfg_zero_star`` and ``apg`` settings for these options."""
    from sd35_core.sampling.cfg import APG, CFGZeroStar

    zero_star = None
    if opts.cfg_zero_star or opts.zero_init_steps is not None:
        zero_star = CFGZeroStar(zero_init_steps=opts.zero_init_steps or 0)
    apg = None
    if apg_requested(opts):
        defaults = APG()
        apg = APG(eta=defaults.eta if opts.apg_eta is None else opts.apg_eta,
                  norm_threshold=defaults.norm_threshold if opts.apg_norm_threshold is None
                  else opts.apg_norm_threshold,
                  momentum=defaults.momentum if opts.apg_momentum is None else opts.apg_momentum)
    return {"cfg_zero_star": zero_star, "apg": apg}


def cfg_summary(opts) -> dict[str, Any]:
    """The variants for the ``--json`` summary and the PNG's settings (empty when neither is on)."""
    variants = cfg_variants(opts)
    out: dict[str, Any] = {}
    if variants["cfg_zero_star"] is not None:
        out["cfg_zero_star"] = {"zero_init_steps": variants["cfg_zero_star"].zero_init_steps}
    if variants["apg"] is not None:
        a = variants["apg"]
        out["apg"] = {"eta": a.eta, "norm_threshold": a.norm_threshold, "momentum": a.momentum}
    return out
