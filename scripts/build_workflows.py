"""Generate the shipped example workflows (``example_workflows/*.json``, editor UI format, schema 0.4).

Each workflow is one function below that describes its graph compactly: ``g.node(type, column, **inputs)``
where an input is either a widget value or another node's output (``loader["MODEL"]``). Slot order, widget
order, link types and defaults come from ComfyUI's own node definitions (``/object_info`` computed in
process), so the files match what the editor would save. Nodes are laid out left to right in columns.

Every built workflow is also converted to an API prompt with the demo models swapped in and validated by
ComfyUI, so a file that the demo could not run is never written.

    .venv-0.33.0/bin/python scripts/build_workflows.py           # (re)write example_workflows/*.json
    .venv-0.33.0/bin/python scripts/build_workflows.py --check   # exit 1 if a file is missing or out of date

Write them with the newest ComfyUI the project tests (the default when ``COMFYUI_PATH`` is unset); the check
passes on every tested version (core nodes may differ in unconnected output slots only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy_in_process
from comfy_server import find_comfyui
from workflows import (
    input_specs,
    socket_inputs,
    ui_only_values,
    use_demo_models,
    widget_layout,
    workflow_to_prompt,
)

PACK_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = PACK_ROOT / "example_workflows"
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


# -- the workflows ------------------------------------------------------------------------------------

TASK_VECTOR_NOTE = """\
Task vectors: τ = fine-tuned − base, the weight change a fine-tune made.

1. Put a base checkpoint and a fine-tune OF THAT BASE into models/checkpoints. This example names \
v1-5-pruned-emaonly.safetensors (SD 1.5) and dreamshaper_8.safetensors (a fine-tune of it); pick your own pair \
in the two loaders.

2. "Task Vector from Models" computes τ lazily; "Task Vector Info" shows its size, norm and which blocks changed \
most. Connect clip_finetuned and clip_base to include the text encoder's change too.

3. "Scale Task Vector" (0.5) and "Save Task Vector" write half of the fine-tune's change to output/task_vectors/ \
(fp16). Load it later with "Load Task Vector", or copy it to models/loras and use the stock LoraLoaderModelOnly.

4. "Apply Task Vector" adds strength · τ to the base: 0 = the base, 1 = the fine-tune, 0.5 = halfway, above 1 \
exaggerates it, below 0 moves away from it. Change strength and queue again (the seed is fixed).

No checkpoints at hand? Replace both loaders with "Load Demo Checkpoint (tiny, built in)" (variants base and \
finetune-a) and make the latent 64×64: the demo (bash scripts/demo.sh) and the tests do exactly that. The tiny \
model runs in seconds on a CPU; its images are noise, not art.
"""


def task_vectors(g: Graph) -> None:
    """Extract τ from a fine-tune, inspect it, save half of it, and sample the base + 0.5 τ."""
    g.note(TASK_VECTOR_NOTE, column=0, size=(400, 520))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    tuned = g.node("CheckpointLoaderSimple", 0, title="Fine-tuned model", ckpt_name="dreamshaper_8.safetensors")
    tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
    g.node("DM_TaskVectorInfo", 2, size=(360, 260), task_vector=tau[0])
    half = g.node("DM_TaskVectorScale", 2, task_vector=tau[0], factor=0.5)
    g.node("DM_TaskVectorSave", 3, task_vector=half[0], filename_prefix="task_vectors/dreamshaper_half", dtype="fp16")
    applied = g.node("DM_TaskVectorApply", 3, model=base["MODEL"], task_vector=tau[0], strength=0.5, clip=base["CLIP"])
    prompt = "a cozy wooden cabin in a snowy forest at dusk, warm window light, detailed, soft colours"
    sample_and_save(g, 4, applied["MODEL"], applied["CLIP"], base["VAE"], "task_vector", prompt)


MERGE_NOTE = """\
{title}

1. Put a base checkpoint and fine-tunes OF THAT BASE into models/checkpoints. This example names \
v1-5-pruned-emaonly.safetensors (SD 1.5) and two SD 1.5 fine-tunes; pick your own in the loaders.

2. Each "Task Vector from Models" takes τ = fine-tune − base; each "Stack Task Vectors" adds one τ with its \
weight. Chain more Stack nodes to merge more models.

3. {method}

4. The merged MODEL samples below; "Save Checkpoint (streaming)" writes it to output/checkpoints/ one tensor \
at a time, with the merge recipe in the file's metadata. "weight_rules" scales blocks, e.g. "@output = 0.5".

