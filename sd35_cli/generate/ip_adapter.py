"""``sd35 generate``'s IP-Adapter: ``--ip_adapter FILE --clip_vision FILE --ip_image IMAGE --ip_scale S``.

The adapter (InstantX's ``ip-adapter.bin``, read only through torch's restricted unpickler, or its safetensors
conversion) and the SigLIP vision tower load with the other models; the picture is encoded once per run and
every image's request carries the same :class:`~sd35_core.sampling.ip_adapter.IPAdapterHint`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..main import UsageError

DEFAULT_IP_SCALE = 0.5  # InstantX's suggested scale
OPTIONS = ("ip_adapter", "clip_vision", "ip_image", "ip_scale")


@dataclass
class IPParts:
    """The loaded adapter (``sd35_core.models.ip_adapter.IPAdapter``) and vision tower (``SiglipVisionTower``)."""

    adapter: Any
    tower: Any


def check_ip_options(opts) -> None:
    """Checks that need no files: the three go together, the scale is a number. ``UsageError`` naming the option."""
    given = [name for name in ("ip_adapter", "clip_vision", "ip_image") if getattr(opts, name)]
    if given and len(given) != 3:
        missing = [f"--{n}" for n in ("ip_adapter", "clip_vision", "ip_image") if n not in given]
        raise UsageError(f"--{given[0]} needs {' and '.join(missing)} (the IP-Adapter takes its file, the SigLIP "
                         "vision tower and the picture to prompt with)")
    scale = opts.ip_scale
    if scale is not None and not math.isfinite(scale):
        raise UsageError(f"--ip_scale {scale}: expected a finite number (0 leaves the adapter out)")
    if scale is not None and not given:
        raise UsageError("--ip_scale needs --ip_adapter, --clip_vision and --ip_image")


def load_ip_parts(opts, device: torch.device, say: Callable[[str], None] = lambda s: None) -> IPParts | None:
    """Load ``--ip_adapter`` and ``--clip_vision`` for ``device`` (``None`` without them)."""
    if not opts.ip_adapter:
        return None
    from sd35_core.loading.clip_vision import load_siglip_vision
    from sd35_core.loading.ip_adapter import load_ip_adapter

    for option in ("ip_adapter", "clip_vision", "ip_image"):
        path = getattr(opts, option)
        if not os.path.isfile(path):
            raise UsageError(f"--{option} {path}: no such file")
    say(f"Loading IP-Adapter {os.path.basename(opts.ip_adapter)}...")
    adapter = load_ip_adapter(opts.ip_adapter, opts.dtype, device)
    say(f"Loading vision tower {os.path.basename(opts.clip_vision)}...")
    tower = load_siglip_vision(opts.clip_vision, opts.dtype, device)
    return IPParts(adapter, tower)


def ip_hints(parts: IPParts | None, opts, model_config) -> tuple:
    """The run's IP-Adapter hints: ``--ip_image`` encoded by the tower, at ``--ip_scale`` (none without one)."""
    if parts is None:
        return ()
    import numpy as np
    from PIL import Image

    from sd35_core.image.siglip_input import encode_image
    from sd35_core.sampling.ip_adapter import IPAdapterHint

    try:
        parts.adapter.config.check_fits(model_config.hidden_size, model_config.depth, model_config.num_heads,
                                        parts.tower.config.width)
    except ValueError as e:
        raise UsageError(f"--ip_adapter {opts.ip_adapter}: {e}") from None
    with Image.open(opts.ip_image) as picture:
        rgb = np.asarray(picture.convert("RGB")).copy()
    features = encode_image(parts.tower, torch.from_numpy(rgb)[None].float() / 255.0)
    scale = DEFAULT_IP_SCALE if opts.ip_scale is None else float(opts.ip_scale)
    return (IPAdapterHint(parts.adapter, features, scale),)
