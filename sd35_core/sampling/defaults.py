"""Recommended sampling settings per model variant: the one table the nodes, CLI and frontend read.

Values are the Stability reference's ``CONFIGS`` (sd3_infer.py), plus rows for the bundled tiny shapes
model (keyed by its file names, as the reference keys its rows). The reference asks for cfg 4.0 when
skip-layer guidance is on for SD3.5 Medium but its ``main()`` reads the cfg before that, so it never
applies; this table uses the intended 4.0 with SLG. The frontend gets :func:`defaults_json` from a
server route and keeps no copy of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .request import SkipLayerGuidance
from .samplers import SAMPLERS
from .schedule import SCHEDULES


@dataclass(frozen=True)
class SLGDefaults:
    """Recommended skip-layer guidance for a variant, and the cfg to use with it."""

    layers: tuple[int, ...]
    scale: float
    start: float
    end: float
    cfg: float

    def guidance(self) -> SkipLayerGuidance:
        """As the guidance object the sampler takes (reference step window)."""
        return SkipLayerGuidance(layers=self.layers, scale=self.scale, start=self.start, end=self.end)


@dataclass(frozen=True)
class VariantDefaults:
    """Recommended settings for one variant."""

    variant: str
    label: str
    shift: float
    steps: int
    cfg: float
    sampler: str
    schedule: str = "reference"
    slg: SLGDefaults | None = None
    size: int | None = None  # native image side in pixels when it is not the reference's 1024 (the toy model)


@dataclass(frozen=True)
class Settings:
    """Settings to sample with: what :func:`defaults_for` returns."""

    shift: float
    steps: int
    cfg: float
    sampler: str
    schedule: str
    slg: SkipLayerGuidance | None


_CONTROLNET = dict(shift=3.0, steps=60, cfg=3.5, sampler="euler")
_TINY = dict(shift=3.0, steps=20, cfg=5.0, sampler="euler", size=64)

DEFAULTS: dict[str, VariantDefaults] = {
    d.variant: d
    for d in (
        VariantDefaults("sd3_medium", "SD3 Medium", shift=1.0, steps=50, cfg=5.0, sampler="dpmpp_2m"),
        VariantDefaults(
            "sd3.5_medium",
            "SD3.5 Medium",
            shift=3.0,
            steps=50,
            cfg=5.0,
            sampler="dpmpp_2m",
            slg=SLGDefaults(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.2, cfg=4.0),
        ),
        VariantDefaults("sd3.5_large", "SD3.5 Large", shift=3.0, steps=40, cfg=4.5, sampler="dpmpp_2m"),
        VariantDefaults("sd3.5_large_turbo", "SD3.5 Large Turbo", shift=3.0, steps=4, cfg=1.0, sampler="euler"),
        VariantDefaults("sd3.5_large_controlnet_blur", "SD3.5 Large + blur ControlNet", **_CONTROLNET),
        VariantDefaults("sd3.5_large_controlnet_canny", "SD3.5 Large + canny ControlNet", **_CONTROLNET),
        VariantDefaults("sd3.5_large_controlnet_depth", "SD3.5 Large + depth ControlNet", **_CONTROLNET),
        # The bundled toy model (sd35_train; rows keyed by its file names, as the reference keys its CONFIGS),
        # settings chosen with `sd35 eval-tiny`.
        VariantDefaults(
            "tiny_shapes_sd35",
            "Tiny shapes (bundled toy model)",
            **_TINY,
            slg=SLGDefaults(layers=(2,), scale=2.5, start=0.01, end=0.2, cfg=5.0),
        ),
        VariantDefaults("tiny_shapes_controlnet_canny", "Tiny shapes + canny ControlNet", **_TINY),
    )
}


def defaults_for(variant: str, slg: bool = False) -> Settings:
    """Recommended settings for ``variant``; ``slg=True`` adds the variant's skip-layer guidance and its cfg.

    Variants without recommended SLG (all but SD3.5 Medium) return ``slg=None`` either way, as the
    reference does. Unknown variants raise ``ValueError`` listing the known ones.
    """
    try:
        d = DEFAULTS[variant]
    except KeyError:
        raise ValueError(f"variant: expected one of {', '.join(DEFAULTS)}, got {variant!r}") from None
    if slg and d.slg is not None:
        return Settings(d.shift, d.steps, d.slg.cfg, d.sampler, d.schedule, d.slg.guidance())
    return Settings(d.shift, d.steps, d.cfg, d.sampler, d.schedule, None)


def defaults_json() -> dict:
    """The table as plain JSON data: ``{"variants": {name: {...}}, "samplers": [...], "schedules": [...]}``."""
    variants = {}
    for name, d in DEFAULTS.items():
        entry = asdict(d)
        if d.slg is not None:
            entry["slg"]["layers"] = list(d.slg.layers)
        variants[name] = entry
    return {"variants": variants, "samplers": list(SAMPLERS), "schedules": list(SCHEDULES)}
