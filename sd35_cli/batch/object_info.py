"""What a ComfyUI server's ``/object_info`` says about its node types, read as the batch client needs it.

``/object_info`` maps each node type to its inputs (``required`` / ``optional`` sections, each input a
``[type_or_choices, options]`` pair), its outputs and whether it is an output node. :class:`InputSpec` is one
input of that description; the UI -> API conversion, the checks and the per-row patching all read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ObjectInfo = Mapping[str, Mapping[str, Any]]

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


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


def types_match(out_type: Any, in_type: str) -> bool:
    """Whether an output of type ``out_type`` may feed an input of type ``in_type`` (ComfyUI's rule)."""
    if in_type == "COMBO":
        return True  # choice inputs take a primitive or COMBO output; the server checks the value
    if not isinstance(out_type, str):
        return True
    if "*" in (out_type, in_type) or out_type == in_type:
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))
