"""``scripts/workflows.py`` on small hand-made workflows (no server): the editor's UI → API rules."""

from __future__ import annotations

import pytest

OBJECT_INFO = {
    "Loader": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "output": ["MODEL", "CLIP"],
    },
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "name": ["COMBO", {"options": ["euler", "heun"]}],
            },
            "optional": {"scale": ["FLOAT", {"default": 1.0}], "extra": ["INT", {"forceInput": True}]},
        },
        "input_order": {"required": ["model", "seed", "steps", "name"], "optional": ["scale", "extra"]},
        "output": ["LATENT"],
    },
    "Patch": {"input": {"required": {"model": ["MODEL", {}]}}, "output": ["MODEL"]},
    "Counter": {"input": {"required": {}}, "output": ["INT"]},
}


def node(node_id, type_, widgets=(), inputs=(), outputs=(), mode=0):
    return {
        "id": node_id,
        "type": type_,
        "mode": mode,
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
        "widgets_values": list(widgets),
    }


def sampler(node_id=3, model_link=1, steps_link=None):
    inputs = [("model", "MODEL", model_link), ("steps", "INT", steps_link)]
    return node(node_id, "Sampler", [7, "randomize", 30, "heun", 0.5], inputs, ["LATENT"])


def workflow(*nodes, links=()):
    return {"nodes": list(nodes), "links": [list(link) for link in links], "version": 0.4}


def test_widgets_by_position_links_by_source_and_notes_dropped(workflows):
    graph = workflow(
        node(1, "Loader", ["b.safetensors"], outputs=["MODEL", "CLIP"]),
        node(2, "Note", ["read me"]),
        node(4, "Counter", outputs=["INT"]),
        sampler(steps_link=2),
        links=[(1, 1, 0, 3, 0, "MODEL"), (2, 4, 0, 3, 1, "INT")],
    )
    prompt = workflows.workflow_to_prompt(graph, OBJECT_INFO)
    assert set(prompt) == {"1", "3", "4"}
    assert prompt["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    # seed's "randomize" is skipped; the linked steps widget takes the link; forceInput is no widget
    assert prompt["3"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": ["4", 0], "name": "heun", "scale": 0.5}


def test_reroute_and_bypassed_nodes_pass_links_through(workflows):
    graph = workflow(
        node(1, "Loader", ["a.safetensors"], outputs=["MODEL", "CLIP"]),
        node(5, "Reroute", [], [("", "*", 1)], ["MODEL"]),
        node(6, "Patch", [], [("model", "MODEL", 2)], ["MODEL"], mode=4),
        sampler(model_link=3),
        links=[(1, 1, 0, 5, 0, "MODEL"), (2, 5, 0, 6, 0, "MODEL"), (3, 6, 0, 3, 0, "MODEL")],
    )
    prompt = workflows.workflow_to_prompt(graph, OBJECT_INFO)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_unknown_node_type_and_widget_count_mismatch_are_named(workflows):
    with pytest.raises(workflows.WorkflowError, match=r"node 9 \(Mystery\): unknown node type"):
        workflows.workflow_to_prompt(workflow(node(9, "Mystery")), OBJECT_INFO)
    broken = sampler()
    broken["widgets_values"] = [7, 30, "heun", 0.5]  # the seed's UI value is missing
    with pytest.raises(workflows.WorkflowError, match=r"node 3 \(Sampler\): 4 widget values, expected 5"):
        workflows.workflow_to_prompt(workflow(broken), OBJECT_INFO)


def test_use_demo_models_swaps_loaders_and_shrinks_latents(workflows):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SD15/v1-5-pruned-emaonly.safetensors"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": ["9", 0], "batch_size": 2}},
    }
    demo = workflows.use_demo_models(prompt)
    assert [demo[i]["inputs"]["variant"] for i in "123"] == ["finetune-a", "base", "finetune-b"]
    assert {demo[i]["class_type"] for i in "123"} == {"DM_DemoCheckpointLoader"}
    assert demo["4"]["inputs"] == {"width": 64, "height": ["9", 0], "batch_size": 2}
    assert prompt["1"]["class_type"] == "CheckpointLoaderSimple"  # the input is not modified
    for node_id, name in (("5", "c"), ("6", "d"), ("7", "e")):
        prompt[node_id] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{name}.safetensors"}}
    with pytest.raises(workflows.WorkflowError, match="fifth"):
        workflows.use_demo_models(prompt)


def test_use_demo_models_caps_training_steps(workflows):
    prompt = {
        "1": {"class_type": "DM_TrainRangeExpertLoRA", "inputs": {"steps": 500, "seed": 0}},
        "2": {"class_type": "DM_TrainRangeExpertLoRA", "inputs": {"steps": 2}},
        "3": {"class_type": "DM_TrainRangeExpertLoRA", "inputs": {"steps": ["9", 0]}},
    }
    demo = workflows.use_demo_models(prompt)
    assert [demo[i]["inputs"]["steps"] for i in "123"] == [workflows.DEMO_TRAINING_STEPS, 2, ["9", 0]]
    assert prompt["1"]["inputs"]["steps"] == 500


