"""Where the prompts file's columns go in a workflow, and writing one row's values there.

Columns reach node inputs through :class:`Target` lists: by default found from the graph (the sampler's
seed/steps/cfg/denoise, the text encoder on its positive and negative paths, the empty latent's size (or the
scale of an image-to-image input), the image loaders behind a ControlNet, an image-to-image encode or an
inpainting mask), or given explicitly as ``--map COLUMN=NodeTitle.input`` (a title, a node id, or a node type
that occurs once). :func:`apply_settings` then writes a row's values, converted to each input's type.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import WorkflowError
from .object_info import InputSpec, ObjectInfo, input_specs
from .workflow import ApiWorkflow, is_link, node_label, node_order

# Sampler-like node types: column -> input name. Columns set every sampler of the workflow.
SAMPLERS: dict[str, dict[str, str]] = {
    "SD35Sampler": {"seed": "seed", "steps": "steps", "cfg": "cfg", "denoise": "denoise",
                    "positive": "positive", "negative": "negative", "latent": "latent"},
    "KSampler": {"seed": "seed", "steps": "steps", "cfg": "cfg", "denoise": "denoise",
                 "positive": "positive", "negative": "negative", "latent": "latent_image"},
    "KSamplerAdvanced": {"seed": "noise_seed", "steps": "steps", "cfg": "cfg",
                         "positive": "positive", "negative": "negative", "latent": "latent_image"},
    "SamplerCustom": {"seed": "noise_seed", "cfg": "cfg", "positive": "positive", "negative": "negative",
                      "latent": "latent_image"},
    "RandomNoise": {"seed": "noise_seed"},
}
SAMPLER_COLUMNS = ("seed", "steps", "cfg", "denoise")
TEXT_ENCODERS: dict[str, tuple[str, ...]] = {
    "SD35TextEncode": ("text",),
    "CLIPTextEncode": ("text",),
    "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl"),
}
# Regional conditioning: a prompt placed by one of these is not "the" prompt, so the prompt columns stop there.
REGION_NODES = frozenset({"ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetMask"})
LATENT_SOURCES = frozenset({"SD35EmptyLatent", "EmptySD3LatentImage", "EmptyLatentImage"})
IMAGE_SIZERS = frozenset({"ImageScale"})  # image-to-image: the size the input image is scaled to
IMAGE_LOADERS: dict[str, str] = {"LoadImage": "image"}
MASK_LOADERS: dict[str, str] = {"LoadImage": "image", "LoadImageMask": "image"}
# Nodes that take an inpainting mask: type -> the MASK input.
MASK_CONSUMERS: dict[str, str] = {
    "SD35VAEEncodeForInpaint": "mask",
    "VAEEncodeForInpaint": "mask",
    "SetLatentNoiseMask": "mask",
    "InpaintModelConditioning": "mask",
}
# CFG patches on the MODEL: column -> (node type, input). ComfyUI's APG node (sd35 generate's --apg_*).
CFG_PATCHES: dict[str, tuple[str, str]] = {"apg_eta": ("APG", "eta"), "apg_norm_threshold": ("APG", "norm_threshold"),
                                           "apg_momentum": ("APG", "momentum")}
# IP-Adapter applications: type -> (the picture's IMAGE input, the weight input).
IP_APPLIES: dict[str, tuple[str, str]] = {"SD35ApplyIPAdapter": ("image", "weight")}
CONTROL_APPLIES: dict[str, str] = {
    "SD35ControlNetApply": "image",
    "ControlNetApplySD3": "image",
    "ControlNetApplyAdvanced": "image",
    "ControlNetApply": "image",
}


@dataclass(frozen=True)
class Target:
    """One node input a column writes to."""

    node: str
    input: str


# --------------------------------------------------------------------------------------------- targets


def _trace(api: Mapping[str, Mapping[str, Any]], object_info: ObjectInfo | None, start: Any, follow: frozenset,
           stop: Iterable[str], avoid: frozenset = frozenset()) -> list[str]:
    """Nodes of the ``stop`` types found walking links upstream from link ``start`` (never through ``avoid`` types).

    Only inputs whose type is in ``follow`` are walked (all links when the types are unknown). A node with as
    many outputs of a followed type as inputs of that type (positive/negative pairs such as ControlNet apply)
    maps output ``i`` to its ``i``-th such input, so the positive path never strays onto the negative one.
    """
    stop = set(stop)
    found: list[str] = []
    seen: set[tuple[str, int]] = set()
    stack = [(str(start[0]), start[1])] if is_link(start) else []
    while stack:
        nid, slot = stack.pop()
        if (nid, slot) in seen or nid not in api:
            continue
        seen.add((nid, slot))
        node = api[nid]
        ct = node.get("class_type")
        if ct in avoid:
            continue
        if ct in stop:
            if nid not in found:
                found.append(nid)
            continue
        inputs = node.get("inputs") or {}
        info = (object_info or {}).get(ct)
        if info is None:
            stack.extend((str(v[0]), v[1]) for v in inputs.values() if is_link(v))
            continue
        specs = input_specs(info)
        outputs = list(info.get("output") or [])
        names = [n for n, s in specs.items() if s.type in follow]
        out_type = outputs[slot] if 0 <= slot < len(outputs) else None
        same = [i for i, t in enumerate(outputs) if t == out_type]
        paired = [n for n in names if specs[n].type == out_type]
        if out_type in follow and len(same) > 1 and len(same) == len(paired):
            names = [paired[same.index(slot)]]
        stack.extend((str(inputs[n][0]), inputs[n][1]) for n in names if is_link(inputs.get(n)))
    return sorted(found, key=node_order)


def samplers(api: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Ids of the sampler-like nodes (see :data:`SAMPLERS`)."""
    return sorted((nid for nid, n in api.items() if n.get("class_type") in SAMPLERS), key=node_order)