No checkpoints at hand? Replace the loaders with "Load Demo Checkpoint (tiny, built in)" (variants base, \
finetune-a … d); the pack's demo and tests do exactly that.
"""

MERGE_METHODS = {
    "merge_task_arithmetic": (
        "Task arithmetic: θ = θ_base + λ·Σ wᵢτᵢ.",
        "DM_MergeTaskArithmetic",
        {"lam": 0.8},
        "The weights on the Stack nodes and λ set how much of each fine-tune you get; plain sums can "
        "over-shoot, so λ below 1 is common with several fine-tunes.",
    ),
    "merge_ties": (
        "TIES-Merging: trim, elect signs, disjoint mean.",
        "DM_MergeTIES",
        {"k": 0.2, "topk_scope": "global", "sign": "mass", "lam": 1.0},
        "TIES keeps each τ's largest k (20%) entries over the whole model, elects a sign per entry and averages "
        "the agreeing entries. Try k between 0.1 and 0.5 and λ between 0.8 and 1.5.",
    ),
    "merge_dare": (
        "DARE: drop and rescale (DARE-TIES with sign election).",
        "DM_MergeDARE",
        {"p": 0.5, "rescale": True, "sign": "mass", "seed": 0, "lam": 1.0},
        "DARE drops each entry with probability p and rescales the rest by 1/(1−p); sign = mass makes it "
        "DARE-TIES. Change the seed for another random draw; heavily trained fine-tunes prefer p ≤ 0.5.",
    ),
    "merge_localize_and_stitch": (
        "Localize-and-Stitch (dataless): sparse, non-interfering merge.",
        "DM_MergeLocalizeAndStitch",
        {"k": 0.05, "lam": 1.0},
        "Each τ keeps only its largest 5% of entries over the whole model; where masks overlap the changes are "
        "averaged, elsewhere each fine-tune keeps its full change. No λ tuning needed.",
    ),
    "merge_drm": (
        "DRM (Decom-Renorm-Merge): merge in a shared SVD basis.",
        "DM_MergeDRM",
        {"drop_rate": 0.8, "direction": "vertical", "conv": False, "lam": 1.0},
        "DRM expresses every τ of a weight matrix in one shared SVD basis, renormalises, trims 80% jointly, "
        "elects signs and averages there. One SVD per layer: slower on CPU, fast on a GPU.",
    ),
}

FINETUNE_NAMES = ("dreamshaper_8.safetensors", "realisticVisionV51_v51VAE.safetensors")


LIGHTHOUSE = "a lighthouse on a rocky coast at sunset, dramatic clouds, detailed, soft colours"


def sample_and_save(
    g: Graph, column: int, model: Output, clip: Output, vae: Output, prefix: str, prompt: str = LIGHTHOUSE
) -> None:
    """Prompt → KSampler on ``model`` → decoded image saved under ``diffusion_merge/<prefix>``."""
    positive = g.node("CLIPTextEncode", column, title="Positive prompt", size=(400, 160), clip=clip, text=prompt)
    negative = g.node(
        "CLIPTextEncode", column, title="Negative prompt", size=(400, 160), clip=clip, text="blurry, low quality"
    )
    latent = g.node("EmptyLatentImage", column, width=512, height=512, batch_size=1)
    ksample_and_save(g, column + 1, model, positive[0], negative[0], latent[0], vae, prefix)


def ksample_and_save(
    g: Graph,
    column: int,
    model: Output,
    positive: Output,
    negative: Output,
    latent: Output,
    vae: Output,
    prefix: str,
    title: str | None = None,
) -> None:
    """KSampler (seed 42, 20 euler steps, cfg 7) → VAE Decode → image saved under ``diffusion_merge/<prefix>``."""
    sampled = g.node(
        "KSampler",
        column,
        title=title,
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=42,
        steps=20,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    image = g.node("VAEDecode", column + 1, samples=sampled[0], vae=vae)
    g.node("SaveImage", column + 1, size=(360, 400), images=image[0], filename_prefix=f"diffusion_merge/{prefix}")


def sample_custom(
    g: Graph, column: int, guider: Output, sampler: Output, model: Output, schedule: tuple, latent: tuple
) -> Output:
    """SamplerCustomAdvanced with a fixed seed: ``schedule`` = (scheduler, steps), ``latent`` = (side, batch)."""
    scheduler, steps = schedule
    side, batch = latent
    noise = g.node("RandomNoise", column, noise_seed=0)
    sigmas = g.node("BasicScheduler", column, model=model, scheduler=scheduler, steps=steps, denoise=1.0)
    empty = g.node("EmptyLatentImage", column, width=side, height=side, batch_size=batch)
    sampled = g.node(
        "SamplerCustomAdvanced",
        column + 1,
        noise=noise[0],
        guider=guider,
        sampler=sampler,
        sigmas=sigmas[0],
        latent_image=empty[0],
    )
    return sampled[0]


def stacked_task_vectors(g: Graph, base: Node, names: tuple[str, ...], weights: tuple[float, ...]) -> Output:
    """One loader, τ and Stack node per fine-tune, chained; returns the last stack."""
    stack = None
    for index, (name, weight) in enumerate(zip(names, weights, strict=True), start=1):
        tuned = g.node("CheckpointLoaderSimple", 0, title=f"Fine-tune {index}", ckpt_name=name)
        tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
        inputs = {"task_vector": tau[0], "weight": weight} | ({"stack": stack} if stack is not None else {})
        stack = g.node("DM_TaskVectorStack", 2, **inputs)[0]
    return stack


def merge_workflow(name: str) -> Callable[[Graph], None]:
    """The example for one merge method: two fine-tunes of SD 1.5 merged, sampled and saved."""
    title, node_type, params, explanation = MERGE_METHODS[name]

    def build(g: Graph) -> None:
        g.note(MERGE_NOTE.format(title=title, method=explanation), column=0, size=(400, 560))
        base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
        stack = stacked_task_vectors(g, base, FINETUNE_NAMES, (1.0, 1.0))
        merged = g.node(node_type, 3, base=base["MODEL"], task_vectors=stack, **params)
        g.node(
            "DM_SaveCheckpointStreaming",
            4,
            model=merged["MODEL"],
            filename_prefix=f"checkpoints/{name}",
            dtype="fp16",
            clip=base["CLIP"],
            vae=base["VAE"],
        )
        sample_and_save(g, 4, merged["MODEL"], base["CLIP"], base["VAE"], name)

    build.__doc__ = f"{title} Two SD 1.5 fine-tunes merged, sampled and saved."
    return build


BLOCK_WEIGHTS_NOTE = """\
Block weights: how much of the merged change each block of the model gets.

1. "Model Blocks" shows the base's architecture and its block groups (SD 1.5: embed, IN00–IN11, M00, \
OUT00–OUT11, final), with the keys and parameters of each.

2. Click "block weights…" under the merge node's weight_rules: one slider per block group of the model feeding \
"base" (read from the loader's file: SD1.x/SD2, SDXL, SD3, Flux, Wan 2.1/2.2, Qwen-Image). Moving a slider writes a \
line such as "@IN01 = 0.5" into weight_rules; the workflow saves only that text, and you can edit it by hand.

3. Here the merge keeps half of the change in the first two input blocks, 80 % in the first (deepest) two output \
blocks and 90 % of every cross-attention weight (a regex rule). 0 leaves a block as the base has it.

