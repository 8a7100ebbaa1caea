"""The pack in ComfyUI's real frontend, driven in headless Chromium (``scripts/browser.py``).

Checks what an artist sees: the editor loads our extensions without errors, every DM_ node can be added
from the node search, every shipped workflow opens with no missing node or widget, saves back unchanged
and, converted by the editor itself, queues to success as it is (the examples load the built-in mini family;
no loader is swapped); the σ-range preview and the SuperDiff κ plot draw. Screenshots are kept in
``test-artifacts/browser/``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy
import pytest
from PIL import Image

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((PACK_ROOT / "example_workflows").glob("*.json"))
ARTIFACTS = PACK_ROOT / "test-artifacts" / "browser"
SERIES_COLORS = [(0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B)]  # the first two colours of routing.js / superdiff.js


def our_errors(editor, server) -> list:
    """Console errors and uncaught exceptions that come from the pack's own scripts."""
    return editor.errors_from(f"/extensions/{server.pack_folder}/")


def colored_pixels(png: bytes, color: tuple[int, int, int], tolerance: int = 12) -> int:
    """How many pixels of a screenshot are within ``tolerance`` of ``color`` on every channel."""
    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.int16)
    return int((numpy.abs(pixels - numpy.array(color, dtype=numpy.int16)) <= tolerance).all(axis=-1).sum())


def node_ids_of_type(loaded: dict, node_type: str) -> list[int]:
    return [node["id"] for node in loaded["nodes"] if node["type"] == node_type]