def default_targets(api: Mapping[str, Mapping[str, Any]], column: str,
                    object_info: ObjectInfo | None = None) -> list[Target]:
    """Where ``column`` goes when no ``--map`` says otherwise (empty when the graph has no obvious place)."""
    sampler_ids = samplers(api)
    if column in SAMPLER_COLUMNS:
        out = []
        for nid in sampler_ids:
            name = SAMPLERS[api[nid]["class_type"]].get(column)
            if name is not None:
                out.append(Target(nid, name))
        return out

    def upstream(role: str, follow: frozenset, stop: Iterable[str], avoid: frozenset = frozenset()) -> list[str]:
        found: list[str] = []
        for nid in sampler_ids:
            name = SAMPLERS[api[nid]["class_type"]].get(role)
            if name is not None:
                found += [f for f in _trace(api, object_info, api[nid]["inputs"].get(name), follow, stop, avoid)
                          if f not in found]
        return found

    if column in ("prompt", "negative"):
        role = "positive" if column == "prompt" else "negative"
        ids = upstream(role, frozenset({"CONDITIONING"}), TEXT_ENCODERS, REGION_NODES)
        return [Target(nid, name) for nid in ids for name in TEXT_ENCODERS[api[nid]["class_type"]]]
    if column in ("width", "height"):
        ids = upstream("latent", frozenset({"LATENT", "IMAGE"}), LATENT_SOURCES | IMAGE_SIZERS)
        return [Target(nid, column) for nid in ids]
    if column == "init_image":
        ids = upstream("latent", frozenset({"LATENT", "IMAGE"}), IMAGE_LOADERS)
        return [Target(nid, IMAGE_LOADERS[api[nid]["class_type"]]) for nid in ids]
    if column == "control_image":
        ids: list[str] = []
        for nid in sorted(api, key=node_order):
            ct = api[nid].get("class_type")
            if ct in CONTROL_APPLIES:
                start = api[nid]["inputs"].get(CONTROL_APPLIES[ct])
                ids += [f for f in _trace(api, object_info, start, frozenset({"IMAGE"}), IMAGE_LOADERS) if f not in ids]
        return [Target(nid, IMAGE_LOADERS[api[nid]["class_type"]]) for nid in ids]
    if column in CFG_PATCHES:
        node_type, name = CFG_PATCHES[column]
        return [Target(nid, name) for nid in sorted(api, key=node_order) if api[nid].get("class_type") == node_type]
    if column in ("ip_image", "ip_scale"):
        applies = [nid for nid in sorted(api, key=node_order) if api[nid].get("class_type") in IP_APPLIES]
        if column == "ip_scale":
            return [Target(nid, IP_APPLIES[api[nid]["class_type"]][1]) for nid in applies]
        ids = []
        for nid in applies:
            start = api[nid]["inputs"].get(IP_APPLIES[api[nid]["class_type"]][0])
            ids += [f for f in _trace(api, object_info, start, frozenset({"IMAGE"}), IMAGE_LOADERS) if f not in ids]
        return [Target(nid, IMAGE_LOADERS[api[nid]["class_type"]]) for nid in ids]
    if column == "mask_image":
        ids = []
        for nid in sorted(api, key=node_order):
            ct = api[nid].get("class_type")
            if ct in MASK_CONSUMERS:
                start = api[nid]["inputs"].get(MASK_CONSUMERS[ct])
                ids += [f for f in _trace(api, object_info, start, frozenset({"MASK", "IMAGE"}), MASK_LOADERS)
                        if f not in ids]
        return [Target(nid, MASK_LOADERS[api[nid]["class_type"]]) for nid in ids]
    return []


