"""Checks of an API-format workflow against the server's ``/object_info``, made before anything is queued.

Every problem that would make ``/prompt`` refuse every row is reported at once, as a sentence naming the node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .object_info import InputSpec, ObjectInfo, input_specs, types_match
from .targets import Target
from .workflow import is_link, node_label, node_order


def validate(api: Mapping[str, Mapping[str, Any]], object_info: ObjectInfo,
             settable: Iterable[Target] = ()) -> list[str]:
    """Problems that would make ``/prompt`` refuse every row, as sentences (empty when none).

    Checks node types, links (source, slot, type), required inputs, choice values and numeric ranges. Inputs
    in ``settable`` are written per row, so their saved values are not checked (the server checks each row).
    """
    settable = set(settable)
    problems: list[str] = []
    has_output = False
    for nid in sorted(api, key=node_order):
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
    if not types_match(outputs[slot], spec.type):
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
