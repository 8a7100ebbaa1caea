"""The shipped DeMe training example inside a real ComfyUI server, as shipped (the built-in mini family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

EXAMPLE = Path(__file__).resolve().parents[2] / "example_workflows" / "deme_train.json"


def test_deme_example_trains_merges_and_routes_four_experts(server, object_info, workflows, comfy_server):
    prompt = workflows.workflow_to_prompt(json.loads(EXAMPLE.read_text()), object_info)
    assert not workflows.needs_demo_models(prompt)
    trainers = [node for node in prompt.values() if node["class_type"] == "DM_TrainRangeExpertLoRA"]
    ranges = sorted((node["inputs"]["range_min"], node["inputs"]["range_max"]) for node in trainers)
    assert ranges == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert all(node["inputs"]["steps"] <= 50 for node in trainers), "the example must stay quick when queued"
    stacks = [node["inputs"]["weight"] for node in prompt.values() if node["class_type"] == "DM_TaskVectorStack"]
    assert stacks == [0.1, 0.1, 0.2, 0.5]

    entry = server.wait(server.post_prompt(prompt))
    error = comfy_server.execution_error(entry)
    assert entry["status"]["status_str"] == "success", f"prompt failed: {json.dumps(error, indent=1)[:3000]}"
    outputs = entry["outputs"]
    trainer_ids = [i for i, node in prompt.items() if node["class_type"] == "DM_TrainRangeExpertLoRA"]
    assert all(outputs[i]["images"] for i in trainer_ids)  # loss curve + σ histogram on every trainer
    saved = sorted(p.name for p in (server.output_dir / "loras").glob("deme_expert_t*.safetensors"))
    assert len(saved) == 4
    images = {p.name.rsplit("_", 2)[0] for p in (server.output_dir / "diffusion_merge").glob("deme_*.png")}
    assert {"deme_base", "deme_merged", "deme_routed"} <= images
