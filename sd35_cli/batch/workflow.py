"""Workflows for the batch client: load a workflow file (API or UI format) and convert UI to API.

API format is what ``/prompt`` takes: ``{node_id: {"class_type", "inputs", "_meta": {"title"}}}`` where an
input is either a value or a link ``[source_node_id, output_slot]``. UI format is what the graph editor
saves (``nodes``, ``links``, ``widgets_values``); it is converted with the server's ``/object_info`` the
way the frontend's ``graphToPrompt`` does it: muted and bypassed nodes leave the graph (a bypassed node
passes its matching input through), Reroute and Note nodes vanish, a PrimitiveNode's value lands in the
widget it drives, and ``widgets_values`` are matched to the node's widget inputs in declaration order
(seed-like inputs carry one extra "control after generate" value that is not an input).

The checks of a converted graph are in :mod:`.validation`; where the prompts file's columns go, and the
per-row patching, in :mod:`.targets`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import WorkflowError
from .object_info import WIDGET_TYPES, InputSpec, ObjectInfo, input_specs, types_match

ApiWorkflow = dict[str, dict[str, Any]]

# Frontend-only node types: never sent to the server.
VIRTUAL_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4


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


def node_order(node_id: str) -> tuple:
    """Sort key for node ids: numeric ids by value, then the others by name."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


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
    for nid in sorted(real, key=node_order):
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
    if slot < len(inputs) and types_match(inputs[slot].get("type"), str(want)) and \
            types_match(out_type, str(inputs[slot].get("type"))):
        return slot
    for i, inp in enumerate(inputs):
        if inp.get("type") == want:
            return i
    for i, inp in enumerate(inputs):
        if types_match(inp.get("type"), str(want)) and types_match(out_type, str(inp.get("type"))):
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

