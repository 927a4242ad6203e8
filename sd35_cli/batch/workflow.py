"""Workflows for the batch client: load (API or UI format), convert UI to API, check, and patch per row.

API format is what ``/prompt`` takes: ``{node_id: {"class_type", "inputs", "_meta": {"title"}}}`` where an
input is either a value or a link ``[source_node_id, output_slot]``. UI format is what the graph editor
saves (``nodes``, ``links``, ``widgets_values``); it is converted with the server's ``/object_info`` the
way the frontend's ``graphToPrompt`` does it: muted and bypassed nodes leave the graph (a bypassed node
passes its matching input through), Reroute and Note nodes vanish, a PrimitiveNode's value lands in the
widget it drives, and ``widgets_values`` are matched to the node's widget inputs in declaration order
(seed-like inputs carry one extra "control after generate" value that is not an input).

Columns of the prompts file reach node inputs through :class:`Target` lists: by default found from the
graph (the sampler's seed/steps/cfg/denoise, the text encoder on its positive and negative paths, the empty
latent's size (or the scale of an image-to-image input), the image loaders behind a ControlNet, an
image-to-image encode or an inpainting mask), or given explicitly as
``--map COLUMN=NodeTitle.input`` (a title, a node id, or a node type that occurs once).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import WorkflowError

ObjectInfo = Mapping[str, Mapping[str, Any]]
ApiWorkflow = dict[str, dict[str, Any]]

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Frontend-only node types: never sent to the server.
VIRTUAL_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

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


# --------------------------------------------------------------------------------------------- loading


def load_workflow(path: str) -> dict[str, Any]:
    """Read a workflow JSON file (either format); see :func:`workflow_format`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WorkflowError(f"workflow file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{os.path.basename(path)}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]  # a saved /prompt request body
    workflow_format(data, os.path.basename(path))
    return data


def workflow_format(data: Any, name: str = "workflow") -> str:
    """``"api"`` or ``"ui"``; raises :class:`WorkflowError` for anything else."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return "ui"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    raise WorkflowError(f"{name}: not a ComfyUI workflow (expected the API format, {{node_id: {{\"class_type\": "
                        f"..., \"inputs\": ...}}}}, or the editor's format with a \"nodes\" list)")


def is_link(value: Any) -> bool:
    """API-format link: ``[source_node_id, output_slot]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def node_label(node_id: str, node: Mapping[str, Any]) -> str:
    """``12 'Title' (ClassType)`` for messages."""
    title = (node.get("_meta") or {}).get("title")
    ct = node.get("class_type", "?")
    return f"{node_id} '{title}' ({ct})" if title and title != ct else f"{node_id} ({ct})"


def _node_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# --------------------------------------------------------------------------------------------- input specs


@dataclass(frozen=True)
class InputSpec:
    """One input of a node type as ``/object_info`` describes it."""

    name: str
    type: str  # "COMBO" for choice lists
    options: Mapping[str, Any]
    required: bool
    choices: tuple | None = None

    @property
    def is_widget(self) -> bool:
        """Whether the editor draws it as a widget (a value in ``widgets_values``) rather than a socket."""
        if self.options.get("forceInput") or self.options.get("defaultInput"):
            return False
        return self.type in WIDGET_TYPES

    @property
    def control_values(self) -> int:
        """Extra ``widgets_values`` entries after this widget: control-after-generate (plus its filter for
        combos) and the upload button of image inputs."""
        control = self.options.get("control_after_generate")
        if control is None and self.type == "INT" and self.name in ("seed", "noise_seed"):
            control = True  # the frontend's legacy convention
        upload = any(k.endswith("_upload") and v for k, v in self.options.items())  # an "upload" button value
        if not control:
            return int(upload)
        return (2 if self.type == "COMBO" else 1) + int(upload)


def input_specs(info: Mapping[str, Any]) -> dict[str, InputSpec]:
    """Required then optional inputs of a node type, in declaration order (hidden inputs excluded)."""
    specs: dict[str, InputSpec] = {}
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        entries = inputs.get(section) or {}
        names = [n for n in order.get(section, []) if n in entries] or list(entries)
        names += [n for n in entries if n not in names]
        for name in names:
            raw = entries[name]
            if not isinstance(raw, (list, tuple)) or not raw:
                continue
            typ, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            choices = None
            if isinstance(typ, (list, tuple)):
                choices, typ = tuple(typ), "COMBO"
            elif typ == "COMBO":
                choices = tuple(opts.get("options") or ())
            specs[name] = InputSpec(name, str(typ), opts, section == "required", choices)
    return specs


def _types_match(out_type: Any, in_type: str) -> bool:
    if in_type == "COMBO":
        return True  # choice inputs take a primitive or COMBO output; the server checks the value
    if not isinstance(out_type, str):
        return True
    if "*" in (out_type, in_type) or out_type == in_type:
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


# --------------------------------------------------------------------------------------------- UI -> API


def _links(ui: Mapping[str, Any]) -> dict[Any, tuple]:
    out: dict[Any, tuple] = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):  # schema version 1
            out[link["id"]] = (str(link["origin_id"]), link["origin_slot"], str(link["target_id"]),
                               link["target_slot"], link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:  # version 0.4
            out[link[0]] = (str(link[1]), link[2], str(link[3]), link[4], link[5] if len(link) > 5 else None)
    return out


def _reject_nested(ui: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> None:
    subgraphs = {s.get("id") for s in ((ui.get("definitions") or {}).get("subgraphs") or []) if isinstance(s, dict)}
    groups = set((ui.get("extra") or {}).get("groupNodes") or {})
    for nid, node in nodes.items():
        t = node.get("type")
        if t in subgraphs or (isinstance(t, str) and t.startswith("workflow>") and t.split(">", 1)[1] in groups):
            raise WorkflowError(f"node {nid} is a subgraph or group node; the batch client converts flat graphs "
                                "only: export the workflow in API format from ComfyUI (Workflow > Export (API))")


def _is_wired(node: Mapping[str, Any]) -> bool:
    if any(i.get("link") is not None for i in node.get("inputs") or []):
        return True
    return any(o.get("links") for o in node.get("outputs") or [])


def ui_to_api(ui: Mapping[str, Any], object_info: ObjectInfo) -> ApiWorkflow:
    """Convert an editor (UI-format) workflow to API format with the server's ``/object_info``."""
    nodes = {str(n["id"]): n for n in ui.get("nodes") or []}
    _reject_nested(ui, nodes)
    links = _links(ui)
    missing = []
    real: dict[str, Mapping[str, Any]] = {}
    for nid, node in nodes.items():
        t = node.get("type")
        if node.get("mode") in (MODE_NEVER, MODE_BYPASS) or t in VIRTUAL_TYPES:
            continue
        if t not in object_info:
            if _is_wired(node):
                missing.append(f"{nid} '{node.get('title') or t}' ({t})")
            continue  # an unwired frontend-only decoration (a custom note or label node)
        real[nid] = node
    if missing:
        raise WorkflowError("node types not installed on the server: " + ", ".join(missing))

    def resolve(link_id: Any, want: Any, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Where a link really comes from: ("link", [id, slot]), ("value", v) or None (nothing)."""
        if link_id in seen or link_id not in links:
            return None
        seen = seen | {link_id}
        origin, slot = links[link_id][0], links[link_id][1]
        src = nodes.get(origin)
        if src is None:
            return None
        if src.get("mode") == MODE_BYPASS:
            index = _bypass_input(src, slot, want)
            if index is None:
                return None
            return resolve(src["inputs"][index].get("link"), want, seen)
        t = src.get("type")
        if t == "PrimitiveNode":
            values = src.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if t in VIRTUAL_TYPES:  # Reroute: pass through its single input
            ins = src.get("inputs") or []
            return resolve(ins[0].get("link"), want, seen) if ins else None
        return ("link", [origin, int(slot)])

    api: ApiWorkflow = {}
    for nid in sorted(real, key=_node_order):
        node = real[nid]
        info = object_info[node["type"]]
        specs = input_specs(info)
        inputs: dict[str, Any] = {}
        for name, value in _widget_values(node, specs).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            name = slot.get("name") or (slot.get("widget") or {}).get("name")
            resolved = resolve(slot["link"], slot.get("type"))
            if resolved is None:
                continue
            kind, value = resolved
            inputs[name] = ({"__value__": value} if isinstance(value, list) else value) if kind == "value" else value
        title = node.get("title") or info.get("display_name") or node["type"]
        api[nid] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    for node in api.values():  # links to nodes that left the graph (muted) are dropped, as the frontend does
        for name in [n for n, v in node["inputs"].items() if is_link(v) and str(v[0]) not in api]:
            del node["inputs"][name]
    return api


def _bypass_input(node: Mapping[str, Any], slot: int, want: Any) -> int | None:
    """Input index a bypassed node passes to output ``slot`` (the frontend's rule: same slot, else same type)."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else None
    if want in ("*", "", None):
        return slot if slot < len(inputs) else (0 if inputs else None)
    if slot < len(inputs) and _types_match(inputs[slot].get("type"), str(want)) and \
            _types_match(out_type, str(inputs[slot].get("type"))):
        return slot
    for i, inp in enumerate(inputs):
        if inp.get("type") == want:
            return i
    for i, inp in enumerate(inputs):
        if _types_match(inp.get("type"), str(want)) and _types_match(out_type, str(inp.get("type"))):
            return i
    return None


def _widget_values(node: Mapping[str, Any], specs: Mapping[str, InputSpec]) -> dict[str, Any]:
    values = node.get("widgets_values")
    widgets = [s for s in specs.values() if s.is_widget]
    if isinstance(values, dict):
        return {s.name: values[s.name] for s in widgets if s.name in values}
    if not isinstance(values, list):
        return {}
    # Workflows saved before forceInput inputs lost their widget still hold a value for them (the
    # frontend's migrateWidgetsValues): drop those when the count says so.
    legacy = [s for s in specs.values() if s.type in WIDGET_TYPES]
    if len(legacy) != len(widgets) and sum(1 + s.control_values for s in legacy) == len(values):
        values = [v for s, v in zip(_expand(legacy), values, strict=False) if s is not None and s.is_widget]
        return {s.name: v for s, v in zip(widgets, values, strict=False)}
    out = {}
    i = 0
    for s in widgets:
        if i >= len(values):
            break
        out[s.name] = values[i]
        i += 1 + s.control_values
    return out


def _expand(specs: Sequence[InputSpec]) -> list[InputSpec | None]:
    out: list[InputSpec | None] = []
    for s in specs:
        out.append(s)
        out.extend([None] * s.control_values)
    return out


def to_api(data: Mapping[str, Any], object_info: ObjectInfo | None, name: str = "workflow") -> ApiWorkflow:
    """The API-format graph of ``data`` (converted from UI format when needed), with string node ids."""
    if workflow_format(data, name) == "ui":
        if object_info is None:
            raise WorkflowError(f"{name}: a UI-format workflow needs a server's /object_info to be converted")
        return ui_to_api(data, object_info)
    api: ApiWorkflow = {}
    for nid, node in data.items():
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{name}: node {nid}: \"inputs\" must be an object")
        api[str(nid)] = {**copy.deepcopy(node), "inputs": copy.deepcopy(node.get("inputs", {}))}
    return api


# --------------------------------------------------------------------------------------------- validation


def validate(api: Mapping[str, Mapping[str, Any]], object_info: ObjectInfo,
             settable: Iterable[Target] = ()) -> list[str]:
    """Problems that would make ``/prompt`` refuse every row, as sentences (empty when none).

    Checks node types, links (source, slot, type), required inputs, choice values and numeric ranges. Inputs
    in ``settable`` are written per row, so their saved values are not checked (the server checks each row).
    """
    settable = set(settable)
    problems: list[str] = []
    has_output = False
    for nid in sorted(api, key=_node_order):
        node = api[nid]
        label = node_label(nid, node)
        info = object_info.get(node.get("class_type"))
        if info is None:
            problems.append(f"node {label}: node type {node.get('class_type')!r} is not installed")
            continue
        has_output = has_output or bool(info.get("output_node"))
        inputs = node.get("inputs") or {}
        for name, spec in input_specs(info).items():
            if Target(nid, name) in settable:
                continue
            if name not in inputs:
                if spec.required:
                    problems.append(f"node {label}: required input {name!r} is missing")
                continue
            value = inputs[name]
            if is_link(value):
                problems.extend(_check_link(api, object_info, label, name, spec, value))
            else:
                problems.extend(_check_value(label, spec, value))
    if api and not has_output:
        problems.append("the workflow has no output node (such as Save Image): no image would come back")
    if not api:
        problems.append("the workflow has no nodes")
    return problems


def _check_link(api, object_info, label, name, spec: InputSpec, value) -> list[str]:
    src_id, slot = str(value[0]), value[1]
    src = api.get(src_id)
    if src is None:
        return [f"node {label}: input {name!r} is linked to node {src_id}, which is not in the workflow"]
    src_info = object_info.get(src.get("class_type"))
    if src_info is None:
        return []  # reported for the source node itself
    outputs = list(src_info.get("output") or [])
    if not 0 <= slot < len(outputs):
        return [f"node {label}: input {name!r} is linked to output {slot} of node {node_label(src_id, src)}, "
                f"which has {len(outputs)} outputs"]
    if not _types_match(outputs[slot], spec.type):
        return [f"node {label}: input {name!r} takes {spec.type} but is linked to a {outputs[slot]} output of node "
                f"{node_label(src_id, src)}"]
    return []


def _check_value(label: str, spec: InputSpec, value: Any) -> list[str]:
    if spec.type == "COMBO" and spec.choices is not None:
        if any(k.endswith("_upload") for k in spec.options):
            return []  # uploads may name files in sub-folders the list does not show
        if isinstance(value, dict) or value not in spec.choices:
            shown = ", ".join(map(str, spec.choices[:8])) + (", ..." if len(spec.choices) > 8 else "")
            return [f"node {label}: {spec.name} {value!r} is not available on the server "
                    f"(it offers: {shown or 'nothing'})"]
    elif spec.type in ("INT", "FLOAT") and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.options.get("min"), spec.options.get("max")
        if lo is not None and value < lo:
            return [f"node {label}: {spec.name} {value} is below the minimum {lo}"]
        if hi is not None and value > hi:
            return [f"node {label}: {spec.name} {value} is above the maximum {hi}"]
    return []


# --------------------------------------------------------------------------------------------- targets


def _trace(api: Mapping[str, Mapping[str, Any]], object_info: ObjectInfo | None, start: Any, follow: frozenset,
           stop: Iterable[str]) -> list[str]:
    """Nodes of the ``stop`` types found walking links upstream from link ``start``.

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
    return sorted(found, key=_node_order)


def samplers(api: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Ids of the sampler-like nodes (see :data:`SAMPLERS`)."""
    return sorted((nid for nid, n in api.items() if n.get("class_type") in SAMPLERS), key=_node_order)


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

    def upstream(role: str, follow: frozenset, stop: Iterable[str]) -> list[str]:
        found: list[str] = []
        for nid in sampler_ids:
            name = SAMPLERS[api[nid]["class_type"]].get(role)
            if name is not None:
                found += [f for f in _trace(api, object_info, api[nid]["inputs"].get(name), follow, stop)
                          if f not in found]
        return found

    if column in ("prompt", "negative"):
        role = "positive" if column == "prompt" else "negative"
        ids = upstream(role, frozenset({"CONDITIONING"}), TEXT_ENCODERS)
        return [Target(nid, name) for nid in ids for name in TEXT_ENCODERS[api[nid]["class_type"]]]
    if column in ("width", "height"):
        ids = upstream("latent", frozenset({"LATENT", "IMAGE"}), LATENT_SOURCES | IMAGE_SIZERS)
        return [Target(nid, column) for nid in ids]
    if column == "init_image":
        ids = upstream("latent", frozenset({"LATENT", "IMAGE"}), IMAGE_LOADERS)
        return [Target(nid, IMAGE_LOADERS[api[nid]["class_type"]]) for nid in ids]
    if column == "control_image":
        ids: list[str] = []
        for nid in sorted(api, key=_node_order):
            ct = api[nid].get("class_type")
            if ct in CONTROL_APPLIES:
                start = api[nid]["inputs"].get(CONTROL_APPLIES[ct])
                ids += [f for f in _trace(api, object_info, start, frozenset({"IMAGE"}), IMAGE_LOADERS) if f not in ids]
        return [Target(nid, IMAGE_LOADERS[api[nid]["class_type"]]) for nid in ids]
    if column == "mask_image":
        ids = []
        for nid in sorted(api, key=_node_order):
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
        return sorted(by_title, key=_node_order)
    if ref.lstrip("#") in api:
        return [ref.lstrip("#")]
    return sorted((nid for nid, n in api.items() if n.get("class_type") == ref), key=_node_order)


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
        if column in ("prompt", "negative", "control_image", "init_image", "mask_image", "width", "height"):
            nodes = sorted({t.node for t in found}, key=_node_order)
            if len(nodes) > 1:
                raise WorkflowError(f"column {column!r} could go to {len(nodes)} nodes ("
                                    + ", ".join(node_label(n, api[n]) for n in nodes)
                                    + f"); pick one with --map {column}=NodeTitle.input")
        targets[column] = found
    if "prompt" in targets and "negative" in targets:
        shared = {t.node for t in targets["prompt"]} & {t.node for t in targets["negative"]}
        if shared:
            n = sorted(shared, key=_node_order)[0]
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
