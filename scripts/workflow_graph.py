"""A small graph DSL for ComfyUI editor workflows (UI format, schema 0.4).

A workflow is described compactly: ``g.node(type, column, **inputs)`` where an input is either a widget value
or another node's output (``loader["MODEL"]``). Slot order, widget order, link types and defaults come from
ComfyUI's own node definitions (``/object_info``), so a rendered file matches what the editor would save.
Nodes are laid out left to right in columns. ``scripts/workflow_definitions.py`` uses it to describe the
shipped examples; ``scripts/build_workflows.py`` writes them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from workflows import input_specs, socket_inputs, ui_only_values, widget_layout

PACK_CNR_ID, CORE_CNR_ID = "diffusion-merge", "comfy-core"  # registry ids the editor uses to find missing packs

COLUMN_GAP, ROW_GAP, MARGIN = 80, 50, 40
NODE_WIDTH, TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT = 315, 30, 20, 24, 110


# -- graph description --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One output slot of a node in the graph being built."""

    node_id: int
    slot: int
    type: str


_DEFAULT = object()


@dataclass
class Node:
    """A node being built; index it to get an output (``loader["MODEL"]`` or ``loader[0]``)."""

    id: int
    type: str
    column: int
    inputs: dict[str, Any]
    title: str | None = None
    size: tuple[int, int] | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    widgets_values: list[Any] = field(default_factory=list)

    outputs: list[Output] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def __getitem__(self, key: int | str) -> Output:
        """An output by slot index or by name (``loader["CLIP"]``)."""
        if isinstance(key, str):
            if key not in self.output_names:
                raise KeyError(f"{self.type} has no output '{key}' (outputs: {self.output_names})")
            key = self.output_names.index(key)
        return self.outputs[key]


@dataclass
class Note:
    """A sticky-text Note (editor only), placed at the top of its column."""

    id: int
    text: str
    size: tuple[int, int]
    column: int


class Graph:
    """Collects nodes and links, then renders a UI-format workflow."""

    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[Node] = []
        self.notes: list[Note] = []

    def _next_id(self) -> int:
        return len(self.nodes) + len(self.notes) + 1

    def node(
        self, type_: str, column: int, *, title: str | None = None, size=None, properties=None, **inputs: Any
    ) -> Node:
        """Add a node; keyword arguments are its inputs (widget values or ``Output`` links); ``properties`` are
        saved with it (settings of the pack's canvas widgets, never widget values)."""
        if type_ not in self.object_info:
            raise KeyError(f"unknown node type {type_}")
        info = self.object_info[type_]
        known = {name for name, _, _ in input_specs(info)}
        if unknown := set(inputs) - known:
            raise KeyError(f"{type_} has no input(s) {sorted(unknown)}; inputs: {sorted(known)}")
        for name, _, optional in socket_inputs(info):
            if not optional and not isinstance(inputs.get(name), Output):
                raise ValueError(f"{type_}: required input '{name}' must be linked")
        node = Node(self._next_id(), type_, column, inputs, title, size, dict(properties or {}))
        node.widgets_values = self._widget_values(info, inputs)
        node.output_names = list(info.get("output_name") or info["output"])
        node.outputs = [Output(node.id, i, kind) for i, kind in enumerate(info["output"])]
        self.nodes.append(node)
        return node

    def note(self, text: str, column: int = 0, size: tuple[int, int] = (380, 300)) -> None:
        """Add a Note (sticky text) at the top of a column."""
        self.notes.append(Note(self._next_id(), text, size, column))

    @staticmethod
    def _widget_values(info: dict, inputs: dict[str, Any]) -> list[Any]:
        """``widgets_values``: each widget's value (its default when linked or not given), then the
        UI-only values the editor stores after it."""
        specs = {name: (kind, opts) for name, kind, opts in input_specs(info)}
        values: list[Any] = []
        for name, _ in widget_layout(info):
            kind, opts = specs[name]
            value = inputs.get(name, _DEFAULT)
            values.append(default_value(kind, opts) if value is _DEFAULT or isinstance(value, Output) else value)
            values += ui_only_values(name, kind, opts)
        return values


def default_value(kind: str, options: dict) -> Any:
    """The value the editor gives a fresh widget."""
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = options.get("options") or []
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


# -- rendering ----------------------------------------------------------------------------------------