A block the model does not have (e.g. @IN11 on SDXL, which ends at IN08) stops the merge with a list of the real \
ones. No checkpoints at hand? The demo and tests swap in "Load Demo Checkpoint (tiny, built in)".
"""
BLOCK_RULES = "@IN00 = 0.5\n@IN01 = 0.5\n@OUT00 = 0.8\n@OUT01 = 0.8\nattn2 = 0.9"


def merge_block_weights(g: Graph) -> None:
    """Two SD 1.5 fine-tunes merged with per-block weights; Model Blocks lists the groups."""
    g.note(BLOCK_WEIGHTS_NOTE, column=0, size=(400, 560))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    stack = stacked_task_vectors(g, base, FINETUNE_NAMES, (1.0, 1.0))
    g.node("DM_ModelBlocks", 3, size=(360, 420), model=base["MODEL"])
    merged = g.node(
        "DM_MergeTaskArithmetic",
        3,
        size=(360, 260),
        base=base["MODEL"],
        task_vectors=stack,
        lam=1.0,
        weight_rules=BLOCK_RULES,
    )
    sample_and_save(g, 4, merged["MODEL"], base["CLIP"], base["VAE"], "merge_block_weights")


DEME_NOTE = """\
DeMe merge: four timestep-range experts of one base, merged by weighted task arithmetic.

DeMe (Ma et al., CVPR 2025) fine-tunes one copy of the base per noise range, then merges them back into ONE \
model: θ = θ_base + Σ wᵢ (θᵢ − θ_base). The paper's released weights, from the lowest-noise expert to the \
highest, are 0.1, 0.1, 0.2, 0.5 — set on the four Stack nodes (they need not sum to 1).

1. Put the base and its four range experts into models/checkpoints (names here are placeholders) — experts \
trained with this pack's range-expert trainer or any DeMe-style fine-tunes.

2. Adjust the weights; "Task Vector Info" shows how large the merged change is and where it lives.

No checkpoints at hand? The demo and tests swap in "Load Demo Checkpoint (tiny, built in)".
"""


def deme_merge(g: Graph) -> None:
    """DeMe's merge: four range experts → weighted task arithmetic (0.1, 0.1, 0.2, 0.5) → sample."""
    g.note(DEME_NOTE, column=0, size=(400, 520))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    names = tuple(f"sd15_deme_expert_t{lo:03d}-{lo + 250:03d}.safetensors" for lo in (0, 250, 500, 750))
    stack = stacked_task_vectors(g, base, names, (0.1, 0.1, 0.2, 0.5))
    merged = g.node("DM_MergeTaskArithmetic", 3, base=base["MODEL"], task_vectors=stack, lam=1.0)
    g.node("DM_TaskVectorInfo", 3, size=(360, 260), task_vector=merged["merged"])
    sample_and_save(g, 4, merged["MODEL"], base["CLIP"], base["VAE"], "deme_merge")


ROUTING_TWO_EXPERTS_NOTE = """\
Two experts over σ ranges, as ONE model: Wan 2.2's high-noise / low-noise idea, in one sampler, on SD-style \
checkpoints.

1. The first "Route Expert" serves the noisy start of sampling down to its end (here σ = 1.0 on the SD \
schedule); the second serves everything below. Ends are in σ, or pick "percent" / "timestep" in "unit".

2. "Routed Model" outputs a normal MODEL: any sampler uses it in one call, so multistep samplers keep their \
history across the switch — no leftover-noise hand-off between two KSamplerAdvanced nodes.

3. memory_mode "resident" keeps both experts loaded; "sequential" loads one at a time (peak VRAM of one \
expert), swapping once at the boundary.

The canvas under "Routed Model" shows which step lands in which expert for the connected sampler's \
schedule. For Wan 2.2 itself open the template routing_wan22 (two UNETLoaders, ModelSamplingSD3 shift 8 on each, \
boundary σ 0.875).
"""


def routing_two_experts(g: Graph) -> None:
    """Wan 2.2-style high/low-noise experts split at a σ boundary, as one MODEL in one KSampler."""
    g.note(ROUTING_TWO_EXPERTS_NOTE, column=0, size=(400, 520))
    high = g.node("CheckpointLoaderSimple", 0, title="High-noise expert", ckpt_name="high_noise_expert.safetensors")
    low = g.node("CheckpointLoaderSimple", 0, title="Low-noise expert", ckpt_name="low_noise_expert.safetensors")
    first = g.node("DM_RouteExpert", 1, model=high["MODEL"], end=1.0, unit="sigma", cfg=0.0)
    both = g.node("DM_RouteExpert", 1, model=low["MODEL"], experts=first[0], end=0.0, unit="sigma", cfg=0.0)
    routed = g.node("DM_RoutedModel", 2, experts=both[0], memory_mode="resident")
    sample_and_save(g, 3, routed[0], high["CLIP"], high["VAE"], "routing_two_experts")


WAN22_NOTE = """\
Wan 2.2 A14B text-to-video: the high-noise expert, then the low-noise expert, as ONE model in ONE KSampler.

1. Put wan2.2_t2v_high_noise_14B_fp8_scaled and wan2.2_t2v_low_noise_14B_fp8_scaled into models/diffusion_models, \
umt5_xxl_fp8_e4m3fn_scaled into models/text_encoders and wan_2.1_vae into models/vae (ComfyUI's Wan 2.2 files).

2. Each expert gets its own ModelSamplingSD3 (shift 8) BEFORE routing, as in ComfyUI's own Wan 2.2 template.

3. The first Route Expert serves σ above 0.875 (Wan 2.2's boundary for text-to-video; "timestep" 875 is the same), \
the second everything below. With euler / simple / 20 steps / shift 8 that is steps 1–11 high, 12–20 low: the \
canvas under "Routed Model" shows it.

4. The KSampler runs all 20 steps at cfg 3.5. This equals ComfyUI's two-KSamplerAdvanced recipe (high: steps \
0→11 with leftover noise; low: 11→end, no new noise) for euler, with no hand-off to get wrong; multistep \
samplers keep their history across the switch. memory_mode "sequential" keeps one 14B expert in VRAM at a time.

5. The 81 frames (5 s at 16 fps) are saved as an animated WEBP; for an MP4 use CreateVideo + SaveVideo instead.

No Wan files at hand? The demo and tests swap in "Load Demo Wan Expert (tiny, built in)" for each loader and \
shrink the video to 64×64, one latent frame; its videos are noise.
"""
WAN_NEGATIVE = "blurry, low quality, static, still picture, worst quality, jpeg artifacts, deformed, extra fingers"


