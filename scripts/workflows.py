"""ComfyUI workflow helpers without ComfyUI: UI format → API prompt format, and demo-model substitution.

The editor saves *UI-format* workflows (``nodes``, ``links``, positional ``widgets_values``); the server runs
*API-format* prompts (``{node_id: {"class_type", "inputs"}}``). The editor converts in JavaScript; this
module does the same offline from ``/object_info`` data, which tells which inputs are widgets and in which
order their values are stored. Used by ``run_examples.py``, ``build_workflows.py`` and the e2e tests; it
imports nothing outside the standard library.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import PurePath
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = frozenset({"seed", "noise_seed"})  # INT widgets the editor gives a "control after generate" widget
# Editor-only node types that never reach the server (a PrimitiveNode's value is stored in its target widget).
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "PrimitiveNode"})
# Values of the extra widgets an upload button adds, stored after the widget's own value (as the editor
# saves LoadImage, LoadVideo and LoadAudio).
UPLOAD_EXTRA_VALUES: dict[str, list[Any]] = {
    "image_upload": ["image"],
    "video_upload": ["image"],
    "audio_upload": [None, None],
}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

DEMO_LOADER = "DM_DemoCheckpointLoader"
DEMO_FINETUNE_VARIANTS = ("finetune-a", "finetune-b", "finetune-c", "finetune-d")
DEMO_LATENT_SIZE = 64
MINI_LOADER = "DM_LoadMiniModel"
DEMO_WAN_LOADER = "DM_DemoWanLoader"
DEMO_VIDEO_LENGTH = 1
# Wan's separate loaders and the output of DM_DemoWanLoader (MODEL, CLIP, VAE) their output 0 becomes.
WAN_LOADER_SLOTS = {"UNETLoader": 0, "CLIPLoader": 1, "VAELoader": 2}
DEMO_TRAINER = "DM_TrainRangeExpertLoRA"
DEMO_TRAINING_STEPS = 4


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted (unknown node type, widget count mismatch, …)."""


# -- which inputs are widgets -------------------------------------------------------------------------


def input_specs(info: dict) -> Iterator[tuple[str, str, dict]]:
    """(name, type, options) of a node's required then optional inputs, in the editor's order."""
    order = info.get("input_order") or {section: list(info["input"].get(section, {})) for section in info["input"]}
    for section in ("required", "optional"):
        declared = info["input"].get(section, {})
        for name in order.get(section, []):
            spec = declared[name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]  # V1 combos are a list of choices
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(spec[0], list) and "options" not in options:
                options = {**options, "options": spec[0]}
            yield name, kind, options


def is_widget(kind: str, options: dict) -> bool:
    """Whether the editor shows an input as a widget (a value stored in ``widgets_values``)."""
    return kind in WIDGET_TYPES and not options.get("forceInput", False)


def ui_only_values(name: str, kind: str, options: dict) -> list[Any]:
    """The UI-only values the editor stores after a widget's own value, as a fresh node has them:
    the "control after generate" choice (we default to "fixed", not the editor's "randomize", so
    examples are reproducible) and the values of the extra widgets an upload button adds."""
    values: list[Any] = ["fixed"] if has_generate_control(name, kind, options) else []
    for key, extra in UPLOAD_EXTRA_VALUES.items():
        if options.get(key):
            values += extra
    return values


def has_generate_control(name: str, kind: str, options: dict) -> bool:
    """Whether the editor adds a "control after generate" widget: the input asks for one, or (the
    frontend's legacy rule) it is an INT named ``seed`` or ``noise_seed`` that does not say otherwise."""
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return kind == "INT" and name in SEED_NAMES


def had_legacy_generate_control(name: str, kind: str, options: dict) -> bool:
    """Whether workflows saved before an input opted out of "control after generate" (``False``) may still
    carry its value: an INT named ``seed``/``noise_seed`` had one by the frontend's legacy rule."""
    return kind == "INT" and name in SEED_NAMES and options.get("control_after_generate") is False


