"""``scripts/run_examples.py`` (the demo behind ``scripts/demo.sh``) writes a summary.json a person can act on:
node messages by node id, every output including the training plots, absolute paths."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]


def load_run_examples():
    import importlib.util

    scripts = str(PACK_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location("dm_scripts_run_examples", PACK_ROOT / "scripts" / "run_examples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fresh_copy(workflows, object_info: dict, folder: Path) -> Path:
    """deme_train with its own trainer seed and save names: another test may have run the example on this server
    before, and ComfyUI would then serve every node from its cache, writing and showing nothing new."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / "deme_train.json").read_text(encoding="utf-8"))
    layout = workflows.widget_layout(object_info["DM_TrainRangeExpertLoRA"])
    names = [name for name, _ in layout]
    seed_at = sum(1 + extra for _, extra in layout[: names.index("seed")])
    for node in workflow["nodes"]:
        if node["type"] == "DM_TrainRangeExpertLoRA":
            node["widgets_values"][seed_at] = 20241
        elif node["type"] == "DM_SaveRangeExpertLoRA":
            node["widgets_values"][0] = node["widgets_values"][0].replace("loras/", "summary_test/")
    path = folder / "deme_train.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    return path


def test_summary_keys_messages_by_node_id_and_lists_every_output(server, object_info, workflows, tmp_path):
    module = load_run_examples()
    workflow = fresh_copy(workflows, object_info, tmp_path)
    options = argparse.Namespace(out=tmp_path, workflows=[workflow], timeout=300.0)
    assert module.run(options, server) == 0
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    (result,) = summary["workflows"]
    assert result["status"] == "success", result["error"]

    savers = {k: m for k, m in result["messages"].items() if m["node"] == "DM_SaveRangeExpertLoRA"}
    assert len(savers) == 4, "four Save Range Expert LoRA nodes share a title; each keeps its own message"
    assert len({m["text"][0] for m in savers.values()}) == 4

    trainers = [node_id for node_id, images in result["previews"].items() if images]
    assert len(trainers) >= 4, "the trainers' loss/σ plots (temp folder) are listed"
    previews = [Path(path) for images in result["previews"].values() for path in images]
    assert all(tmp_path / "previews" / "deme_train" in path.parents for path in previews), "kept beside summary.json"
    savers = {node["id"]: node for node in json.loads(workflow.read_text())["nodes"] if node["type"] == "SaveImage"}
    assert sorted(map(int, result["images"])) == sorted(savers), "each saving node's pictures, by node id"
    for node_id, paths in result["images"].items():
        # a saving node served from ComfyUI's cache shows the files an earlier run of the same graph wrote
        assert len(paths) == 8 and all(Path(path).is_file() for path in paths), (node_id, paths)
    listed = result["outputs"] + [path for images in result["previews"].values() for path in images]
    assert listed and all(Path(path).is_absolute() and Path(path).is_file() for path in listed)
    assert sum(path.endswith(".safetensors") for path in result["outputs"]) >= 4
    assert Path(summary["output_dir"]).is_absolute() and summary["paths"].endswith("absolute")
