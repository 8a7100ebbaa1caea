"""The merge nodes' block-weight editor: the server route that names a model's blocks, and the dialog in the
real frontend (headless Chromium), which must write plain ``@NAME = x`` lines into ``weight_rules`` and nothing
else into the saved workflow. Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import struct
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = PACK_ROOT / "test-artifacts" / "browser"
SDXL_KEYS = list(json.loads((PACK_ROOT / "bench" / "sdxl_unet_shapes.json").read_text())["shapes"])
SDXL_GROUPS = ["embed", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)], "final"]
WAN_KEYS = [
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
    "time_projection.1.weight",
    *[f"blocks.{i}.self_attn.q.weight" for i in range(3)],
    "head.head.weight",
    "head.modulation",
]
DEMO_GROUPS = ["embed", "IN00", "IN01", "OUT00", "OUT01", "final"]  # the tiny UNet has no middle block
MINI_GROUPS = ["embed", *[f"IN{i:02d}" for i in range(4)], "M00", *[f"OUT{i:02d}" for i in range(4)], "final"]


def write_header_only_model(path: Path, keys: list[str]) -> None:
    """A valid safetensors file with the given keys, one fp16 value each (only the header matters here)."""
    header = {key: {"dtype": "F16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]} for i, key in enumerate(keys)}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(2 * len(keys)))


@pytest.fixture(scope="module")
def model_files(server):
    checkpoints, diffusion_models = server.model_folders["checkpoints"], server.model_folders["diffusion_models"]
    write_header_only_model(
        checkpoints / "dm_blocks_sdxl.safetensors",
        [f"model.diffusion_model.{key}" for key in SDXL_KEYS] + ["first_stage_model.decoder.conv_in.weight"],
    )
    write_header_only_model(diffusion_models / "dm_blocks_wan.safetensors", WAN_KEYS)
    write_header_only_model(checkpoints / "dm_blocks_other.safetensors", ["model.diffusion_model.layers.0.weight"])
    return server.model_folders


def blocks(server, **query) -> tuple[int, dict]:
    status, body = server.fetch("/diffusion_merge/blocks?" + urllib.parse.urlencode(query))
    return status, json.loads(body)


# -- the route ----------------------------------------------------------------------------------------


def test_route_lists_every_architecture_and_its_presets(server):
    status, menu = blocks(server)
    assert status == 200
    ids = {arch["id"]: arch["presets"] for arch in menu["architectures"]}
    assert set(ids) == {"sd1", "sdxl", "sd3", "flux", "wan", "qwen_image"}
    assert "Wan 2.1 14B / Wan 2.2 A14B" in ids["wan"]


def test_route_reads_a_checkpoint_header_and_a_diffusion_model_header(server, model_files):
    status, sdxl = blocks(server, folder="checkpoints", file="dm_blocks_sdxl.safetensors")
    assert status == 200, sdxl
    assert (sdxl["architecture"], sdxl["source"]) == ("sdxl", "dm_blocks_sdxl.safetensors")
    assert [group["name"] for group in sdxl["groups"]] == SDXL_GROUPS and sdxl["ungrouped"] == 0
    assert sum(group["keys"] for group in sdxl["groups"]) == len(SDXL_KEYS)
    status, wan = blocks(server, folder="diffusion_models", file="dm_blocks_wan.safetensors")
    assert status == 200 and wan["label"] == "Wan 2.1 / 2.2"
    assert [group["name"] for group in wan["groups"]] == ["embed", "B00", "B01", "B02", "final"]


def test_route_gives_demo_and_preset_groups(server):
    status, demo = blocks(server, demo="DM_DemoCheckpointLoader")
    assert status == 200 and [group["name"] for group in demo["groups"]] == DEMO_GROUPS
    status, mini = blocks(server, demo="DM_LoadMiniModel")
    assert status == 200 and [group["name"] for group in mini["groups"]] == MINI_GROUPS and not mini["ungrouped"]
    status, wan = blocks(server, demo="DM_DemoWanLoader")
    assert status == 200 and [group["name"] for group in wan["groups"]] == ["embed", "B00", "B01", "final"]
    status, flux = blocks(server, architecture="flux", preset="Flux.1 dev / schnell")
    assert status == 200 and len(flux["groups"]) == 1 + 19 + 38 + 1


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ({"folder": "checkpoints", "file": "dm_blocks_other.safetensors"}, 422, "cannot tell the architecture"),
        ({"folder": "checkpoints", "file": "missing.safetensors"}, 404, "was not found"),
        ({"folder": "checkpoints", "file": "../../../etc/passwd.safetensors"}, 404, "was not found"),
        ({"folder": "checkpoints", "file": "old.ckpt"}, 400, "not a .safetensors file"),
        ({"folder": "loras", "file": "x.safetensors"}, 400, "folder must be one of"),
        ({"demo": "KSampler"}, 400, "not one of the pack's demo loaders"),
        ({"architecture": "sd4"}, 400, "unknown architecture 'sd4'"),
        ({"architecture": "flux", "preset": "Flux.2"}, 400, "Flux has no preset"),
    ],
)
def test_route_refuses_bad_queries_with_a_message(server, model_files, query, status, message):
    got, answer = blocks(server, **query)
    assert got == status and message in answer["error"], answer


# -- the editor ---------------------------------------------------------------------------------------


def our_errors(editor, server) -> list:
    """Console errors and uncaught exceptions that come from the pack's own scripts."""
    return editor.errors_from(f"/extensions/{server.pack_folder}/")