def queue_and_wait(server, editor, workflows, comfy_server) -> dict:
    """Queue the open graph exactly as the editor converts it (no loader swapped) and wait for it.
    Files are saved under ``output/browser_test/`` so that other tests' output checks do not see them."""
    prompt = editor.graph_to_prompt()
    assert not workflows.needs_demo_models(prompt), "a shipped example names model files a user may not have"
    for node in prompt.values():
        if isinstance(node["inputs"].get("filename_prefix"), str):
            node["inputs"]["filename_prefix"] = f"browser_test/{node['inputs']['filename_prefix']}"
    entry = server.wait(server.post_prompt(prompt, client_id=editor.client_id()), timeout=300)
    error = comfy_server.execution_error(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(error, indent=1)[:3000]
    return entry


# -- the editor ---------------------------------------------------------------------------------------


def test_editor_loads_our_extensions_without_errors(editor, server):
    names = editor.evaluate("() => app.extensions.map((e) => e.name)")
    expected = {"diffusion_merge.node_results", "diffusion_merge.superdiff_plot", "diffusion_merge.sigma_preview"}
    assert expected <= set(names), f"extensions registered: {sorted(n for n in names if 'diffusion' in n)}"
    assert not our_errors(editor, server), our_errors(editor, server)


def test_every_pack_node_can_be_added_from_the_node_search(editor, object_info, workflows):
    missing = []
    for node_id, info in sorted(object_info.items()):
        if not node_id.startswith("DM_"):
            continue
        added = editor.add_node_from_search(node_id)
        wanted = [name for name, _extra in workflows.widget_layout(info)]
        if len(added) != 1 or added[0][0] != node_id or not set(wanted) <= set(added[0][1]):
            missing.append((node_id, added, wanted))
    editor.clear()
    assert not missing, f"not added with the expected widgets: {missing}"


# -- the shipped workflows ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_example_workflow_opens_round_trips_and_queues(path, editor, server, workflows, comfy_server):
    workflow = json.loads(path.read_text())
    loaded = editor.load_workflow(workflow)

    unknown = [node["type"] for node in loaded["nodes"] if not node["registered"]]
    assert not unknown, f"missing node types: {unknown}"
    # a node without widgets is saved with "widgets_values": [] by older frontends and without it by newer ones
    saved = {node["id"]: node.get("widgets_values") or [] for node in loaded["saved"]["nodes"]}
    drift = {
        node["id"]: (node.get("widgets_values"), saved.get(node["id"]))
        for node in workflow["nodes"]
        if (node.get("widgets_values") or []) != saved.get(node["id"])
    }
    assert not drift, f"widgets_values changed by load + save: {drift}"
    assert len(loaded["saved"]["links"]) == len(workflow["links"])

    queue_and_wait(server, editor, workflows, comfy_server)
    assert not our_errors(editor, server), our_errors(editor, server)


# -- the demo loader's seed ------------------------------------------------------------------------------


def demo_loader_workflow() -> dict:
    """Two demo loaders saved by different versions — with the editor's old "control after generate" value
    after the seed, and without — feeding Task Vector from Models → Task Vector Info."""

    def loader(node_id, widgets, link):
        outputs = [{"name": "MODEL", "type": "MODEL", "links": [link]}]
        outputs += [{"name": kind, "type": kind, "links": []} for kind in ("CLIP", "VAE")]
        return {
            "id": node_id,
            "type": "DM_DemoCheckpointLoader",
            "pos": [0, 150 * node_id],
            "size": [320, 110],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": [],
            "outputs": outputs,
            "properties": {},
            "widgets_values": widgets,
        }

    sockets = [
        ("finetuned", "MODEL", 1),
        ("base", "MODEL", 2),
        ("clip_finetuned", "CLIP", None),
        ("clip_base", "CLIP", None),
    ]
    extract = {
        "id": 3,
        "type": "DM_TaskVectorFromModels",
        "pos": [400, 150],
        "size": [320, 150],
        "flags": {},
        "order": 2,
        "mode": 0,
        "properties": {},
        "widgets_values": ["", "error"],
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in sockets],
        "outputs": [{"name": "task_vector", "type": "DM_TASK_VECTOR", "links": [3]}],
    }
    info = {
        "id": 4,
        "type": "DM_TaskVectorInfo",
        "pos": [800, 150],
        "size": [320, 80],
        "flags": {},
        "order": 3,
        "mode": 0,
        "properties": {},
        "widgets_values": [],
        "inputs": [{"name": "task_vector", "type": "DM_TASK_VECTOR", "link": 3}],
        "outputs": [{"name": "summary", "type": "STRING", "links": []}],
    }
    nodes = [loader(1, ["base", 0, "randomize"], 2), loader(2, ["finetune-a", 0], 1), extract, info]
    links = [[1, 2, 0, 3, 0, "MODEL"], [2, 1, 0, 3, 1, "MODEL"], [3, 3, 0, 4, 0, "DM_TASK_VECTOR"]]
    return {
        "last_node_id": 4,
        "last_link_id": 3,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def wait_for_idle_queue(server, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.2)
    raise AssertionError("the editor's prompts did not finish")


def test_demo_loader_seed_stays_put_when_the_editor_runs(editor, server):
    """Old and new saves of the demo loader load; no "control after generate" widget appears, and running
    the graph from the editor twice leaves every seed where it was (it randomised them before)."""
    loaded = editor.load_workflow(demo_loader_workflow())
    assert not [node["type"] for node in loaded["nodes"] if not node["registered"]]
    widgets = "(id) => app.graph.getNodeById(id).widgets.map((w) => [w.name, w.value])"
    for node_id in (1, 2):
        assert [name for name, _ in editor.evaluate(widgets, node_id)] == ["variant", "seed"]
    for _ in range(2):
        editor.evaluate("async () => { await app.queuePrompt(0, 1); }")
        wait_for_idle_queue(server)
    assert editor.evaluate(widgets, 1) == [["variant", "base"], ["seed", 0]]
    assert editor.evaluate(widgets, 2) == [["variant", "finetune-a"], ["seed", 0]]
    saved = editor.evaluate("() => app.graph.serialize().nodes.map((n) => [n.id, n.widgets_values])")
    assert sorted(saved)[:2] == [[1, ["base", 0]], [2, ["finetune-a", 0]]]
    assert not our_errors(editor, server), our_errors(editor, server)
    editor.clear()


# -- what our extensions draw -------------------------------------------------------------------------


def test_sigma_preview_draws_the_experts_over_the_schedule(editor, server):
    loaded = editor.load_workflow(
        json.loads((PACK_ROOT / "example_workflows" / "routing_two_experts.json").read_text())
    )
    (routed,) = node_ids_of_type(loaded, "DM_RoutedModel")
    editor.fit_view([routed])
    editor.page.wait_for_function(
        "(id) => app.graph.getNodeById(id).dmPreview?.data?.sigmas?.length > 0", arg=routed, timeout=15_000
    )
    editor.settle()
    png = editor.page.screenshot(clip=editor.node_box(routed))
    (ARTIFACTS / "sigma_preview.png").write_bytes(png)

    first, second = (colored_pixels(png, color) for color in SERIES_COLORS)
    assert first > 200 and second > 50, f"expert bars not drawn: {first}, {second} pixels"
    saved = editor.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", routed)
    assert saved == ["resident"], "the preview must not add a serialised widget value"


def test_superdiff_plot_draws_after_a_run(editor, server, workflows, comfy_server):
    workflow = json.loads((PACK_ROOT / "example_workflows" / "superdiff_and_concepts.json").read_text())
    loaded = editor.load_workflow(workflow)
    plotting = node_ids_of_type(loaded, "DM_SuperDiffKSampler") + node_ids_of_type(loaded, "DM_SuperDiffTrace")
    assert plotting, "the example has no node that plots κ"
    queue_and_wait(server, editor, workflows, comfy_server)
    node_id = plotting[0]
    editor.page.wait_for_function("(id) => !!app.graph.getNodeById(id).dmSuperDiff", arg=node_id, timeout=15_000)
    editor.fit_view([node_id])
    png = editor.page.screenshot(clip=editor.node_box(node_id))
    (ARTIFACTS / "superdiff_plot.png").write_bytes(png)

    width, height = editor.evaluate("(id) => app.graph.getNodeById(id).size", node_id)
    assert width >= 320 and height >= 300, f"the node did not grow to hold the plot: {width}×{height}"
    kappa_lines = [colored_pixels(png, color, tolerance=40) for color in SERIES_COLORS]
    assert min(kappa_lines) > 30, f"κ curves not drawn: {kappa_lines} pixels"
