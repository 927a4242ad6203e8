"""ComfyUI's scaled-fp8 layout: fp8 weights with a per-tensor scale, read onto the layers that use them.

Comfy-Org's ``sd3.5_large_fp8_scaled.safetensors`` and ``t5xxl_fp8_e4m3fn_scaled.safetensors`` store each large
linear weight as float8 with a float32 ``<layer>.scale_weight`` beside it: the effective weight is the fp8
values times that one number. A ``scaled_fp8`` marker tensor sits at the part's own prefix (its dtype names the
fp8 format; ComfyUI reads ``model.diffusion_model.scaled_fp8`` and ``text_encoders.t5xxl.transformer.scaled_fp8``,
or a bare ``scaled_fp8`` in a file of one part). Files from other quantizers name the same per-tensor scale
``weight_scale``; they load the same way.

``scale_input`` (``input_scale``) is ComfyUI's per-tensor scale for the *activations* of an fp8 x fp8 matrix
multiply: it divides the input before the input is rounded to fp8 and multiplies the product back, so it changes
nothing but the rounding of an fp8 matmul. Layers here compute in bf16/fp16/fp32, so the scale is checked (one
finite value) and recorded as read, and the arithmetic is ComfyUI's own non-fp8-matmul path: weight x scale.

Only one number per tensor is this layout; a per-channel scale (one per output row) is another format, refused
by name rather than broadcast into something that merely runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError

MARKER = "scaled_fp8"
WEIGHT_SCALE_NAMES = ("scale_weight", "weight_scale")
INPUT_SCALE_NAMES = ("scale_input", "input_scale")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class LayerScale:
    """The per-tensor scales of one layer: file keys (with prefix) of its weight scale and input scale."""

    weight_scale: str
    input_scale: str | None = None


@dataclass
class ScaledLayout:
    """What a part of a file holds of the scaled-fp8 layout.

    ``layers`` maps module weight keys (``joint_blocks.0.x_block.attn.qkv.weight``) to their scales;
    ``marker`` is the full key of the ``scaled_fp8`` marker when the part has one.
    """

    marker: str | None = None
    layers: dict[str, LayerScale] = field(default_factory=dict)

    @property
    def scaled(self) -> bool:
        """Whether the part is in a scaled layout at all (a marker or any per-tensor scale)."""
        return self.marker is not None or bool(self.layers)

    def keys(self) -> set[str]:
        """Every file key this layout accounts for (marker and scales)."""
        out = {self.marker} if self.marker else set()
        for s in self.layers.values():
            out.add(s.weight_scale)
            if s.input_scale:
                out.add(s.input_scale)
        return out


def _leaf(key: str) -> tuple[str, str]:
    base, _, leaf = key.rpartition(".")
    return (base + "." if base else ""), leaf


def find_scales(file, prefix: str, key_map: Mapping[str, str] | None = None) -> ScaledLayout:
    """The scaled-fp8 marker and per-tensor scales under ``prefix`` in ``file``, checked against their weights.

    ``key_map`` renames file keys (prefix stripped) to module keys, as for ``load_weights``. Refused, naming
    the key: a scale without its weight, two scales for one weight, a scale of more than one value, a scale
    that is not a finite float, an input scale without a weight scale.
    """
    key_map = key_map or {}
    shapes = file.shapes(prefix)
    layout = ScaledLayout(marker=prefix + MARKER if MARKER in shapes else None)
    inputs: dict[str, str] = {}
    for key, shape in shapes.items():
        base, leaf = _leaf(key)
        if leaf not in WEIGHT_SCALE_NAMES and leaf not in INPUT_SCALE_NAMES:
            continue
        full = prefix + key
        weight_file_key = base + "weight"
        if weight_file_key not in shapes:
            raise file.error(f"'{prefix}{weight_file_key}' beside the per-tensor scale '{full}'; it is missing")
        _check_scale_shape(file, full, shape, shapes[weight_file_key])
        module_key = key_map.get(weight_file_key, weight_file_key)
        if leaf in INPUT_SCALE_NAMES:
            if module_key in inputs:
                raise file.error(f"one input scale for '{prefix}{weight_file_key}'; found '{inputs[module_key]}' "
                                 f"and '{full}'")
            inputs[module_key] = full
            continue
        if module_key in layout.layers:
            raise file.error(f"one weight scale for '{prefix}{weight_file_key}'; found "
                             f"'{layout.layers[module_key].weight_scale}' and '{full}'")
        layout.layers[module_key] = LayerScale(full)
    for module_key, key in inputs.items():
        if module_key not in layout.layers:
            raise file.error(f"a weight scale ({' or '.join(WEIGHT_SCALE_NAMES)}) beside the input scale '{key}'; "
                             "it is missing")
        layout.layers[module_key] = LayerScale(layout.layers[module_key].weight_scale, key)
    return layout


def _check_scale_shape(file, key: str, shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> None:
    if not file.dtype(key).is_floating_point:
        raise file.error(f"'{key}' as a floating-point per-tensor scale; it is {file.dtype(key)}")
    numel = 1
    for d in shape:
        numel *= d
    if numel == 1:
        return
    per_channel = bool(weight_shape) and numel == weight_shape[0]
    kind = "a per-channel scale (one value per output row)" if per_channel else "a scale of another shape"
    raise file.error(
        f"'{key}' as a per-tensor scale (one value, as ComfyUI's scaled fp8 stores it); it has shape {list(shape)}, "
        f"{kind}, which this loader does not read"
    )


def read_scale(file, key: str) -> torch.Tensor:
    """The scale ``key`` as a float32 scalar; a non-finite or non-positive scale is refused by name."""
    value = file.tensor(key).to(torch.float32).reshape(())
    if not bool(torch.isfinite(value)) or float(value) <= 0:
        raise file.error(f"'{key}' as a finite positive per-tensor scale; it is {float(value)}")
    return value.clone()


def check_fp8_weights_have_scales(file, prefix: str, layout: ScaledLayout, stored: Mapping[str, str],
                                  weight_keys: set[str]) -> None:
    """In a scaled part, every fp8-stored layer weight must carry its scale (ComfyUI would silently use 1).

    ``stored`` maps module keys to file keys; ``weight_keys`` are the module keys of layers that take a scale.
    """
    if not layout.scaled:
        return
    missing = [stored[k] for k in sorted(weight_keys) if k in stored and k not in layout.layers
               and file.dtype(stored[k]) in FP8_DTYPES]
    if missing:
        raise CheckpointError(
            f"{file.path}: expected a per-tensor scale ('{missing[0].removesuffix('weight')}scale_weight') for every "
            f"fp8 weight of this scaled-fp8 file; {len(missing)} fp8 weights have none (first: "
            f"{', '.join(repr(m) for m in missing[:3])})"
        )