def parse_map(spec: str) -> tuple[str, str, str]:
    """``COLUMN=NodeTitle.input`` -> (column, node reference, input name)."""
    from .rows import normalize_column

    column, sep, target = spec.partition("=")
    node, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not column.strip() or not node or not name:
        raise WorkflowError(f"--map {spec!r}: expected COLUMN=NodeTitle.input (e.g. style=Style Prompt.text)")
    return normalize_column(column), node.strip(), name.strip()


def find_nodes(api: Mapping[str, Mapping[str, Any]], ref: str) -> list[str]:
    """Nodes ``ref`` names: by title (exact, then ignoring case), else node id (``12`` or ``#12``), else type."""
    by_title = [nid for nid, n in api.items() if (n.get("_meta") or {}).get("title") == ref]
    if not by_title:
        low = ref.lower()
        by_title = [nid for nid, n in api.items() if str((n.get("_meta") or {}).get("title", "")).lower() == low]
    if by_title:
        return sorted(by_title, key=node_order)
    if ref.lstrip("#") in api:
        return [ref.lstrip("#")]
    return sorted((nid for nid, n in api.items() if n.get("class_type") == ref), key=node_order)


def resolve_targets(api: Mapping[str, Mapping[str, Any]], columns: Sequence[str], maps: Sequence[str] = (),
                    object_info: ObjectInfo | None = None) -> dict[str, list[Target]]:
    """Targets of every used column: ``--map`` entries first (several for one column write to all), then defaults.

    Raises :class:`WorkflowError` naming the column when it has nowhere to go, when the default is ambiguous
    in a way that would silently do the wrong thing, or when a target input is fed by a link.
    """
    targets: dict[str, list[Target]] = {}
    for spec in maps:
        column, ref, name = parse_map(spec)
        ids = find_nodes(api, ref)
        if not ids:
            titles = sorted({str((n.get("_meta") or {}).get("title")) for n in api.values() if n.get("_meta")})
            raise WorkflowError(f"--map {spec!r}: no node titled {ref!r} (nor a node id or type of that name); "
                                f"titles in the workflow: {', '.join(titles) or 'none'}")
        if len(ids) > 1:
            raise WorkflowError(f"--map {spec!r}: {len(ids)} nodes match {ref!r} ("
                                + ", ".join(node_label(i, api[i]) for i in ids) + "); use a node id instead")
        targets.setdefault(column, []).append(Target(ids[0], name))
    for column in columns:
        if column in targets:
            continue
        found = default_targets(api, column, object_info)
        if not found:
            raise WorkflowError(f"column {column!r} has no place in this workflow; say where it goes with "
                                f"--map {column}=NodeTitle.input")
        if column in ("prompt", "negative", "control_image", "init_image", "mask_image", "width", "height",
                      "ip_image", "ip_scale"):
            nodes = sorted({t.node for t in found}, key=node_order)
            if len(nodes) > 1:
                raise WorkflowError(f"column {column!r} could go to {len(nodes)} nodes ("
                                    + ", ".join(node_label(n, api[n]) for n in nodes)
                                    + f"); pick one with --map {column}=NodeTitle.input")
        targets[column] = found
    if "prompt" in targets and "negative" in targets:
        shared = {t.node for t in targets["prompt"]} & {t.node for t in targets["negative"]}
        if shared:
            n = sorted(shared, key=node_order)[0]
            raise WorkflowError(f"the prompt and the negative prompt would both be written to node "
                                f"{node_label(n, api[n])}; map them with --map")
    for column, ts in targets.items():
        for t in ts:
            node = api[t.node]
            info = (object_info or {}).get(node.get("class_type"))
            if info is not None and t.input not in input_specs(info):
                names = ", ".join(input_specs(info))
                raise WorkflowError(f"column {column!r}: node {node_label(t.node, node)} has no input {t.input!r} "
                                    f"(its inputs: {names})")
            if is_link(node.get("inputs", {}).get(t.input)):
                src = str(node["inputs"][t.input][0])
                raise WorkflowError(f"column {column!r}: input {t.input!r} of node {node_label(t.node, node)} is "
                                    f"fed by node {node_label(src, api[src]) if src in api else src}, so a value "
                                    "cannot be set there")
    return targets