def test_use_demo_models_keeps_the_latent_size_of_mini_family_workflows(workflows):
    prompt = {
        "1": {"class_type": "DM_LoadMiniModel", "inputs": {"variant": "base"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 8}},
    }
    assert workflows.use_demo_models(prompt) == prompt


def test_only_workflows_that_name_model_files_need_the_demo_models(workflows):
    mini = {"1": {"class_type": "DM_LoadMiniModel", "inputs": {"variant": "base"}}}
    assert not workflows.needs_demo_models(mini)
    for loader in ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader"):
        assert workflows.needs_demo_models({**mini, "2": {"class_type": loader, "inputs": {}}}), loader


DEMO_LOADER_INFO = {  # as /object_info describes DM_DemoCheckpointLoader: its seed opts out of the control
    "DM_DemoCheckpointLoader": {
        "input": {
            "required": {
                "variant": [["base", "finetune-a"], {"default": "base"}],
                "seed": ["INT", {"default": 0, "control_after_generate": False}],
            }
        },
        "input_order": {"required": ["variant", "seed"]},
        "output": ["MODEL", "CLIP", "VAE"],
    }
}


@pytest.mark.parametrize(
    "saved", [["finetune-a", 3], ["finetune-a", 3, "randomize"], ["finetune-a", 3, "fixed"]], ids=["now", "old", "old2"]
)
def test_demo_loader_seed_has_no_control_and_old_saves_still_convert(workflows, saved):
    info = DEMO_LOADER_INFO["DM_DemoCheckpointLoader"]
    assert workflows.widget_layout(info) == [("variant", 0), ("seed", 0)]
    graph = workflow(node(1, "DM_DemoCheckpointLoader", saved, outputs=["MODEL", "CLIP", "VAE"]))
    prompt = workflows.workflow_to_prompt(graph, DEMO_LOADER_INFO)
    assert prompt["1"]["inputs"] == {"variant": "finetune-a", "seed": 3}


def test_trailing_optional_widgets_added_later_may_be_missing(workflows):
    """A workflow saved before a node gained an optional widget (e.g. the save nodes' overflow) converts; the
    server then uses that widget's default."""
    info = {
        "Saver": {
            "input": {
                "required": {"prefix": ["STRING", {}], "dtype": [["fp16", "fp32"], {}]},
                "optional": {"overflow": [["error", "clamp"], {"default": "error"}]},
            },
            "output": [],
        }
    }
    old = workflows.workflow_to_prompt(workflow(node(1, "Saver", ["out", "fp16"])), info)
    assert old["1"]["inputs"] == {"prefix": "out", "dtype": "fp16"}
    new = workflows.workflow_to_prompt(workflow(node(1, "Saver", ["out", "fp16", "clamp"])), info)
    assert new["1"]["inputs"] == {"prefix": "out", "dtype": "fp16", "overflow": "clamp"}
    with pytest.raises(workflows.WorkflowError, match="1 widget values, expected 3"):
        workflows.workflow_to_prompt(workflow(node(1, "Saver", ["out"])), info)
    with pytest.raises(workflows.WorkflowError, match="2 widget values, expected 3"):  # not a dtype: not a shorter save
        workflows.workflow_to_prompt(workflow(node(1, "Saver", ["out", "clamp"])), info)


def test_use_demo_models_swaps_wans_loaders_and_relinks_clip_and_vae(workflows):
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"}},
        "2": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "Wan/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"},
        },
        "3": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"},
        },
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a fox"}},
        "6": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 8.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["4", 0]}},
        "8": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 640, "height": 640, "length": 81}},
    }
    demo = workflows.use_demo_models(prompt)
    assert [demo[i]["class_type"] for i in "1234"] == [workflows.DEMO_WAN_LOADER] * 4
    assert [demo[i]["inputs"]["expert"] for i in "12"] == ["high_noise", "low_noise"]
    assert demo["5"]["inputs"]["clip"] == ["3", 1] and demo["7"]["inputs"]["vae"] == ["4", 2]
    assert demo["6"]["inputs"]["model"] == ["2", 0] and demo["7"]["inputs"]["samples"] == ["8", 0]
    assert demo["8"]["inputs"] == {"width": 64, "height": 64, "length": 1}
    assert prompt["3"]["class_type"] == "CLIPLoader"  # the input is not modified
    for node in (
        {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
        {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl.safetensors", "type": "sd3"}},
        {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    ):
        with pytest.raises(workflows.WorkflowError, match="stand-ins for Wan's separate loaders only"):
            workflows.use_demo_models({"9": node})