def routing_wan22(g: Graph) -> None:
    """Wan 2.2 A14B: two UNETLoaders, ModelSamplingSD3 shift 8 on each, routed at σ 0.875, one KSampler."""
    g.note(WAN22_NOTE, column=0, size=(400, 640))
    experts = []
    for label in ("high", "low"):
        unet = g.node(
            "UNETLoader",
            0,
            title=f"{label.capitalize()}-noise expert",
            unet_name=f"wan2.2_t2v_{label}_noise_14B_fp8_scaled.safetensors",
            weight_dtype="default",
        )
        experts.append(g.node("ModelSamplingSD3", 1, title=f"Shift ({label} noise)", model=unet[0], shift=8.0)[0])
    clip = g.node("CLIPLoader", 0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan")
    vae = g.node("VAELoader", 0, vae_name="wan_2.1_vae.safetensors")
    text = "a red fox running through fresh snow in a pine forest, morning light, tracking shot"
    positive = g.node("CLIPTextEncode", 1, title="Positive prompt", size=(400, 160), clip=clip[0], text=text)
    negative = g.node("CLIPTextEncode", 1, title="Negative prompt", size=(400, 160), clip=clip[0], text=WAN_NEGATIVE)
    first = g.node(
        "DM_RouteExpert", 2, title="High noise: σ > 0.875", model=experts[0], end=0.875, unit="sigma", cfg=0.0
    )
    both = g.node(
        "DM_RouteExpert",
        2,
        title="Low noise: the rest",
        model=experts[1],
        experts=first[0],
        end=0.0,
        unit="sigma",
        cfg=0.0,
    )
    preview = {"σ preview model": "flow", "σ preview shift": 8.0}  # the editor's σ preview before the first run
    routed = g.node("DM_RoutedModel", 3, size=(360, 230), properties=preview, experts=both[0], memory_mode="sequential")
    latent = g.node("EmptyHunyuanLatentVideo", 3, width=640, height=640, length=81, batch_size=1)
    sampled = g.node(
        "KSampler",
        4,
        model=routed[0],
        positive=positive[0],
        negative=negative[0],
        latent_image=latent[0],
        seed=42,
        steps=20,
        cfg=3.5,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
    )
    frames = g.node("VAEDecode", 5, samples=sampled[0], vae=vae[0])
    g.node(
        "SaveAnimatedWEBP",
        5,
        size=(360, 400),
        images=frames[0],
        filename_prefix="diffusion_merge/wan22_routed",
        fps=16.0,
        lossless=False,
        quality=90,
        method="default",
    )


REFINER_NOTE = """\
SDXL base → refiner at 20 % noise, with a cfg and prompts per expert, in ONE sampler.

1. The base serves sampling from the start to 80 % ("percent" 0.8: the last 20 % of noise is left); the \
refiner serves the rest with its own cfg (5) and its own prompts (connected to its Route Expert).

2. "Routed Guider" feeds SamplerCustomAdvanced; the scheduler's steps and type set where each step lands.

Real SDXL: use CLIPTextEncodeSDXL for the base prompts and CLIPTextEncodeSDXLRefiner for the refiner's. \
memory_mode "sequential" keeps only one of the two large models in VRAM at a time.
"""


def routing_sdxl_refiner(g: Graph) -> None:
    """SDXL base → refiner at 20 % noise through the routed guider, per-expert cfg and prompts."""
    g.note(REFINER_NOTE, column=0, size=(400, 420))
    base = g.node("CheckpointLoaderSimple", 0, title="SDXL base", ckpt_name="sd_xl_base_1.0.safetensors")
    refiner = g.node("CheckpointLoaderSimple", 0, title="SDXL refiner", ckpt_name="sd_xl_refiner_1.0.safetensors")
    prompt = "a red fox in fresh snow, morning light, sharp focus, detailed fur"
    prompts = {}
    for label, loader in (("base", base), ("refiner", refiner)):
        clip = loader["CLIP"]
        prompts[label] = (
            g.node("CLIPTextEncode", 1, title=f"Positive ({label})", size=(400, 140), clip=clip, text=prompt),
            g.node("CLIPTextEncode", 1, title=f"Negative ({label})", size=(400, 140), clip=clip, text="blurry"),
        )
    first = g.node("DM_RouteExpert", 2, model=base["MODEL"], end=0.8, unit="percent", cfg=0.0)
    both = g.node(
        "DM_RouteExpert",
        2,
        model=refiner["MODEL"],
        experts=first[0],
        end=1.0,
        unit="percent",
        cfg=5.0,
        positive=prompts["refiner"][0][0],
        negative=prompts["refiner"][1][0],
    )
    guider = g.node(
        "DM_RoutedGuider",
        3,
        experts=both[0],
        positive=prompts["base"][0][0],
        negative=prompts["base"][1][0],
        cfg=7.0,
        memory_mode="sequential",
    )
    sampler = g.node("KSamplerSelect", 3, sampler_name="dpmpp_2m")
    sampled = sample_custom(g, 3, guider[0], sampler[0], base["MODEL"], ("karras", 25), (1024, 1))
    image = g.node("VAEDecode", 5, samples=sampled, vae=refiner["VAE"])
    g.node("SaveImage", 5, size=(360, 400), images=image[0], filename_prefix="diffusion_merge/routing_sdxl_refiner")


DEME_ENSEMBLE_NOTE = """\
DeMe ensemble: four timestep-range experts of one base, each serving its own quarter of sampling.

This is the alternative to DeMe's merge (see the deme_merge example): instead of adding the four range task \
vectors into one model, each expert = base + its task vector runs only in its own range: the t750–1000 expert \
the first 25 % of sampling (the noisiest), then t500–750, t250–500 and t0–250 the last 25 %. All four share \
the base's weights, so the router swaps task vectors in place at each boundary instead of holding four models.

1. Put the base and its four range experts into models/checkpoints (names are placeholders), or load saved \
task vectors with "Load Task Vector" and feed them to the Route Task Vector Expert nodes directly.
2. "strength" scales each expert's task vector; "end" (percent) is where it hands over.
"""


def deme_ensemble(g: Graph) -> None:
    """DeMe's ensemble: four range task vectors on one base, routed by sampling percent."""
    g.note(DEME_ENSEMBLE_NOTE, column=0, size=(400, 460))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    experts = None
    for index, lo in enumerate((750, 500, 250, 0)):  # the first expert serves the noisiest quarter
        name = f"sd15_deme_expert_t{lo:03d}-{lo + 250:03d}.safetensors"
        tuned = g.node("CheckpointLoaderSimple", 0, title=f"Range expert {index + 1}", ckpt_name=name)
        tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
        chain = {"experts": experts} if experts is not None else {}
        experts = g.node(
            "DM_RouteTaskVectorExpert",
            2,
            base=base["MODEL"],
            task_vector=tau[0],
            strength=1.0,
            end=(index + 1) / 4,
            unit="percent",
            cfg=0.0,
            **chain,
        )[0]
    routed = g.node("DM_RoutedModel", 3, experts=experts, memory_mode="resident")
    sample_and_save(g, 4, routed[0], base["CLIP"], base["VAE"], "deme_ensemble")


DEME_TRAIN_NOTE = """\
DeMe end to end: train four range experts of one base, merge them back into one model, route them by noise \
range beside it (ensemble), and compare both with the base — the same seed and prompt for all three.

1. Data. Your images as latents and their prompt: replace the "Training data" nodes with Load Image Dataset \
from Folder → VAE Encode (encode the caption with the BASE's CLIP). Here a fine-tune paints four images as a \
stand-in dataset, so the experts learn to move the base towards its look.

2. Four "Train Range-Expert LoRA" nodes train the same base on the same data, each only on its quarter of the \
noise schedule (timesteps 0–250, 250–500, 500–750, 750–1000), with DeMe's options: global sampling p = 0.3, \
antithetic timesteps, consistency loss 1 and the loss on ε. Each draws its loss curve and the histogram of the \
σ it drew. Steps are set for a GPU; the built-in demo trains a few steps only.

3. Merge: τ = expert − base per expert, θ = θ_base + Σ w τ with DeMe's weights 0.1, 0.1, 0.2, 0.5 from the \
low-noise to the high-noise expert (on the Stack nodes; they need not sum to 1).

4. Ensemble: each expert serves only its own range while sampling (Route Expert ×4 → Route Experts by σ).

"Save Range Expert LoRA" writes each expert to output/loras (a stock LoRA, plus a channel-projection companion \
when channel_projection is on). Add a "Timestep Curriculum" or "Momentum Decay" node for CLTS / MDLRC.
"""

DEME_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))  # low noise → high noise, as DeMe's weights
DEME_WEIGHTS = (0.1, 0.1, 0.2, 0.5)
DEME_TRAINING = {
    "range_unit": "timestep",
    "global_probability": 0.3,
    "antithetic": True,
    "consistency_weight": 1.0,
    "loss_space": "eps/v",
    "loss_function": "MSE",
    "steps": 500,
    "batch_size": 2,
    "grad_accumulation": 2,
    "learning_rate": 0.0001,
    "optimizer": "AdamW",
    "rank": 16,
    "algorithm": "LoRA",
    "training_dtype": "bf16",
    "lora_dtype": "bf16",
    "gradient_checkpointing": True,
    "channel_projection": False,
    "grad_clip": 1.0,
}
FLOWER_FIELD = "a field of wild flowers under a stormy sky, oil painting, detailed, soft colours"