def load_example(editor, checkpoint: str | None = None) -> tuple[dict, int, int]:
    """The shipped merge_ties example (its base loader made a Load Checkpoint of ``checkpoint`` if given);
    returns (loaded, merge node id, base loader id)."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / "merge_ties.json").read_text())
    if checkpoint:
        base = next(node for node in workflow["nodes"] if node.get("title") == "Base model")
        base["type"] = base["properties"]["Node name for S&R"] = "CheckpointLoaderSimple"
        base["properties"]["cnr_id"] = "comfy-core"
        base["widgets_values"] = [checkpoint]  # the same MODEL, CLIP, VAE outputs as Load Mini Model
    loaded = editor.load_workflow(workflow)
    (merge,) = [node["id"] for node in loaded["nodes"] if node["type"] == "DM_MergeTIES"]  # a string on newer editors
    base = next(node["id"] for node in loaded["saved"]["nodes"] if node.get("title") == "Base model")
    base = next(node["id"] for node in loaded["nodes"] if str(node["id"]) == str(base))
    return loaded, merge, base


def open_dialog(editor, node_id: int, rows: int) -> None:
    """Click the node's 'block weights…' button (its widget callback) and wait for the sliders."""
    editor.evaluate(
        """(id) => { const node = app.graph.getNodeById(id);
                     node.widgets.find((w) => w.name === "block weights…").callback(); }""",
        node_id,
    )
    editor.page.wait_for_function(
        "([id, rows]) => document.querySelectorAll("
        "`.dm-block-weights[data-node-id='${id}'] .dm-block`).length === rows",
        arg=[node_id, rows],
        timeout=15_000,
    )


def dialog_state(editor, node_id: int) -> dict:
    return editor.evaluate(
        """(id) => { const root = document.querySelector(`.dm-block-weights[data-node-id='${id}']`);
                     return { status: root.querySelector('.dm-status').textContent,
                              blocks: [...root.querySelectorAll('.dm-block')].map((row) => row.dataset.block),
                              values: Object.fromEntries([...root.querySelectorAll('.dm-block')].map(
                                (row) => [row.dataset.block, Number(row.querySelector('input[type=number]').value)])),
                              rules: app.graph.getNodeById(id).widgets.find(
                                (w) => w.name === 'weight_rules').value }; }""",
        node_id,
    )


