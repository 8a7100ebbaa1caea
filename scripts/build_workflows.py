"""Write the shipped example workflows (``example_workflows/*.json``, editor UI format, schema 0.4).

The workflows are described in ``scripts/workflow_definitions.py`` with the graph DSL of
``scripts/workflow_graph.py``; slot order, widget order, link types and defaults come from ComfyUI's own node
definitions (``/object_info`` computed in process), so the files match what the editor would save. Every
workflow is also converted to an API prompt and validated by ComfyUI exactly as shipped (no loader swapped),
so a file that would not run is never written.

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
from pathlib import Path
from typing import Any

import comfy_in_process
from comfy_in_process import find_comfyui
from workflow_definitions import WORKFLOWS
from workflow_graph import Graph, render
from workflows import needs_demo_models, workflow_to_prompt

PACK_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = PACK_ROOT / "example_workflows"


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


def validate_as_shipped(execution, name: str, workflow: dict, object_info: dict) -> None:
    """Convert the workflow as the editor queues it and let ComfyUI validate the prompt (raises if invalid); a
    shipped workflow must run as it is, so one that would need the demo models swapped in is refused too."""
    prompt = workflow_to_prompt(workflow, object_info)
    if needs_demo_models(prompt):
        raise ValueError(f"{name}: names checkpoints the user may not have; load the mini family instead")
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("build", prompt, None))
    if not ok:
        raise ValueError(f"{name}: ComfyUI rejects the prompt: {error} {json.dumps(node_errors)[:2000]}")


# -- command line -------------------------------------------------------------------------------------


def serialize(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def build_all(object_info: dict, execution, names: list[str] | None = None) -> dict[str, str]:
    """{file name: JSON text} of the workflows in ``WORKFLOWS`` (``names``, default all)."""
    if unknown := set(names or ()) - set(WORKFLOWS):
        raise SystemExit(f"unknown workflow(s) {sorted(unknown)}; known: {', '.join(WORKFLOWS)}")
    files = {}
    for name, describe in WORKFLOWS.items():
        if names and name not in names:
            continue
        graph = Graph(object_info)
        describe(graph)
        workflow = render(graph, name)
        validate_as_shipped(execution, name, workflow, object_info)
        files[f"{name}.json"] = serialize(workflow)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that are missing or out of date")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: example_workflows/)")
    parser.add_argument("names", nargs="*", help="only these workflows (default: all)")
    options = parser.parse_args(argv)
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    comfyui, _ = find_comfyui(PACK_ROOT)
    work = Path(tempfile.mkdtemp(prefix="dm-build-"))
    try:
        object_info, execution = load_object_info(comfyui, work)
        files = build_all(object_info, execution, options.names)
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