def describe_targets(api: Mapping[str, Mapping[str, Any]], targets: Mapping[str, Sequence[Target]]) -> list[str]:
    """``column -> 12 'Title' (Type).input`` lines, for ``--dry-run`` and the log."""
    return [f"{column} -> " + ", ".join(f"{node_label(t.node, api[t.node])}.{t.input}" for t in ts)
            for column, ts in targets.items()]


# --------------------------------------------------------------------------------------------- patching


def coerce(value: Any, spec: InputSpec | None, current: Any = None) -> Any:
    """``value`` converted to what the input takes (CSV cells arrive as text)."""
    kind = spec.type if spec is not None else None
    if kind is None:
        kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}.get(type(current))
    if kind == "INT":
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, str):
            value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected a whole number, got {value!r}")
            value = int(value)
        return int(value)
    if kind == "FLOAT":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if kind == "BOOLEAN":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        return bool(value)
    if kind in ("STRING", "COMBO"):
        if kind == "COMBO" and spec is not None and spec.choices and value not in spec.choices:
            for choice in spec.choices:  # a CSV cell "7" for a numeric choice list
                if str(choice) == str(value):
                    return choice
        return value if isinstance(value, str) else str(value)
    return value


def apply_settings(api: Mapping[str, Mapping[str, Any]], targets: Mapping[str, Sequence[Target]],
                   settings: Mapping[str, Any], object_info: ObjectInfo | None = None) -> ApiWorkflow:
    """A copy of ``api`` with each setting written to its column's targets.

    Raises ``ValueError`` naming the column and node when a value does not fit the input.
    """
    out = copy.deepcopy(dict(api))
    for column, value in settings.items():
        for t in targets.get(column, ()):
            node = out[t.node]
            info = (object_info or {}).get(node.get("class_type"))
            spec = input_specs(info).get(t.input) if info is not None else None
            try:
                node.setdefault("inputs", {})[t.input] = coerce(value, spec, node.get("inputs", {}).get(t.input))
            except (TypeError, ValueError) as e:
                raise ValueError(f"column {column!r} -> node {node_label(t.node, node)}.{t.input}: {e}") from None
    return out