def widget_layout(info: dict, legacy: bool = False) -> list[tuple[str, int]]:
    """[(widget input name, number of UI-only values that follow it)] in ``widgets_values`` order; with
    ``legacy``, as older saves of the node have it (a control value after each seed input that has since
    opted out of "control after generate")."""
    return [
        (name, len(ui_only_values(name, kind, opts)) + (legacy and had_legacy_generate_control(name, kind, opts)))
        for name, kind, opts in input_specs(info)
        if is_widget(kind, opts)
    ]


def accepted_layouts(info: dict) -> list[list[tuple[str, int]]]:
    """The widget layout of the node as defined now, then (when different) the one its older saves have."""
    current, legacy = widget_layout(info), widget_layout(info, legacy=True)
    return [current] if legacy == current else [current, legacy]


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """[(name, type, optional)] of the inputs that are sockets (links) rather than widgets."""
    optional = set(info["input"].get("optional", {}))
    return [(name, kind, name in optional) for name, kind, opts in input_specs(info) if not is_widget(kind, opts)]


# -- UI format → API format ---------------------------------------------------------------------------


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (schema 0.4) into the API prompt ``/prompt`` executes.

    As the editor does: notes and primitive nodes are dropped (a primitive's value is already stored in
    the widget it feeds), muted nodes are dropped with the inputs they fed, and links through Reroute
    and bypassed nodes are followed to their source. Links become ``[source id, output slot]``; widget
    values are read positionally (``widget_layout``), and a widget input that is linked takes the link.
    Raises ``WorkflowError`` for node types missing from ``object_info``, widget-count mismatches and
    subgraphs.
    """
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes'/'links'); API-format prompts need no conversion")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported; unpack the subgraphs in the editor first")
    by_id = {node["id"]: node for node in workflow["nodes"]}
    sources = _link_sources(workflow["links"], by_id)
    return {
        str(node["id"]): _node_to_api(node, object_info, sources) for node in workflow["nodes"] if _role(node) == "run"
    }


def _role(node: dict) -> str:
    """``run`` (sent to the server), ``pass`` (links go through it) or ``drop``."""
    if node["type"] in UI_ONLY_TYPES or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
        return "drop"
    if node["type"] == "Reroute" or node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
        return "pass"
    return "run"


def _link_sources(links: list, by_id: dict[int, dict]) -> dict[int, tuple[int, int]]:
    """{link id: (source node id, output slot)} for links whose real source runs."""
    raw = {link[0]: (link[1], link[2]) for link in links if link}
    sources = {}
    for link_id in raw:
        node_id, slot, seen = *raw[link_id], set()
        while node_id in by_id and _role(by_id[node_id]) == "pass" and node_id not in seen:
            seen.add(node_id)
            upstream = _pass_through_link(by_id[node_id], slot)
            if upstream not in raw:
                break
            node_id, slot = raw[upstream]
        if node_id in by_id and _role(by_id[node_id]) == "run":
            sources[link_id] = (node_id, slot)
    return sources


def _pass_through_link(node: dict, slot: int) -> int | None:
    """The input link a Reroute or bypassed node forwards to output ``slot``: the input in the same
    slot when its type matches, else the first input of the output's type (the editor's rule)."""
    inputs = node.get("inputs") or []
    if node["type"] == "Reroute":
        return inputs[0].get("link") if inputs else None
    outputs = node.get("outputs") or []
    kind = outputs[slot]["type"] if slot < len(outputs) else None
    if slot < len(inputs) and inputs[slot].get("type") == kind:
        return inputs[slot].get("link")
    return next((entry.get("link") for entry in inputs if entry.get("type") == kind), None)


def _node_to_api(node: dict, object_info: dict, sources: dict[int, tuple[int, int]]) -> dict:
    label = f"node {node['id']} ({node['type']})"
    if node["type"] not in object_info:
        raise WorkflowError(f"{label}: unknown node type; is the pack that provides it installed and loaded?")
    info = object_info[node["type"]]
    inputs = _widget_inputs(node, info, label)
    for slot in node.get("inputs") or []:
        if slot.get("link") in sources:
            source, output = sources[slot["link"]]
            inputs[slot["name"]] = [str(source), output]
    return {
        "class_type": node["type"],
        "inputs": inputs,
        "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]},
    }


def _widget_inputs(node: dict, info: dict, label: str) -> dict[str, Any]:
    values = node.get("widgets_values") or []
    if not isinstance(values, list):
        raise WorkflowError(f"{label}: widgets_values is a {type(values).__name__}, expected a list")
    specs = {name: (kind, opts) for name, kind, opts in input_specs(info)}
    optional = set(info["input"].get("optional", {}))
    layouts = accepted_layouts(info)
    for layout in layouts:
        inputs = _read_widgets(values, layout, optional)
        if inputs is not None and (len(inputs) == len(layout) or _plausible(inputs, specs)):
            return inputs
    expected = sum(1 + extra for _, extra in layouts[0])
    names = ", ".join(name + " (+1 UI value)" * bool(extra) for name, extra in layouts[0]) or "none"
    raise WorkflowError(
        f"{label}: {len(values)} widget values, expected {expected} for widgets: {names}. "
        "Was the workflow saved with another version of this node?"
    )


def _read_widgets(values: list, layout: list[tuple[str, int]], optional: set[str]) -> dict[str, Any] | None:
    """Widget values by position, or None when they do not fit the layout. Trailing optional widgets may be
    missing (the workflow was saved before they were added): they are left out, so the server uses their
    defaults, as the editor does when it opens such a workflow."""
    inputs, position = {}, 0
    for name, extra in layout:
        if position >= len(values):
            if name not in optional:
                return None
            continue
        inputs[name] = values[position]
        position += 1 + extra
    return inputs if position == len(values) else None


def _plausible(inputs: dict[str, Any], specs: dict[str, tuple[str, dict]]) -> bool:
    """Whether each value has its widget's type (a combo's value is one of its options): a shorter save is
    only read as "trailing optional widgets missing" when every value lands on a widget that can hold it."""
    checks = {
        "INT": lambda v, _: isinstance(v, int) and not isinstance(v, bool),
        "FLOAT": lambda v, _: isinstance(v, (int, float)) and not isinstance(v, bool),
        "STRING": lambda v, _: isinstance(v, str),
        "BOOLEAN": lambda v, _: isinstance(v, bool),
        "COMBO": lambda v, opts: v in (opts.get("options") or [v]),
    }
    for name, value in inputs.items():
        kind, options = specs[name]
        if kind in checks and not checks[kind](value, options):
            return False
    return True


# -- built-in demo models -----------------------------------------------------------------------------


def is_base_checkpoint(name: str) -> bool:
    """Whether a checkpoint name looks like a base model (SD1.5 or SDXL base), not a fine-tune."""
    stem = PurePath(str(name).replace("\\", "/")).name.lower()
    return stem.startswith("v1-5-pruned") or "sd_xl_base" in stem


def needs_demo_models(prompt: dict) -> bool:
    """Whether an API prompt loads model files by name that ``use_demo_models`` would replace (checkpoints, Wan's
    separate loaders). The shipped examples load the built-in mini family and need no swap."""
    swapped = {"CheckpointLoaderSimple", *WAN_LOADER_SLOTS}
    return any(node["class_type"] in swapped for node in prompt.values())


def use_demo_models(prompt: dict) -> dict:
    """A copy of an API prompt that runs anywhere in seconds on a CPU.

    Every ``CheckpointLoaderSimple`` becomes the pack's tiny built-in ``DM_DemoCheckpointLoader``
    (same MODEL/CLIP/VAE output slots): variant ``base`` for base checkpoints (``is_base_checkpoint``),
    else ``finetune-a`` … ``finetune-d`` in order of appearance. ``EmptyLatentImage`` shrinks to 64×64 (unless
    the prompt loads the mini family, which draws 32×32), and
    the range-expert trainer runs at most ``DEMO_TRAINING_STEPS`` steps. Wan's separate loaders become the tiny
    built-in Wan experts (``_use_demo_wan``).
    """
    demo = copy.deepcopy(prompt)
    finetunes = iter(DEMO_FINETUNE_VARIANTS)
    # The mini family draws 32×32 pictures: a workflow that loads it keeps its own latent sizes.
    keep_sizes = any(node["class_type"] == MINI_LOADER for node in demo.values())
    for node_id, node in demo.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            name = node["inputs"].get("ckpt_name", "")
            variant = "base" if is_base_checkpoint(name) else next(finetunes, None)
            if variant is None:
                raise WorkflowError(f"node {node_id}: the demo has only four fine-tunes; '{name}' is a fifth one")
            node["class_type"] = DEMO_LOADER
            node["inputs"] = {"variant": variant, "seed": 0}
            node["_meta"] = {"title": f"{node.get('_meta', {}).get('title', 'Checkpoint')} (demo: {variant})"}
        elif node["class_type"] == "EmptyLatentImage" and not keep_sizes:
            for side in ("width", "height"):
                if not isinstance(node["inputs"].get(side), list):  # a linked size stays linked
                    node["inputs"][side] = DEMO_LATENT_SIZE
        elif node["class_type"] == DEMO_TRAINER and isinstance(node["inputs"].get("steps"), int):
            node["inputs"]["steps"] = min(node["inputs"]["steps"], DEMO_TRAINING_STEPS)
    _use_demo_wan(demo)
    return demo


def _use_demo_wan(demo: dict) -> None:
    """Wan's loaders (``UNETLoader``, ``CLIPLoader`` type wan, a Wan ``VAELoader``) become ``DM_DemoWanLoader``
    and the nodes they fed are re-linked to its MODEL, CLIP or VAE output; ``EmptyHunyuanLatentVideo`` shrinks
    to 64×64, one latent frame. A diffusion model's file name picks the expert: ``low_noise`` → the low-noise
    one, else (``high_noise``, or a single Wan 2.1 model) the high-noise one."""
    moved: dict[str, int] = {}
    for node_id, node in demo.items():
        kind = node["class_type"]
        if kind in WAN_LOADER_SLOTS:
            expert = _wan_expert(node_id, node)
            title = node.get("_meta", {}).get("title", kind)
            node["class_type"] = DEMO_WAN_LOADER
            node["inputs"] = {"expert": expert, "seed": 0}
            node["_meta"] = {"title": f"{title} (demo: Wan {expert})"}
            moved[node_id] = WAN_LOADER_SLOTS[kind]
        elif kind == "EmptyHunyuanLatentVideo":
            for name, size in (
                ("width", DEMO_LATENT_SIZE),
                ("height", DEMO_LATENT_SIZE),
                ("length", DEMO_VIDEO_LENGTH),
            ):
                if not isinstance(node["inputs"].get(name), list):
                    node["inputs"][name] = size
    for node in demo.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in moved and value[1] == 0:
                node["inputs"][name] = [value[0], moved[value[0]]]


def _wan_expert(node_id: str, node: dict) -> str:
    """The demo Wan expert that stands in for one of Wan's loaders (WorkflowError for a non-Wan one)."""
    inputs = node["inputs"]
    name = str(inputs.get("unet_name") or inputs.get("vae_name") or inputs.get("clip_name") or "").lower()
    is_wan = inputs.get("type") == "wan" if node["class_type"] == "CLIPLoader" else "wan" in name
    if not is_wan:
        raise WorkflowError(
            f"node {node_id} ({node['class_type']} '{name}'): the demo has stand-ins for Wan's separate loaders only"
        )
    return "low_noise" if "low_noise" in name else "high_noise"
