"""The sampling settings a run ends up with: the reference's per-model defaults under the options given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .options import GenerateOptions, check_positive, stem


@dataclass(frozen=True)
class Settings:
    """The sampling settings a run ends up with, after per-model defaults."""

    shift: float
    steps: int
    cfg: float
    sampler: str
    slg: Any  # sd35_core SkipLayerGuidance or None
    defaults_from: str  # which defaults-table entry applied ("" when none)


def slg_requested(opts: GenerateOptions) -> bool:
    """Whether any ``--slg_*`` option is given (they turn SLG on for any model)."""
    return any(getattr(opts, n) is not None for n in ("slg_layers", "slg_scale", "slg_start", "slg_end"))


def defaults_entry(model_path: str, variant: str, controlnet_path: str | None = None,
                   controlnet_type: str | None = None) -> tuple[str, str]:
    """Which rows of sd35_core.sampling.defaults apply: ``(model row, controlnet row or "")``.

    As the reference, the model file's base name picks the row (``sd3.5_medium.safetensors`` ->
    ``sd3.5_medium``); a renamed file falls back to the variant detected from its weights. A ControlNet
    row comes from the ControlNet file's name, else from its type (``sd3.5_large_controlnet_<type>``).
    """
    from sd35_core.sampling.defaults import DEFAULTS

    model_row = stem(model_path) if stem(model_path) in DEFAULTS else variant
    cn_row = ""
    if controlnet_path is not None:
        if stem(controlnet_path) in DEFAULTS:
            cn_row = stem(controlnet_path)
        elif controlnet_type is not None and f"sd3.5_large_controlnet_{controlnet_type}" in DEFAULTS:
            cn_row = f"sd3.5_large_controlnet_{controlnet_type}"
    return model_row, cn_row


def resolve_settings(
    opts: GenerateOptions, model_row: str, controlnet_row: str = "", depth: int | None = None
) -> Settings:
    """Per-model defaults filled in under the options given, in the reference's precedence.

    The model row gives shift/steps/cfg/sampler; ``--skip_layer_cfg`` adds the row's SLG and its cfg
    (4.0 for SD3.5 Medium, see DESCRIPTION); a ControlNet row overrides the model row; explicit options
    override both. ``--slg_*`` options enable SLG on any model (unset fields from the recommended SLG).
    """
    from sd35_core.sampling.defaults import DEFAULTS, defaults_for
    from sd35_core.sampling.request import SkipLayerGuidance

    check_positive("steps", opts.steps, whole=True)
    check_positive("shift", opts.shift)
    check_positive("cfg", opts.cfg)
    base = defaults_for(model_row, slg=bool(opts.skip_layer_cfg))
    shift, steps, cfg, sampler = base.shift, base.steps, base.cfg, base.sampler
    if controlnet_row:
        cn = defaults_for(controlnet_row)
        shift, steps, cfg, sampler = cn.shift, cn.steps, cn.cfg, cn.sampler
    slg = base.slg
    if slg_requested(opts) or (slg is not None and opts.slg_window):
        rec = DEFAULTS[model_row].slg
        template = slg or (rec.guidance() if rec is not None else SkipLayerGuidance())
        slg = SkipLayerGuidance(
            layers=opts.slg_layers if opts.slg_layers is not None else template.layers,
            scale=opts.slg_scale if opts.slg_scale is not None else template.scale,
            start=opts.slg_start if opts.slg_start is not None else template.start,
            end=opts.slg_end if opts.slg_end is not None else template.end,
            window=opts.slg_window or template.window,
        )
    if slg is not None and not slg.enabled:
        slg = None
    if slg is not None and depth is not None:
        slg.check_depth(depth)
    return Settings(
        shift=opts.shift if opts.shift is not None else shift,
        steps=opts.steps if opts.steps is not None else steps,
        cfg=opts.cfg if opts.cfg is not None else cfg,
        sampler=opts.sampler if opts.sampler is not None else sampler,
        slg=slg,
        defaults_from=controlnet_row or model_row,
    )


def settings_summary(s: Settings, opts: GenerateOptions) -> dict[str, Any]:
    """The settings part of the ``--json`` summary."""
    slg = None
    if s.slg is not None:
        slg = {"layers": list(s.slg.layers), "scale": s.slg.scale, "start": s.slg.start, "end": s.slg.end,
               "window": s.slg.window}
    d = {"shift": s.shift, "steps": s.steps, "cfg": s.cfg, "sampler": s.sampler, "slg": slg,
         "defaults_from": s.defaults_from, "seed_type": opts.seed_type}
    if opts.init_image:
        d["denoise"] = opts.denoise
    if opts.mask:
        d["mask"] = {"file": opts.mask, "grow": opts.grow_mask, "mode": opts.mask_mode}
    from .cfg_options import cfg_summary

    d.update(cfg_summary(opts))
    return d
