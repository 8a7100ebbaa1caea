"""The pack inside a real ComfyUI server: registration, the shipped example, errors, templates, web files."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]
EXPECTED_NODES = {"DM_TaskVectorFromModels", "DM_TaskVectorSave", "DM_TaskVectorApply", "DM_DemoCheckpointLoader"}
EXAMPLE = PACK_ROOT / "example_workflows" / "task_vectors.json"


def pack_nodes(object_info: dict) -> dict[str, dict]:
    return {node_id: info for node_id, info in object_info.items() if node_id.startswith("DM_")}


def description_problems(node_id: str, info: dict) -> list[str]:
    """What is missing from a node's self-description (description, category, input tooltips)."""
    problems = []
    if not (info.get("description") or "").strip():
        problems.append(f"{node_id}: no description")
    if not info.get("category", "").startswith("diffusion_merge/"):
        problems.append(f"{node_id}: category {info.get('category')!r} is not under diffusion_merge/")
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if not (options.get("tooltip") or "").strip():
                problems.append(f"{node_id}: input '{name}' has no tooltip")
    return problems


def save_prompt(filename_prefix: str) -> dict:
    """API prompt: τ between two demo models, saved with the given prefix."""
    return {
        "1": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "base", "seed": 0}},
        "2": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "finetune-a", "seed": 0}},
        "3": {"class_type": "DM_TaskVectorFromModels", "inputs": {"finetuned": ["2", 0], "base": ["1", 0]}},
        "4": {
            "class_type": "DM_TaskVectorSave",
            "inputs": {"task_vector": ["3", 0], "filename_prefix": filename_prefix, "dtype": "fp16"},
        },
    }


def assert_success(entry: dict, comfy_server) -> None:
    error = comfy_server.execution_error(entry)
    assert entry["status"]["status_str"] == "success", f"prompt failed: {json.dumps(error, indent=1)[:3000]}"


# -- registration -------------------------------------------------------------------------------------


def test_pack_nodes_are_registered_and_describe_themselves(object_info):
    nodes = pack_nodes(object_info)
    missing = sorted(EXPECTED_NODES - set(nodes))
    assert not missing, f"not in /object_info: {missing}"
    problems = [problem for node_id, info in sorted(nodes.items()) for problem in description_problems(node_id, info)]
    assert not problems, "\n".join(problems)


def test_every_pack_node_has_a_served_docs_page(object_info, server):
    nodes = sorted(pack_nodes(object_info))
    missing = [node_id for node_id in nodes if not (PACK_ROOT / "web" / "docs" / f"{node_id}.md").is_file()]
    assert not missing, f"no web/docs/<id>.md for: {missing}"
    folder = urllib.parse.quote(server.pack_folder)
    unserved = [node_id for node_id in nodes if server.fetch(f"/extensions/{folder}/docs/{node_id}.md")[0] != 200]
    assert not unserved, f"docs not served for: {unserved}"


# -- the shipped example ------------------------------------------------------------------------------


def test_task_vector_example_runs_as_shipped(server, object_info, workflows, comfy_server):
    prompt = workflows.workflow_to_prompt(json.loads(EXAMPLE.read_text()), object_info)
    assert not workflows.needs_demo_models(prompt)
    loaders = [node["inputs"]["variant"] for node in prompt.values() if node["class_type"] == "DM_LoadMiniModel"]
    assert loaders == ["base", "footwear"]

    entry = server.wait(server.post_prompt(prompt))
    assert_success(entry, comfy_server)
    by_type = {prompt[node_id]["class_type"]: ui for node_id, ui in entry["outputs"].items()}
    images = [image for node_id, ui in entry["outputs"].items() for image in ui.get("images", [])
              if prompt[node_id]["class_type"] == "SaveImage"]  # fmt: skip
    assert len(images) == 16 and all(image["subfolder"] == "diffusion_merge" for image in images)
    for image in images:
        assert (server.output_dir / image["subfolder"] / image["filename"]).stat().st_size > 0
    message = by_type["DM_TaskVectorSave"]["text"][0]  # other tests may have run the example on this server
    saved = [p for p in (server.output_dir / "task_vectors").glob("footwear_half_*.safetensors") if p.name in message]
    assert len(saved) == 1 and saved[0].stat().st_size > 0
    assert "keys:" in by_type["DM_TaskVectorInfo"]["text"][0]


# -- errors -------------------------------------------------------------------------------------------


def test_escaping_save_prefix_fails_cleanly_and_the_server_recovers(server, comfy_server):
    entry = server.wait(server.post_prompt(save_prompt("../escape")))
    assert entry["status"]["status_str"] == "error"
    error = comfy_server.execution_error(entry)
    assert error is not None and error["node_type"] == "DM_TaskVectorSave"
    assert "output folder" in error["exception_message"]
    assert not list(server.work.glob("escape*")), "a file was written next to the output folder"

    entry = server.wait(server.post_prompt(save_prompt("task_vectors/after_error")))
    assert_success(entry, comfy_server)
    assert list((server.output_dir / "task_vectors").glob("after_error_*.safetensors"))


# -- what the editor fetches --------------------------------------------------------------------------


def test_workflow_templates_list_and_serve_the_example(server):
    templates = server.get("/api/workflow_templates")
    assert "task_vectors" in templates.get(server.pack_folder, []), templates
    folder = urllib.parse.quote(server.pack_folder)
    assert server.get(f"/api/workflow_templates/{folder}/task_vectors.json") == json.loads(EXAMPLE.read_text())


def test_web_extension_files_are_listed_and_served(server):
    web = PACK_ROOT / "web"
    prefix = f"/extensions/{urllib.parse.quote(server.pack_folder)}/"
    expected = {prefix + path.relative_to(web).as_posix() for path in web.rglob("*.js")}
    assert prefix + "js/diffusion_merge.js" in expected, "web/js/diffusion_merge.js is missing from the pack"
    listed = {url for url in server.get("/extensions") if url.startswith(prefix)}
    assert listed == expected
    status, body = server.fetch(prefix + "js/diffusion_merge.js")
    assert status == 200 and body.strip()


def test_every_example_workflow_has_a_served_thumbnail(server):
    folder = urllib.parse.quote(server.pack_folder)
    problems = []
    for workflow in sorted((PACK_ROOT / "example_workflows").glob("*.json")):
        thumbnail = workflow.with_suffix(".jpg")
        if not thumbnail.is_file():
            problems.append(f"{thumbnail.name}: missing (run scripts/make_thumbnails.py)")
            continue
        status, content = server.fetch(f"/api/workflow_templates/{folder}/{thumbnail.name}")
        if status != 200 or content != thumbnail.read_bytes():
            problems.append(f"{thumbnail.name}: not served (HTTP {status})")
        elif not content.startswith(b"\xff\xd8\xff") or len(content) < 5_000:
            problems.append(f"{thumbnail.name}: not a JPEG picture ({len(content)} bytes)")
    assert not problems, "\n".join(problems)


def test_demo_loader_seed_is_never_randomised_by_the_editor(object_info, workflows):
    """The editor adds "control after generate: randomize" to INT inputs named seed unless they opt out; the
    demo loader's seed picks the base weights, so every loader of a merge must keep the same one."""
    info = object_info["DM_DemoCheckpointLoader"]
    assert info["input"]["required"]["seed"][1].get("control_after_generate") is False
    assert workflows.widget_layout(info) == [("variant", 0), ("seed", 0)]