def training_data(g: Graph, column: int, teacher: Node, prompt: str) -> Output:
    """Four images a fine-tune paints for ``prompt``, as latents: a stand-in for a real image dataset."""
    clip = teacher["CLIP"]
    text = g.node("CLIPTextEncode", column, title="Training data: prompt", size=(400, 140), clip=clip, text=prompt)
    negative = g.node("CLIPTextEncode", column, title="Training data: negative", clip=teacher["CLIP"], text="blurry")
    empty = g.node("EmptyLatentImage", column, width=512, height=512, batch_size=4)
    images = g.node(
        "KSampler",
        column,
        title="Training data: images",
        model=teacher["MODEL"],
        positive=text[0],
        negative=negative[0],
        latent_image=empty[0],
        seed=1,
        steps=20,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    return images[0]


def compare_samples(g: Graph, column: int, models: dict[str, Output], clip: Output, vae: Output, prompt: str) -> None:
    """One KSampler per model with the same prompt, seed and latent; each image saved under its label."""
    positive = g.node("CLIPTextEncode", column, title="Positive prompt", size=(400, 140), clip=clip, text=prompt)
    negative = g.node("CLIPTextEncode", column, title="Negative prompt", clip=clip, text="blurry, low quality")
    latent = g.node("EmptyLatentImage", column, width=512, height=512, batch_size=1)
    for label, model in models.items():
        ksample_and_save(g, column + 1, model, positive[0], negative[0], latent[0], vae, label, f"Sample: {label}")


def deme_train(g: Graph) -> None:
    """DeMe end to end: four range experts trained from one base, merged (0.1/0.1/0.2/0.5) and routed."""
    g.note(DEME_TRAIN_NOTE, column=0, size=(420, 720))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    teacher = g.node("CheckpointLoaderSimple", 0, title="Data painter", ckpt_name="dreamshaper_8.safetensors")
    latents = training_data(g, 1, teacher, FLOWER_FIELD)
    caption = g.node(
        "CLIPTextEncode", 1, title="Caption (base CLIP)", size=(400, 140), clip=base["CLIP"], text=FLOWER_FIELD
    )
    experts, stack = [], None
    for seed, ((low, high), weight) in enumerate(zip(DEME_RANGES, DEME_WEIGHTS, strict=True)):
        label = f"t{low:03d}-{high:03d}"
        trained = g.node(
            "DM_TrainRangeExpertLoRA",
            2,
            title=f"Range expert {label}",
            size=(360, 700),
            model=base["MODEL"],
            latents=latents,
            positive=caption[0],
            range_min=float(low),
            range_max=float(high),
            seed=seed,
            **DEME_TRAINING,
        )
        g.node("DM_SaveRangeExpertLoRA", 3, lora=trained["lora"], filename_prefix=f"loras/deme_expert_{label}")
        tau = g.node("DM_TaskVectorFromModels", 3, finetuned=trained["model_with_lora"], base=base["MODEL"])
        inputs = {"task_vector": tau[0], "weight": weight} | ({"stack": stack} if stack is not None else {})
        stack = g.node("DM_TaskVectorStack", 4, **inputs)[0]
        experts.append((low, trained["model_with_lora"]))
    merged = g.node("DM_MergeTaskArithmetic", 5, base=base["MODEL"], task_vectors=stack, lam=1.0)
    chain = None
    for low, model in reversed(experts):  # routing order: high noise first, each stops at its lower end
        inputs = {"experts": chain} if chain is not None else {}
        chain = g.node("DM_RouteExpert", 5, model=model, end=float(low), unit="timestep", cfg=0.0, **inputs)[0]
    routed = g.node("DM_RoutedModel", 5, experts=chain, memory_mode="resident")
    models = {"deme_base": base["MODEL"], "deme_merged": merged["MODEL"], "deme_routed": routed[0]}
    compare_samples(g, 6, models, base["CLIP"], base["VAE"], FLOWER_FIELD)


SUPERDIFF_AND_NOTE = """\
SuperDiff AND: one image that is BOTH prompts at once (the paper's "a flamingo" AND "a candy cane").

SuperDiff (Skreta et al., ICLR 2025) runs the reverse SDE of several components together and, at every step, \
weights their scores (κ) so that the image stays equally likely under each component — estimated on the fly \
with the Itô density estimator, no training.

1. Each "SuperDiff Component" is a model + prompt (+ negative, cfg); chain more for N > 2.
2. "SuperDiff KSampler" hides the guider and sampler: mode AND = equal density, OR = a mixture (each sample \
picks one component). It needs many small stochastic steps (100 by default); the κ trace is drawn on the node.
3. kappa_clamp (0 = off, the reference behaviour) bounds κ if AND gets unstable.

Needs a real SD 1.5 checkpoint for meaningful pictures; the demo swaps in the tiny built-in model.
"""


def superdiff_and_concepts(g: Graph) -> None:
    """SuperDiff AND of two prompts on one checkpoint (flamingo AND candy cane), all-in-one node."""
    g.note(SUPERDIFF_AND_NOTE, column=0, size=(400, 500))
    loader = g.node("CheckpointLoaderSimple", 0, title="Model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    clip = loader["CLIP"]
    flamingo = g.node("CLIPTextEncode", 1, title="Concept 1", size=(400, 120), clip=clip, text="a flamingo")
    candy = g.node("CLIPTextEncode", 1, title="Concept 2", size=(400, 120), clip=clip, text="a candy cane")
    empty = g.node("CLIPTextEncode", 1, title="Negative", size=(400, 120), clip=clip, text="")
    first = g.node("DM_SuperDiffComponent", 2, model=loader["MODEL"], positive=flamingo[0], negative=empty[0], cfg=7.5)
    both = g.node(
        "DM_SuperDiffComponent",
        2,
        model=loader["MODEL"],
        positive=candy[0],
        components=first[0],
        negative=empty[0],
        cfg=7.5,
    )
    latent = g.node("EmptyLatentImage", 2, width=512, height=512, batch_size=1)
    sampled = g.node(
        "DM_SuperDiffKSampler",
        3,
        size=(360, 420),
        components=both[0],
        latent_image=latent[0],
        seed=1,
        steps=100,
        scheduler="normal",
        denoise=1.0,
        mode="AND",
        temperature=1.0,
        bias="",
        kappa_clamp=0.0,
        and_epsilon=0.0,
        flow_sigma_max=0.995,
    )
    image = g.node("VAEDecode", 4, samples=sampled[0], vae=loader["VAE"])
    g.node("SaveImage", 4, size=(360, 400), images=image[0], filename_prefix="diffusion_merge/superdiff_and")


SUPERDIFF_OR_NOTE = """\
SuperDiff OR: model A OR model B — each sample is drawn from the mixture of two checkpoints.

With mode OR, κ = softmax(T·log q + bias) follows the component under which the sample is more likely, so each \
image commits to one model's distribution (bias in nats sets the mixture weights, e.g. "0, -1"). This is the \
modular form: SuperDiff Guider + SuperDiff Sampler in SamplerCustomAdvanced; "SuperDiff Trace" plots κ and the \
log-densities of the last run.

Both checkpoints must share a latent format (two SD 1.5 fine-tunes here). The demo swaps in tiny built-in models.
"""


def superdiff_or_models(g: Graph) -> None:
    """SuperDiff OR of two checkpoints through the modular guider + sampler, with the trace plot."""
    g.note(SUPERDIFF_OR_NOTE, column=0, size=(400, 460))
    components = None
    first_loader = None
    for label, name in (("A", "dreamshaper_8.safetensors"), ("B", "realisticVisionV51_v51VAE.safetensors")):
        loader = g.node("CheckpointLoaderSimple", 0, title=f"Model {label}", ckpt_name=name)
        first_loader = first_loader or loader
        text = "a portrait of a woman in a garden, soft light, detailed"
        positive = g.node(
            "CLIPTextEncode", 1, title=f"Positive ({label})", size=(400, 120), clip=loader["CLIP"], text=text
        )
        negative = g.node(
            "CLIPTextEncode",
            1,
            title=f"Negative ({label})",
            size=(400, 120),
            clip=loader["CLIP"],
            text="blurry, low quality",
        )
        chain = {"components": components} if components is not None else {}
        components = g.node(
            "DM_SuperDiffComponent",
            2,
            model=loader["MODEL"],
            positive=positive[0],
            negative=negative[0],
            cfg=7.0,
            **chain,
        )[0]
    guider = g.node("DM_SuperDiffGuider", 3, components=components)
    sampler = g.node(
        "DM_SuperDiffSampler",
        3,
        mode="OR",
        temperature=1.0,
        bias="0, 0",
        kappa_clamp=0.0,
        and_epsilon=0.0,
        flow_sigma_max=0.995,
    )
    sampled = sample_custom(g, 3, guider[0], sampler[0], first_loader["MODEL"], ("normal", 100), (512, 4))
    g.node("DM_SuperDiffTrace", 5, size=(360, 300), guider=guider[0], latent=sampled)
    image = g.node("VAEDecode", 5, samples=sampled, vae=first_loader["VAE"])
    g.node("SaveImage", 5, size=(360, 400), images=image[0], filename_prefix="diffusion_merge/superdiff_or")


MINI_FAMILY_NOTE = """\
The pack's own model: pictures without downloading anything

1. "Load Mini Model" loads a small model family shipped with this pack, trained on coloured Fashion-MNIST \
garments: an SD1.5-architecture MODEL, its text encoder and VAE. Every core node works with them.

2. It understands "a <colour> <garment>", "<garment>" or "<colour>". Colours: red, yellow, green, cyan, blue, \
magenta. Garments: t-shirt, trousers, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot. Other \
words are ignored.

3. It draws 32×32 pictures (a 4×4 latent): keep Empty Latent Image at 32×32. 20 steps at cfg about 4 work \
well; the negative prompt is the empty caption.

4. Variants: base (all garments); a and b (fine-tunes on garments 0–4 and 5–9); tops, footwear and \
bags-trousers-dresses (fine-tunes for merging); expert-… (base + a DeMe range-expert LoRA). Merge them, take \
task vectors between them, or route between them like real checkpoints.
"""


def mini_family(g: Graph) -> None:
    """The built-in mini model: eight red sneakers from the base variant."""
    g.note(MINI_FAMILY_NOTE, column=0, size=(400, 560))
    loader = g.node("DM_LoadMiniModel", 1, variant="base")
    positive = g.node("CLIPTextEncode", 2, title="Prompt", size=(320, 120), clip=loader["CLIP"], text="a red sneaker")
    negative = g.node("CLIPTextEncode", 2, title="Negative (empty)", size=(320, 120), clip=loader["CLIP"], text="")
    latent = g.node("EmptyLatentImage", 2, width=32, height=32, batch_size=8)
    sampled = g.node(
        "KSampler",
        3,
        model=loader["MODEL"],
        positive=positive[0],
        negative=negative[0],
        latent_image=latent[0],
        seed=42,
        steps=20,
        cfg=4.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    image = g.node("VAEDecode", 4, samples=sampled[0], vae=loader["VAE"])
    g.node("SaveImage", 4, size=(360, 400), images=image[0], filename_prefix="diffusion_merge/mini_family")


LORA_EXTRACT_NOTE = """\
Extract a LoRA from a task vector: a fine-tune's change (or any merge result) as a standard, small LoRA file.

1. Put a base checkpoint and a fine-tune OF THAT BASE into models/checkpoints (this example names SD 1.5 and \
DreamShaper 8). "Task Vector from Models" takes τ = fine-tune − base.

2. "Extract LoRA from Task Vector" replaces each weight's change by its best rank-32 approximation (SVD; 3×3 \
convolutions as LoCon) and writes output/loras/dreamshaper_r32_00001_.safetensors. The node shows how much of τ's \
energy (squared norm) the LoRA keeps, and which keys kept least. Mode "energy" instead picks, per weight, the \
smallest rank that keeps e.g. 90 %.

3. Its lora_task_vector output is what the file adds: applied to the base here and sampled, so you can compare it \
with the fine-tune. Copy the file into models/loras to use it with the stock LoraLoaderModelOnly at strength 1.

Works on merge results too: connect a Merge node's "merged" output instead of the task vector.
"""


def lora_extract(g: Graph) -> None:
    """A fine-tune's task vector as a rank-32 LoRA file, applied back to the base and sampled."""
    g.note(LORA_EXTRACT_NOTE, column=0, size=(400, 520))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    tuned = g.node("CheckpointLoaderSimple", 0, title="Fine-tuned model", ckpt_name="dreamshaper_8.safetensors")
    tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
    lora = g.node(
        "DM_TaskVectorToLoRA",
        2,
        size=(400, 480),
        task_vector=tau[0],
        filename_prefix="loras/dreamshaper_r32",
        mode="rank",
        rank=32,
        conv="locon",
        other_keys="diff",
        dtype="fp16",
    )
    applied = g.node("DM_TaskVectorApply", 3, model=base["MODEL"], task_vector=lora["lora_task_vector"], strength=1.0)
    sample_and_save(g, 4, applied["MODEL"], base["CLIP"], base["VAE"], "lora_extract", LIGHTHOUSE)


RECIPE_NOTE = """\
Recipes you can re-run: make LoRAs of two fine-tunes, merge the LoRAs with TIES, save the merge's recipe and run it \
again.

1. Put a base checkpoint and two fine-tunes of it into models/checkpoints. Each "Extract LoRA from Task Vector" \
writes a rank-32 LoRA to output/loras; its lora_task_vector output is read from that file, so what is built from it \
can be made again from files.

2. "Merge: TIES" merges the two LoRAs' changes. "Save Recipe" writes output/recipes/lora_ties_00001_.json: the two \
LoRA files by name, size and content hash, the method and every parameter. Share the JSON with the LoRAs.

3. "Run Recipe" takes that recipe (here linked as text; or pick a recipes/*.json or any file the pack saved in \
recipe_file), finds both files in the model and output folders, checks their hashes, and merges again. A missing \
or different file stops it, naming the file. The re-made task vector is applied to the base and sampled.

Task vectors made from MODELs loaded in ComfyUI are not files: their recipes say so and Run Recipe refuses them. Use \
"Task Vector from Files" or "Load Task Vector" for inputs you want in a recipe.
"""


def recipe_rerun(g: Graph) -> None:
    """Two fine-tunes → LoRAs → TIES merge → Save Recipe → Run Recipe → applied to the base and sampled."""
    g.note(RECIPE_NOTE, column=0, size=(400, 620))
    base = g.node("CheckpointLoaderSimple", 0, title="Base model", ckpt_name="v1-5-pruned-emaonly.safetensors")
    stack = None
    for index, (name, prefix) in enumerate(zip(FINETUNE_NAMES, ("dreamshaper_r32", "realistic_r32"), strict=True)):
        tuned = g.node("CheckpointLoaderSimple", 0, title=f"Fine-tune {index + 1}", ckpt_name=name)
        tau = g.node("DM_TaskVectorFromModels", 1, finetuned=tuned["MODEL"], base=base["MODEL"])
        lora = g.node(
            "DM_TaskVectorToLoRA", 2, size=(400, 420), task_vector=tau[0], filename_prefix=f"loras/{prefix}", rank=32
        )
        inputs = {"task_vector": lora["lora_task_vector"], "weight": 1.0} | ({"stack": stack} if stack else {})
        stack = g.node("DM_TaskVectorStack", 3, **inputs)[0]
    merged = g.node("DM_MergeTIES", 4, base=base["MODEL"], task_vectors=stack, k=0.2, lam=1.0)
    saved = g.node(
        "DM_SaveRecipe", 5, size=(400, 300), task_vector=merged["merged"], filename_prefix="recipes/lora_ties"
    )
    rerun = g.node("DM_RunRecipe", 5, size=(400, 360), recipe_json=saved["recipe"], write_file=False)
    applied = g.node("DM_TaskVectorApply", 6, model=base["MODEL"], task_vector=rerun["task_vector"], strength=1.0)
    sample_and_save(g, 6, applied["MODEL"], base["CLIP"], base["VAE"], "recipe_rerun")


WORKFLOWS: dict[str, Callable[[Graph], None]] = {
    "mini_family": mini_family,
    "task_vectors": task_vectors,
    "lora_extract": lora_extract,
    **{name: merge_workflow(name) for name in MERGE_METHODS},
    "merge_block_weights": merge_block_weights,
    "recipe_rerun": recipe_rerun,
    "deme_merge": deme_merge,
    "routing_two_experts": routing_two_experts,
    "routing_wan22": routing_wan22,
    "routing_sdxl_refiner": routing_sdxl_refiner,
    "deme_ensemble": deme_ensemble,
    "deme_train": deme_train,
    "superdiff_and_concepts": superdiff_and_concepts,
    "superdiff_or_models": superdiff_or_models,
}


# -- ComfyUI in process -------------------------------------------------------------------------------


def load_object_info(comfyui: Path, work: Path) -> tuple[dict, Any]:
    """Boot ComfyUI's node registry in process (core, extras and this pack) with every folder it writes
    redirected into ``work``; returns (``/object_info`` for all nodes, ComfyUI's ``execution`` module)."""
    comfy_in_process.boot(comfyui, work)
    import execution

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    comfy_in_process.register_pack(nodes)
    info = {}
    for node_type in nodes.NODE_CLASS_MAPPINGS:
        try:
            info[node_type] = _node_info(nodes, node_type)
        except Exception as error:  # one broken node definition should not stop the build
            print(f"warning: no object_info for {node_type}: {error}", file=sys.stderr)
    return json.loads(json.dumps(info)), execution


def _node_info(nodes_module, node_type: str) -> dict:
    """What ``/object_info`` says about one node: V3 classes describe themselves; for V1 classes only the
    fields the workflow builder reads are filled in."""
    cls = nodes_module.NODE_CLASS_MAPPINGS[node_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    input_types = cls.INPUT_TYPES()
    return {
        "input": input_types,
        "input_order": {section: list(entries) for section, entries in input_types.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        "name": node_type,
        "display_name": nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def validate_with_demo_models(execution, workflow: dict, object_info: dict) -> None:
    """Convert with the demo models swapped in and let ComfyUI validate the prompt (raises if invalid)."""
    prompt = use_demo_models(workflow_to_prompt(workflow, object_info))
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("build", prompt, None))
    if not ok:
        raise ValueError(f"ComfyUI rejects the demo prompt: {error} {json.dumps(node_errors)[:2000]}")


# -- command line -------------------------------------------------------------------------------------


def serialize(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def build_all(object_info: dict, execution) -> dict[str, str]:
    """{file name: JSON text} of every workflow in ``WORKFLOWS``."""
    files = {}
    for name, describe in WORKFLOWS.items():
        graph = Graph(object_info)
        describe(graph)
        workflow = render(graph, name)
        validate_with_demo_models(execution, workflow, object_info)
        files[f"{name}.json"] = serialize(workflow)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that are missing or out of date")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: example_workflows/)")
    options = parser.parse_args(argv)
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    comfyui, _ = find_comfyui(PACK_ROOT)
    work = Path(tempfile.mkdtemp(prefix="dm-build-"))
    try:
        object_info, execution = load_object_info(comfyui, work)
        files = build_all(object_info, execution)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stale = [name for name, text in files.items() if _read(options.out / name) != text]
    if options.check:
        stale = [name for name in stale if not _same_but_core_outputs(_read(options.out / name), files[name])]
        for name in stale:
            print(f"out of date: {options.out / name} (run scripts/build_workflows.py)")
        return 1 if stale else 0
    options.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (options.out / name).write_text(text, encoding="utf-8")
        print(f"{'wrote' if name in stale else 'unchanged'}: {options.out / name}")
    return 0


def _same_but_core_outputs(shipped: str | None, built: str) -> bool:
    """Whether two workflow texts differ only in unconnected output slots, which core nodes gain between
    ComfyUI releases (SaveImage has an IMAGE output in newer ones). The files are written with the newest
    ComfyUI the project tests; the check passes on every tested version."""
    if shipped is None:
        return False

    def without_unlinked_outputs(text: str) -> dict:
        workflow = json.loads(text)
        for node in workflow["nodes"]:
            node["outputs"] = [slot for slot in node.get("outputs", []) if slot.get("links")]
        return workflow

    return without_unlinked_outputs(shipped) == without_unlinked_outputs(built)


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