def test_editor_shows_the_detected_blocks_and_writes_rule_lines(editor, server, model_files):
    loaded, merge, base = load_example(editor, "dm_blocks_sdxl.safetensors")
    saved_before = next(node for node in loaded["saved"]["nodes"] if str(node["id"]) == str(merge))["widgets_values"]
    editor.evaluate(
        """([merge, base]) => {
             app.graph.getNodeById(merge).widgets.find((w) => w.name === 'weight_rules').value =
               'attn2 = 0.5  # cross-attention\\n@in4 = 0.25';
           }""",
        [merge, base],
    )
    open_dialog(editor, merge, len(SDXL_GROUPS))
    state = dialog_state(editor, merge)
    assert state["blocks"] == SDXL_GROUPS
    assert state["status"].startswith("SDXL, detected from dm_blocks_sdxl.safetensors: 21 groups"), state["status"]
    assert state["values"]["IN04"] == 0.25 and state["values"]["OUT08"] == 1

    root = f".dm-block-weights[data-node-id='{merge}']"
    editor.page.locator(f"{root} .dm-block[data-block='M00'] input[type=range]").focus()
    editor.page.keyboard.press("ArrowLeft")
    editor.page.keyboard.press("ArrowLeft")
    number = editor.page.locator(f"{root} .dm-block[data-block='OUT02'] input[type=number]")
    number.fill("1.5")
    number.press("Enter")
    number.blur()
    editor.settle(0.2)
    rules = dialog_state(editor, merge)["rules"]
    assert rules == "attn2 = 0.5  # cross-attention\n@IN04 = 0.25\n@M00 = 0.9\n@OUT02 = 1.5"
    editor.page.screenshot(
        path=str(ARTIFACTS / "block_weights_dialog.png"), clip=editor.page.locator(root).bounding_box()
    )

    saved = editor.evaluate("(id) => app.graph.getNodeById(id).serialize()", merge)
    assert len(saved["widgets_values"]) == len(saved_before), "the editor must not add a saved widget value"
    assert saved["widgets_values"][:-1] == saved_before[:-1] and saved["widgets_values"][-1] == rules
    assert "block weights: architecture" not in (saved.get("properties") or {})
    prompt = editor.graph_to_prompt()
    assert prompt[str(merge)]["inputs"]["weight_rules"] == rules
    assert "block weights…" not in prompt[str(merge)]["inputs"]

    editor.page.locator(f"{root} .dm-close").click()
    assert editor.evaluate(f'() => document.querySelectorAll("{root}").length') == 0
    assert not our_errors(editor, server), our_errors(editor, server)


def test_editor_falls_back_to_a_chosen_architecture(editor, server, model_files):
    _, merge, _ = load_example(editor, "dm_not_on_this_server.safetensors")
    editor.evaluate(
        "(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'weight_rules').value = '@B03 = 2'; }",
        merge,
    )
    editor.evaluate(
        "(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'block weights…').callback()", merge
    )
    root = f".dm-block-weights[data-node-id='{merge}']"
    editor.page.wait_for_function(
        f"() => document.querySelector(\"{root} .dm-status\")?.textContent.includes('pick the architecture')",
        timeout=15_000,
    )
    assert "was not found" in dialog_state(editor, merge)["status"]
    editor.page.locator(f"{root} .dm-architecture").select_option("wan|Wan 2.1 14B / Wan 2.2 A14B")
    editor.page.wait_for_function(f'() => document.querySelectorAll("{root} .dm-block").length === 42')
    state = dialog_state(editor, merge)
    assert "chosen by hand" in state["status"] and state["values"]["B03"] == 2
    properties = editor.evaluate("(id) => app.graph.getNodeById(id).serialize().properties", merge)
    assert properties["block weights: architecture"] == "wan|Wan 2.1 14B / Wan 2.2 A14B"
    editor.page.locator(f"{root} .dm-close").click()


def test_rules_from_the_editor_merge_the_mini_family(editor, server, workflows, comfy_server):
    """The shipped example as it is (Load Mini Model feeding the merge): the editor shows the mini family's 11
    groups, a slider writes '@IN01 = 0.5', and the graph, converted by the editor, runs."""
    _, merge, _ = load_example(editor)
    editor.evaluate(
        "(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'weight_rules').value = ''; }", merge
    )
    open_dialog(editor, merge, len(MINI_GROUPS))
    state = dialog_state(editor, merge)
    assert state["blocks"] == MINI_GROUPS and "DM_LoadMiniModel (built in)" in state["status"]
    number = editor.page.locator(
        f".dm-block-weights[data-node-id='{merge}'] .dm-block[data-block='IN01'] input[type=number]"
    )
    number.fill("0.5")
    number.press("Enter")
    editor.settle(0.2)
    assert dialog_state(editor, merge)["rules"] == "@IN01 = 0.5"
    editor.page.locator(f".dm-block-weights[data-node-id='{merge}'] .dm-close").click()

    prompt = editor.graph_to_prompt()
    assert not workflows.needs_demo_models(prompt)
    for node in prompt.values():
        if isinstance(node["inputs"].get("filename_prefix"), str):
            node["inputs"]["filename_prefix"] = f"browser_test/{node['inputs']['filename_prefix']}"
    entry = server.wait(server.post_prompt(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", comfy_server.execution_error(entry)
    assert not our_errors(editor, server), our_errors(editor, server)