def render(graph: Graph, name: str) -> dict:
    """The UI-format (schema 0.4) workflow of a graph."""
    links, ui_nodes = [], {}
    for node in graph.nodes:
        ui_nodes[node.id] = _ui_node(graph, node)
    for node in graph.nodes:
        for input_name, value in node.inputs.items():
            if isinstance(value, Output):
                link_id = len(links) + 1
                target_slot = _attach_input(ui_nodes[node.id], graph.object_info[node.type], input_name, link_id)
                links.append([link_id, value.node_id, value.slot, node.id, target_slot, value.type])
                ui_nodes[value.node_id]["outputs"][value.slot]["links"].append(link_id)
    for note in graph.notes:
        ui_nodes[note.id] = _ui_note(note)
    _layout(graph, ui_nodes)
    _set_order(ui_nodes, links)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/diffusion-merge/diffusion-merge/{name}")),
        "revision": 0,
        "last_node_id": max(ui_nodes),
        "last_link_id": len(links),
        "nodes": [ui_nodes[i] for i in sorted(ui_nodes)],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}},
        "version": 0.4,
    }


def _ui_node(graph: Graph, node: Node) -> dict:
    """A node as the editor saves it, with its links still empty (``render`` fills them in)."""
    info = graph.object_info[node.type]
    sockets = socket_inputs(info)
    inputs = [
        {"name": name, "type": kind, **({"shape": 7} if optional else {}), "link": None}
        for name, kind, optional in sockets
    ]
    outputs = [
        {"name": name, "type": out.type, "links": [], "slot_index": out.slot}
        for name, out in zip(node.output_names, node.outputs, strict=True)
    ]
    return {
        "id": node.id,
        "type": node.type,
        "pos": [0, 0],
        "size": list(node.size or _estimate_size(info, len(sockets), len(outputs), node.widgets_values)),
        "flags": {},
        "order": 0,
        "mode": 0,
        "inputs": inputs,
        "outputs": outputs,
        **({"title": node.title} if node.title else {}),
        "properties": {"Node name for S&R": node.type, "cnr_id": _cnr_id(node.type), **node.properties},
        "widgets_values": node.widgets_values,
    }


def _cnr_id(node_type: str) -> str:
    return PACK_CNR_ID if node_type.startswith("DM_") else CORE_CNR_ID


def _attach_input(ui_node: dict, info: dict, name: str, link_id: int) -> int:
    """Connect a link to an input slot (a linked widget gets a socket entry of its own); returns the slot."""
    for slot, entry in enumerate(ui_node["inputs"]):
        if entry["name"] == name:
            entry["link"] = link_id
            return slot
    kind = next(kind for input_name, kind, _ in input_specs(info) if input_name == name)
    ui_node["inputs"].append({"name": name, "type": kind, "widget": {"name": name}, "link": link_id})
    return len(ui_node["inputs"]) - 1


def _ui_note(note: Note) -> dict:
    """A Note in the editor's colours."""
    return {
        "id": note.id,
        "type": "Note",
        "pos": [0, 0],
        "size": list(note.size),
        "flags": {},
        "order": 0,
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "title": "Read me",
        "properties": {},
        "widgets_values": [note.text],
        "color": "#432",
        "bgcolor": "#653",
    }


def _estimate_size(info: dict, n_inputs: int, n_outputs: int, widgets_values: list) -> tuple[int, int]:
    """Roughly the size the editor computes: slot rows, then one row per widget (text boxes are taller)."""
    multiline = sum(1 for _, kind, opts in input_specs(info) if kind == "STRING" and opts.get("multiline"))
    widgets = len(widgets_values) - multiline
    height = SLOT_HEIGHT * max(n_inputs, n_outputs, 1) + WIDGET_HEIGHT * widgets + MULTILINE_HEIGHT * multiline
    return NODE_WIDTH if widgets_values else 240, height + 14


def _layout(graph: Graph, ui_nodes: dict[int, dict]) -> None:
    """Left-to-right columns as wide as their widest node; nodes stacked top to bottom in the order they
    were added (notes first)."""
    columns: dict[int, list[int]] = {}
    for note in graph.notes:
        columns.setdefault(note.column, []).append(note.id)
    for node in graph.nodes:
        columns.setdefault(node.column, []).append(node.id)
    x = MARGIN
    for column in sorted(columns):
        y = MARGIN + TITLE_HEIGHT
        for node_id in columns[column]:
            ui_nodes[node_id]["pos"] = [x, y]
            y += ui_nodes[node_id]["size"][1] + TITLE_HEIGHT + ROW_GAP
        x += max(ui_nodes[node_id]["size"][0] for node_id in columns[column]) + COLUMN_GAP


def _set_order(ui_nodes: dict[int, dict], links: list[list]) -> None:
    """Execution order as the editor stores it: a topological order (notes, having no links, come first)."""
    parents: dict[int, set[int]] = {node_id: set() for node_id in ui_nodes}
    for _, source, _, target, _, _ in links:
        parents[target].add(source)
    done: list[int] = []
    while len(done) < len(ui_nodes):
        ready = [i for i in sorted(ui_nodes) if i not in done and parents[i] <= set(done)]
        if not ready:
            raise ValueError("the graph has a cycle")
        done += ready
    for order, node_id in enumerate(done):
        ui_nodes[node_id]["order"] = order
