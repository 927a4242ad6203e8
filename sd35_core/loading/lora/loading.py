"""Reading a LoRA / LyCORIS file and resolving it against a model's key map.

A file is read once into :class:`LoraFile` (its tensors grouped by module name, whatever the trainer).
:func:`resolve` turns it into :class:`LoraPatches` for one model: ``{our parameter key: ((target, patch),
...)}``, checking every shape. Nothing here touches the model's weights; :mod:`.apply` does that.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ...errors import CheckpointError
from ..checkpoint import open_safetensors
from .formats import IGNORABLE, Target, family
from .patches import Diff, LoHa, LoKr, LowRank, Patch, SetWeight

log = logging.getLogger(__name__)

# Key suffix -> role, longest first so ".lora_A.weight" wins over ".lora_A".
SUFFIXES = sorted({
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
    "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_B": "up", ".lora_A": "down",
    ".alpha": "alpha", ".dora_scale": "dora",
    ".lora_magnitude_vector.weight": "dora", ".lora_magnitude_vector": "dora",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b", ".w_norm": "diff", ".b_norm": "diff_b", ".set_weight": "set",
}.items(), key=lambda kv: -len(kv[0]))


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model; the message names the file and why."""


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's tensors grouped by module name: ``{name: {role: tensor}}``."""

    path: str
    groups: dict[str, dict[str, torch.Tensor]]
    unknown: tuple[str, ...]  # keys with no LoRA suffix at all
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a ``.safetensors`` LoRA / LyCORIS file (any trainer's key layout) into memory."""
    file = open_safetensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key in file.keys():
        for suffix, role in SUFFIXES:
            if key.endswith(suffix) and len(key) > len(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = file.tensor(key)
                break
        else:
            unknown.append(key)
    if not groups:
        raise LoraError(f"{file.path}: expected a LoRA file (keys ending in .lora_down.weight, .lora_A.weight, "
                        f".hada_w1_a, .lokr_w1, .diff ...); none of its {len(file.keys())} keys is one"
                        + _foreign_hint(file.keys()))
    return LoraFile(file.path, groups, tuple(unknown), dict(file.metadata))


UNSUPPORTED_KINDS = {".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R.weight": "OFT", ".boft_blocks": "BOFT",
                     ".a1.weight": "GLoRA", ".b1.weight": "GLoRA"}


def _foreign_kind(names) -> str:
    """What a file that is no SD3 LoRA is, as a phrase ("it is ...", "it looks like ..."), or ``""``."""
    names = list(names)
    kinds = sorted({kind for n in names for suffix, kind in UNSUPPORTED_KINDS.items() if n.endswith(suffix)})
    if kinds:
        return f"it is a LyCORIS {'/'.join(kinds)} file, which this pack does not apply (LoRA, LoHa, LoKr, DoRA do)"
    if any("input_blocks" in n or "down_blocks" in n or "lora_unet_down" in n or "lora_unet_up" in n for n in names):
        return "it looks like an SD1.x/SDXL (UNet) LoRA"
    if any("double_blocks" in n or "single_blocks" in n or "single_transformer_blocks" in n for n in names):
        return "it looks like a Flux LoRA"
    return ""


def _foreign_hint(names) -> str:
    kind = _foreign_kind(names)
    return f"; {kind}" if kind else ""


def _diffusers_alpha(metadata: Mapping[str, str], name: str) -> tuple[float, bool] | None:
    """``(lora_alpha, use_rslora)`` diffusers wrote into the file's metadata for ``name``'s component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    component = name.split(".", 1)[0]
    alpha = meta.get(f"{component}.lora_alpha")
    if alpha is None:
        return None
    short = name.split(".", 1)[-1]
    for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
        if short == pattern or short.endswith("." + pattern):
            alpha = value
    return float(alpha), bool(meta.get(f"{component}.use_rslora", False))


def _scale(alpha: torch.Tensor | None, rank: int | None, name: str, metadata) -> float:
    if rank is None:
        return 1.0
    if alpha is not None:
        return float(alpha.float().item()) / rank
    meta = _diffusers_alpha(metadata, name)
    if meta is not None:
        value, rslora = meta
        return value / (rank**0.5 if rslora else rank)
    return 1.0


def build_patch(name: str, group: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Patch | None:
    """The weight patch a group of tensors describes (``None`` for a bias-only group)."""
    g = group
    alpha, dora = g.get("alpha"), g.get("dora")
    if "up" in g and "down" in g:
        return LowRank(g["up"], g["down"], _scale(alpha, g["down"].shape[0], name, metadata), g.get("mid"), dora)
    if "hada_w1_a" in g:
        return LoHa(g["hada_w1_a"], g["hada_w1_b"], g["hada_w2_a"], g["hada_w2_b"],
                    _scale(alpha, g["hada_w1_b"].shape[0], name, metadata), g.get("hada_t1"), g.get("hada_t2"), dora)
    if any(k.startswith("lokr_") for k in g):
        rank = None
        if "lokr_w1_b" in g:
            rank = g["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in g:
            rank = g["lokr_w2_b"].shape[0]
        return LoKr(g.get("lokr_w1"), g.get("lokr_w1_a"), g.get("lokr_w1_b"), g.get("lokr_w2"), g.get("lokr_w2_a"),
                    g.get("lokr_w2_b"), g.get("lokr_t2"), _scale(alpha, rank, name, metadata), dora)
    if "diff" in g:
        return Diff(g["diff"])
    if "set" in g:
        return SetWeight(g["set"])
    return None


@dataclass(frozen=True)
class LoraPatches:
    """One LoRA file resolved for one model: ``{parameter key: ((target, patch), ...)}``."""

    source: str
    patches: dict[str, tuple[tuple[Target, Patch], ...]]
    formats: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.patches)


def _check_shape(lora: LoraFile, name: str, patch: Patch, target: Target, shape: tuple[int, ...], key: str) -> None:
    rows = target.rows[1] if target.rows else shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    if tuple(patch.shape) != (rows, cols):
        raise LoraError(
            f"{lora.path}: '{name}' is a {patch.shape[0]}x{patch.shape[1]} update, but this model's '{key}' "
            f"needs {rows}x{cols}: the LoRA was trained for another model size (e.g. SD3.5 Large, width 2432, "
            "vs SD3.5 Medium / SD3 Medium, width 1536)"
        )


@dataclass
class Resolution:
    """What :func:`resolve` matched: patches per parameter, and the group names it used."""

    patches: dict[str, list[tuple[Target, Patch]]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    formats: set[str] = field(default_factory=set)


def resolve(lora: LoraFile, key_map: Mapping[str, Target], shapes: Mapping[str, tuple[int, ...]]) -> Resolution:
    """Match ``lora``'s groups against ``key_map`` (names -> targets) for a module with parameter ``shapes``."""
    res = Resolution()
    for name, group in lora.groups.items():
        target = key_map.get(name)
        if target is None:
            continue
        weight_patch = build_patch(name, group, lora.metadata)
        entries = []
        if weight_patch is not None:
            entries.append((target, weight_patch))
        if "diff_b" in group:
            entries.append((Target(target.bias_key, target.rows, target.swap_halves), Diff(group["diff_b"])))
        for t, patch in entries:
            if t.key not in shapes:
                raise LoraError(f"{lora.path}: '{name}' patches '{t.key}', which this model does not have")
            _check_shape(lora, name, patch, t, shapes[t.key], t.key)
            res.patches.setdefault(t.key, []).append((t, patch))
        if entries:
            res.used.add(name)
            res.formats.add(family(name))
    return res


def describe_unmatched(lora: LoraFile, used: set[str]) -> list[str]:
    """Group names (and unknown keys) of ``lora`` that nothing used, except known-harmless ones."""
    left = [n for n in lora.groups if n not in used and n not in IGNORABLE]
    return sorted(left) + list(lora.unknown)


def unknown_hint(lora: LoraFile) -> str:
    """What the keys without a LoRA suffix are, when they are a kind this pack does not apply."""
    return _foreign_hint(lora.unknown)


def what_it_looks_like(lora: LoraFile) -> str:
    """A guess for a file that matched nothing, as a phrase: another architecture, or another SD3 size."""
    kind = _foreign_kind(lora.groups)
    if kind:
        return kind
    names = list(lora.groups)
    if any("joint_blocks" in n or "transformer_blocks" in n for n in names):
        return ("it looks like an SD3-family LoRA for another model size or layout (e.g. SD3.5 Medium's attn2 layers "
                "on Large)")
    return f"it has no SD3 layout (first keys: {', '.join(names[:3])})"


TEXT_NAME_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "clip_l.", "clip_g.", "t5xxl.")


def _freeze(res: Resolution, source: str) -> LoraPatches:
    return LoraPatches(source, {k: tuple(v) for k, v in res.patches.items()}, tuple(sorted(res.formats)))


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Logical parameter shapes: a GGUF-quantized weight holds raw bytes, its format knows the real shape."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    for name, layer in module.named_modules():
        quant = getattr(layer, "weight_quant", None)
        if quant is not None:
            shapes[f"{name}.weight" if name else "weight"] = tuple(quant.shape)
    return shapes


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file resolved for a diffusion model and/or text encoders (``None`` where not given)."""

    model: LoraPatches | None
    clip: LoraPatches | None


def load_lora(
    lora: LoraFile | str | os.PathLike,
    mmdit: torch.nn.Module | None = None,
    text_encoders: torch.nn.Module | None = None,
) -> LoadedLora:
    """Resolve a LoRA file for ``mmdit`` (an :class:`~..mmditx.MMDiTX`) and ``text_encoders`` (a module
    holding ``clip_l`` / ``clip_g`` / ``t5xxl`` children), with the errors and warnings users need:

    * nothing matches -> :class:`LoraError` saying what the file looks like (SDXL, Flux, another SD3 size);
    * a shape mismatch (a Large LoRA on Medium) -> :class:`LoraError`;
    * some modules match nothing -> one warning with their count and the first names;
    * text-encoder modules without text encoders to patch -> one info line.
    """
    from .formats import mmdit_key_map, text_key_map

    if not isinstance(lora, LoraFile):
        lora = read_lora(lora)
    model_res = text_res = None
    used: set[str] = set()
    if mmdit is not None:
        shapes = _shapes(mmdit)
        model_res = resolve(lora, mmdit_key_map(mmdit.config, shapes), shapes)
        used |= model_res.used
    if text_encoders is not None:
        shapes = _shapes(text_encoders)
        children = {name: child for name, child in text_encoders.named_children()}
        text_res = resolve(lora, text_key_map(children), shapes)
        used |= text_res.used
    left = describe_unmatched(lora, used)
    skipped_text = [n for n in left if text_encoders is None and n.startswith(TEXT_NAME_PREFIXES)]
    left = [n for n in left if n not in skipped_text]
    if not used and not skipped_text:
        raise LoraError(f"{lora.path}: none of its {len(lora.groups)} LoRA modules matches this SD3/SD3.5 model; "
                        f"{what_it_looks_like(lora)}")
    if skipped_text:
        log.info("%s: %d text-encoder LoRA modules not applied (no clip connected)", lora.name, len(skipped_text))
    if left:
        log.warning("%s: %d of %d LoRA modules match nothing in this model and are ignored: %s%s%s", lora.name,
                    len(left), len(lora.groups) + len(lora.unknown), ", ".join(left[:5]),
                    " ..." if len(left) > 5 else "", unknown_hint(lora))
    return LoadedLora(
        _freeze(model_res, lora.path) if model_res is not None and model_res.patches else None,
        _freeze(text_res, lora.path) if text_res is not None and text_res.patches else None,
    )
