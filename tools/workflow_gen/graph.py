"""A workflow as nodes and links, written in ComfyUI's UI format (``workflows/*.json``) and API format
(``workflows/api/*.json``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .node_specs import FRONTEND_ONLY, NOT_SENT, node_spec
from .pack import load_pack

UUID_NAMESPACE = uuid.UUID("6f1d3c1e-5d35-4c8a-9a35-000000000035")  # stable workflow ids


@dataclass
class Node:
    """One node of a workflow: its place on the canvas, its widget values and its links."""

    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    values: dict
    title: str | None = None
    colors: dict | None = None
    links_in: dict = field(default_factory=dict)  # input name -> link id
    links_out: dict = field(default_factory=dict)  # output slot -> [link ids]


class Workflow:
    """Builds one workflow in both formats from nodes and connections."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, pos: tuple[float, float], size: tuple[float, float], /,
            title: str | None = None, colors: dict | None = None, **values) -> Node:
        """Add a ``node_type`` node at ``pos`` (the top-left of its body) with widget ``values``.

        A widget left out takes the node's default; one without a default must be given.
        """
        spec = node_spec(node_type)
        unknown = set(values) - set(spec.widgets)
        if unknown:
            raise ValueError(f"{node_type}: no widget named {', '.join(sorted(unknown))}")
        full = {w: values.get(w, spec.defaults.get(w)) for w in spec.widgets}
        missing = [w for w, v in full.items() if v is None]
        if missing:
            raise ValueError(f"{node_type}: give a value for {', '.join(missing)}")
        node = Node(len(self.nodes) + 1, node_type, tuple(pos), tuple(size), full, title, colors)
        self.nodes.append(node)
        return node

    def connect(self, source: Node, output: str, target: Node, input_name: str) -> None:
        """Link ``source``'s output named ``output`` to ``target``'s socket ``input_name``."""
        outputs = node_spec(source.type).outputs
        slot = [n for n, _ in outputs].index(output)
        kind = outputs[slot][1]
        link_id = len(self.links) + 1
        target_slot = [s[0] for s in node_spec(target.type).sockets].index(input_name)
        self.links.append([link_id, source.id, slot, target.id, target_slot, kind])
        target.links_in[input_name] = link_id
        source.links_out.setdefault(slot, []).append(link_id)

    def group(self, title: str, color: str, nodes: list[Node], pad: float = 20.0) -> None:
        """A group framing ``nodes``: a node's position is the top-left of its body, its title bar sits 30 px
        above that, and the group's own title takes about 36 px."""
        left = min(n.pos[0] for n in nodes) - pad
        top = min(n.pos[1] for n in nodes) - 30 - pad - 36
        right = max(n.pos[0] + n.size[0] for n in nodes) + pad
        bottom = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left,
                            bottom - top], "color": color, "font_size": 24, "flags": {}})

    # ---------------------------------------------------------------------------------------- formats

    def _order(self) -> dict[int, int]:
        """Execution order as the frontend saves it: a topological order, sources first."""
        incoming = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and incoming[n.id] <= done]
            for node_id in ready:
                order[node_id] = len(order)
                done.add(node_id)
        return order

    def ui(self) -> dict:
        """The workflow in the UI format (what the frontend saves and loads)."""
        order = self._order()
        nodes = []
        for n in self.nodes:
            spec = node_spec(n.type)
            inputs = []
            for name, kind, optional in spec.sockets:
                entry = {"name": name, "type": kind}
                if optional:
                    entry["shape"] = 7
                entry["link"] = n.links_in.get(name)
                inputs.append(entry)
            outputs = [{"name": name, "type": kind, "links": n.links_out.get(slot, []), "slot_index": slot}
                       for slot, (name, kind) in enumerate(spec.outputs)]
            entry = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                     "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs}
            if n.title:
                entry["title"] = n.title
            entry["properties"] = {} if n.type in FRONTEND_ONLY else {"Node name for S&R": n.type}
            entry["widgets_values"] = list(n.values.values())
            if n.colors:
                entry.update(n.colors)
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(UUID_NAMESPACE, self.name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": self._view()},
            "version": 0.4,
        }

    def _view(self, screen=(1450.0, 900.0), margin=(90.0, 90.0), min_scale=0.65) -> dict:
        """Canvas scale and offset that show the groups on a typical screen (the frontend's ``ds``).

        Never below ``min_scale``: under about 0.6 the frontend draws nodes without their text.
        """
        left = min(g["bounding"][0] for g in self.groups)
        top = min(g["bounding"][1] for g in self.groups)
        right = max(g["bounding"][0] + g["bounding"][2] for g in self.groups)
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in self.groups)
        scale = round(max(min_scale, min(1.0, screen[0] / (right - left), screen[1] / (bottom - top))), 3)
        return {"scale": scale, "offset": [round(margin[0] / scale - left, 1), round(margin[1] / scale - top, 1)]}

    def api(self) -> dict:
        """The workflow in the API format (the prompt the frontend sends to the server)."""
        prompt = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            inputs = {k: v for k, v in n.values.items() if k != "control_after_generate" and k not in NOT_SENT}
            for name, link_id in n.links_in.items():
                link = self.links[link_id - 1]
                inputs[name] = [str(link[1]), link[2]]
            default_title = load_pack().NODE_DISPLAY_NAME_MAPPINGS.get(n.type, n.type)
            prompt[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title or default_title}}
        return prompt
