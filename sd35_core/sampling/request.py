"""What one sampling run is asked to do: :class:`SampleRequest` (and its :class:`SkipLayerGuidance`).

A request holds every setting of a run besides the model, the conditioning and the starting latent. It is
built once, where the settings come from (the sampler node's widgets, ``sd35 generate``'s options, a test),
validates itself there, and travels unchanged down to :func:`~.pipeline.sample` and the
:class:`~.guidance.Guider`; ``dataclasses.replace`` makes variants (validated again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_bool, check_choice, check_finite, check_int, check_seed
from .cfg import APG, CFGZeroStar, ModelHooks
from .control import ControlHint
from .ip_adapter import IPAdapterHint
from .mask import MASK_MODES, check_mask
from .samplers import get_sampler
from .schedule import SCHEDULES, percent_to_sigma, sigmas_for

SEED_MODES = ("batch", "per_image")
SLG_WINDOWS = ("steps", "sigma")


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance settings (defaults: the reference's SD3.5 Medium configuration).

    ``window="steps"``: active on step indices ``i`` with ``start * steps < i < end * steps``
    (reference). ``window="sigma"``: active while ``percent_to_sigma(end) <= sigma <=
    percent_to_sigma(start)`` (ComfyUI's SkipLayerGuidanceSD3 node). What the pass computes is
    described in :mod:`.guidance`.
    """

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.5
    start: float = 0.01
    end: float = 0.2
    window: str = "steps"

    def __post_init__(self) -> None:
        try:
            layers = tuple(self.layers)
        except TypeError:
            raise ValueError(f"slg layers: expected a list of block indices, got {self.layers!r}") from None
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"slg layers: expected block indices (whole numbers >= 0), got {layer!r}")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "scale", check_finite("slg scale", self.scale, 0.0))
        object.__setattr__(self, "start", check_finite("slg start", self.start, 0.0, 1.0))
        object.__setattr__(self, "end", check_finite("slg end", self.end, 0.0, 1.0))
        check_choice("slg window", self.window, SLG_WINDOWS)

    def check_depth(self, depth: int) -> None:
        """ValueError if a layer does not exist in a model with ``depth`` joint blocks."""
        for layer in self.layers:
            if layer >= depth:
                raise ValueError(
                    f"slg layers: {layer} is out of range for a model with {depth} joint blocks (0..{depth - 1})"
                )

    @property
    def enabled(self) -> bool:
        return self.scale > 0 and bool(self.layers)

    def active(self, step_index: int, steps: int, sigma: float, shift: float) -> bool:
        """Whether the skip pass runs at this step (see the class doc for the two windows)."""
        if not self.enabled:
            return False
        if self.window == "steps":
            return self.start * steps < step_index < self.end * steps
        return percent_to_sigma(self.end, shift) <= float(sigma) <= percent_to_sigma(self.start, shift)


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """Every setting of one sampling run besides the model, the conditioning and the starting latent.

    - ``steps``: the requested step count (img2img runs the last part of it; the SLG and ControlNet
      windows are fractions of it); ``schedule`` one of :data:`~.schedule.SCHEDULES`, ``shift`` its
      shift (> 0; callers resolve "model default" before building the request);
    - ``sampler``: one of :data:`~.samplers.SAMPLERS`; ``cfg`` the classifier-free guidance scale;
    - ``seed`` and ``seed_mode`` (:data:`SEED_MODES`, see :func:`~.pipeline.make_noise`);
    - ``denoise`` in (0, 1]: 1 samples from pure noise, less keeps part of the starting latent;
    - ``slg``: skip-layer guidance or ``None``; ``controls``: the ControlNet hints (stored as a tuple);
      ``ip_adapters``: the IP-Adapter hints (stored as a tuple; see :mod:`.ip_adapter`);
    - ``share_slg_prefix`` and ``skip_uncond_at_cfg1``: how the :class:`~.guidance.Guider` batches
      its model passes (see there);
    - ``noise_mask``: ``None``, or where to repaint (1) and where to keep the starting latent (0), a ComfyUI
      ``MASK`` ``[B, H, W]`` or ``noise_mask`` ``[B, 1, H, W]`` of values in 0..1 at any size (resized to the
      latent as ComfyUI does; its batch must be 1 or the latent's); ``mask_mode``: ``standard`` (ComfyUI's
      noise-mask sampling) or ``differential`` (a soft mask as per-pixel strength; see :mod:`.mask`);
    - ``cache_threshold`` >= 0: the step cache (:mod:`.step_cache`); 0 turns it off, larger values
      reuse the blocks after the first on more steps (0.05 to 0.15 are useful values);
    - ``cfg_zero_star`` (:class:`~.cfg.CFGZeroStar`), ``apg`` (:class:`~.cfg.APG`): CFG variants pinned to
      ComfyUI's nodes, ``None`` for plain CFG; ``model_hooks`` (:class:`~.cfg.ModelHooks`): a ComfyUI MODEL's
      own CFG functions (see :mod:`.cfg` for the order they act in).

    Adding a setting: give it a field here with a default that keeps today's behaviour, check it in
    :meth:`__post_init__` (a ``ValueError`` starting with the field name), and read it from the
    request where it acts; the Guider must honour it for every row it batches (cond, uncond, the skip
    pass, ControlNet residuals), so the settings compose. Nothing is passed down beside the request.
    """

    steps: int
    cfg: float
    sampler: str
    shift: float
    seed: int
    schedule: str = "reference"
    seed_mode: str = "batch"
    denoise: float = 1.0
    slg: SkipLayerGuidance | None = None
    controls: tuple[ControlHint, ...] = ()
    ip_adapters: tuple[IPAdapterHint, ...] = ()
    share_slg_prefix: bool = True
    skip_uncond_at_cfg1: bool = False
    noise_mask: torch.Tensor | None = None
    mask_mode: str = "standard"
    cache_threshold: float = 0.0
    cfg_zero_star: CFGZeroStar | None = None
    apg: APG | None = None
    model_hooks: ModelHooks | None = None

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        object.__setattr__(self, "cfg", check_finite("cfg", self.cfg))
        get_sampler(self.sampler)  # ValueError listing the known samplers
        check_choice("schedule", self.schedule, SCHEDULES)
        object.__setattr__(self, "shift", check_finite("shift", self.shift, above=0.0))
        object.__setattr__(self, "denoise", check_finite("denoise", self.denoise, hi=1.0, above=0.0))
        check_seed(self.seed)
        check_choice("seed_mode", self.seed_mode, SEED_MODES)
        if self.slg is not None and not isinstance(self.slg, SkipLayerGuidance):
            raise ValueError(f"slg: expected a SkipLayerGuidance or None, got {type(self.slg).__name__}")
        try:
            controls = tuple(self.controls)
        except TypeError:
            raise ValueError(f"controls: expected a list of ControlHint, got {type(self.controls).__name__}") from None
        for hint in controls:
            if not isinstance(hint, ControlHint):
                raise ValueError(f"controls: expected ControlHint items, got {type(hint).__name__}")
        object.__setattr__(self, "controls", controls)
        try:
            ip_adapters = tuple(self.ip_adapters)
        except TypeError:
            raise ValueError(f"ip_adapters: expected a list of IPAdapterHint, got {type(self.ip_adapters).__name__}"
                             ) from None
        for hint in ip_adapters:
            if not isinstance(hint, IPAdapterHint):
                raise ValueError(f"ip_adapters: expected IPAdapterHint items, got {type(hint).__name__}")
        object.__setattr__(self, "ip_adapters", ip_adapters)
        check_bool("share_slg_prefix", self.share_slg_prefix)
        check_bool("skip_uncond_at_cfg1", self.skip_uncond_at_cfg1)
        if self.noise_mask is not None:
            object.__setattr__(self, "noise_mask", check_mask(self.noise_mask, "noise_mask"))
        check_choice("mask_mode", self.mask_mode, MASK_MODES)
        object.__setattr__(self, "cache_threshold", check_finite("cache_threshold", self.cache_threshold, 0.0))
        for name, kind in (("cfg_zero_star", CFGZeroStar), ("apg", APG), ("model_hooks", ModelHooks)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name}: expected {kind.__name__} settings or None, got {type(value).__name__}")
        if self.apg is not None and self.cfg == 0.0:
            raise ValueError("apg: adaptive projected guidance divides by cfg; set cfg above 0")

    def sigmas(self) -> torch.Tensor:
        """The sigmas this run samples (CPU float32): the schedule, img2img-truncated by ``denoise``."""
        return sigmas_for(self.schedule, self.steps, self.shift, self.denoise)
