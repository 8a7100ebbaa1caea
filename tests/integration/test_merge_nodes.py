"""Merge nodes in real ComfyUI: each method patches a clone of the base with exactly the library's merge."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from diffusion_merge.merging import SafetensorsFile, merge_task_vectors
from diffusion_merge.nodes import checkpoints, comfy_bridge
from diffusion_merge.nodes import merge as merge_nodes
from diffusion_merge.nodes import task_vectors as tv_nodes

METHOD_CASES = [
    (merge_nodes.MergeTaskArithmeticNode, {"lam": 0.8}, "weighted", {"lam": 0.8}),
    (merge_nodes.MergeTIESNode, {"k": 0.3, "topk_scope": "global"}, "ties", {"k": 0.3}),
    (merge_nodes.MergeTIESNode, {"k": 0.3, "topk_scope": "per_tensor"}, "ties", {"k": 0.3, "topk_scope": "per_tensor"}),
    (merge_nodes.MergeDARENode, {"p": 0.5, "seed": 3, "sign": "mass"}, "dare", {"p": 0.5, "seed": 3, "sign": "mass"}),
    (merge_nodes.MergeLocalizeAndStitchNode, {"k": 0.1}, "las", {"k": 0.1}),
    (merge_nodes.MergeDRMNode, {"drop_rate": 0.5, "direction": "auto"}, "drm", {"drop_rate": 0.5, "direction": "auto"}),
]


def extract(finetuned, base):
    return tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]


def stack_of(*entries):
    stack = None
    for vector, weight in entries:
        stack = merge_nodes.TaskVectorStackNode.execute(vector, weight, stack).result[0]
    return stack


@pytest.fixture
def family(tiny_sd15):
    base = tiny_sd15(0, "base")
    return base, extract(tiny_sd15(0, "finetune-a"), base), extract(tiny_sd15(0, "finetune-b"), base)


@pytest.mark.parametrize(("node", "node_params", "method", "params"), METHOD_CASES, ids=lambda c: str(c)[:20])
def test_merged_model_is_base_plus_the_library_merge(family, node, node_params, method, params):
    base, tau_a, tau_b = family
    patched, merged = node.execute(base, stack_of((tau_a, 1.0), (tau_b, 0.7)), **node_params).result
    expected = merge_task_vectors([tau_a, tau_b], method, weights=[1.0, 0.7], device="cpu", **params)
    effective = comfy_bridge.model_weights(patched)
    stored = base.model.state_dict()
    assert sorted(merged.keys()) == sorted(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(effective[key] - stored[key], delta, rtol=0, atol=1e-6)
    assert not base.patches


def test_deme_weights_reproduce_weighted_task_arithmetic(tiny_sd15, sample):
    base = tiny_sd15(0, "base")
    experts = [tiny_sd15(0, variant) for variant in ("finetune-a", "finetune-b", "finetune-a", "finetune-b")]
    weights = (0.1, 0.1, 0.2, 0.5)
    stack = stack_of(*((extract(expert, base), w) for expert, w in zip(experts, weights, strict=True)))
    merged_model = merge_nodes.MergeTaskArithmeticNode.execute(base, stack).result[0]
    by_hand = base.clone()
    for expert, w in zip(experts, weights, strict=True):
        by_hand = tv_nodes.TaskVectorApplyNode.execute(by_hand, extract(expert, base), w).result[0]
    assert (sample(merged_model) - sample(by_hand)).abs().max() <= 1e-4


def test_merged_model_and_streamed_checkpoint_sample_identically(demo, sample, comfyui):
    import nodes

    base = demo.build_sd15(0, "base", **demo.SD15_DETECTABLE)
    taus = [extract(demo.build_sd15(0, v, **demo.SD15_DETECTABLE), base) for v in ("finetune-a", "finetune-b")]
    patched, merged = merge_nodes.MergeTIESNode.execute(base, stack_of((taus[0], 1.0), (taus[1], 1.0)), k=0.5).result
    checkpoints.SaveCheckpointStreamingNode.execute(patched, "checkpoints/ties_merge", "fp32")
    path = next((comfyui / "output" / "checkpoints").glob("ties_merge_*.safetensors"))
    shutil.copy(path, comfyui / "models" / "checkpoints" / path.name)
    loaded = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[0]
    context = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4)), {}]]
    expected = sample(patched, positive=context, negative=context)
    assert (sample(loaded, positive=context, negative=context) - expected).abs().max() <= 1e-4

    (recipe,) = json.loads(SafetensorsFile(path).metadata["dm_recipe"])
    assert recipe == merged.recipe
    (entry,) = recipe["sum"]
    assert entry["method"] == "ties" and entry["k"] == 0.5 and len(entry["inputs"]) == 2


def test_merged_task_vector_saves_and_reloads(family, comfyui):
    base, tau_a, tau_b = family
    merged = merge_nodes.MergeDARENode.execute(base, stack_of((tau_a, 1.0), (tau_b, 1.0)), p=0.3).result[1]
    tv_nodes.TaskVectorSaveNode.execute(merged, "task_vectors/dare_merge", "fp32")
    path = next((comfyui / "output" / "task_vectors").glob("dare_merge_*.safetensors"))
    reloaded = tv_nodes.TaskVectorLoadNode.execute(path.name).result[0]
    assert json.loads(SafetensorsFile(path).metadata["dm_recipe"]) == merged.recipe
    for key in merged.keys():
        assert torch.equal(reloaded.delta(key, "cpu"), merged.delta(key, "cpu"))


def test_weight_rules_scale_blocks(family):
    base, tau_a, tau_b = family
    stack = stack_of((tau_a, 1.0), (tau_b, 1.0))
    plain = merge_nodes.MergeTaskArithmeticNode.execute(base, stack).result[1]
    ruled = merge_nodes.MergeTaskArithmeticNode.execute(
        base, stack, 1.0, "@output = 0\nattn2 = 0.5  # cross-attention"
    ).result[1]
    out_key = "diffusion_model.output_blocks.0.0.in_layers.2.weight"
    attn_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.count_nonzero(plain.delta(out_key, "cpu")) > 0
    assert torch.count_nonzero(ruled.delta(out_key, "cpu")) == 0
    torch.testing.assert_close(ruled.delta(attn_key, "cpu"), 0.5 * plain.delta(attn_key, "cpu"))
    with pytest.raises(ValueError, match="line 1"):
        merge_nodes.MergeTaskArithmeticNode.execute(base, stack, 1.0, "no equals sign here")
    with pytest.raises(ValueError, match="unknown block 'nowhere'"):
        merge_nodes.MergeTaskArithmeticNode.execute(base, stack, 1.0, "@nowhere = 1")


def test_merge_inputs_are_untouched(family):
    base, tau_a, tau_b = family
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    merge_nodes.MergeTIESNode.execute(base, stack_of((tau_a, 1.0), (tau_b, 1.0)))
    assert not base.patches
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


# -- bad input ----------------------------------------------------------------------------------------


def test_empty_stack_is_refused(family):
    with pytest.raises(ValueError, match="stack is empty"):
        merge_nodes.run_merge(family[0], (), "weighted")


def test_task_vector_of_another_architecture_is_refused(family, tiny_flux):
    base, tau_a, _ = family
    flux_tau = extract(tiny_flux(0, "finetune-a"), tiny_flux(0))
    with pytest.raises(ValueError, match=r"task vector 2\)"):
        merge_nodes.MergeTIESNode.execute(base, stack_of((tau_a, 1.0), (flux_tau, 1.0)))


def test_task_vector_of_another_base_warns(family, tiny_sd15, caplog):
    base, tau_a, _ = family
    other = extract(tiny_sd15(5, "finetune-a"), tiny_sd15(5))
    with caplog.at_level(logging.WARNING):
        merge_nodes.MergeTaskArithmeticNode.execute(base, stack_of((tau_a, 1.0), (other, 1.0)))
    assert "task vector 2 was extracted from another base model" in caplog.text
    assert "task vector 1 " not in caplog.text


@pytest.mark.parametrize(
    ("node", "params", "name"),
    [(merge_nodes.MergeTIESNode, {"k": 0.0}, "k"), (merge_nodes.MergeDARENode, {"p": 1.0}, "p")],
)
def test_fractions_outside_their_range_are_refused(family, node, params, name):
    base, tau_a, tau_b = family
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        node.execute(base, stack_of((tau_a, 1.0), (tau_b, 1.0)), **params)


def test_nan_in_a_delta_is_named(family, tiny_sd15):
    base, tau_a, _ = family
    broken = tiny_sd15(0, "finetune-b")
    key = "diffusion_model.out.2.bias"
    broken.add_patches({key: (torch.full_like(base.model.state_dict()[key], float("nan")),)}, 1.0)
    with pytest.raises(ValueError, match=r"out\.2\.bias"):
        merge_nodes.MergeTIESNode.execute(base, stack_of((tau_a, 1.0), (extract(broken, base), 1.0)))


def test_merge_runs_as_a_prompt(run_prompt):
    prompt = {
        "1": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "base", "seed": 0}},
        "2": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "finetune-a", "seed": 0}},
        "3": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "finetune-b", "seed": 0}},
        "4": {"class_type": "DM_TaskVectorFromModels", "inputs": {"finetuned": ["2", 0], "base": ["1", 0]}},
        "5": {"class_type": "DM_TaskVectorFromModels", "inputs": {"finetuned": ["3", 0], "base": ["1", 0]}},
        "6": {"class_type": "DM_TaskVectorStack", "inputs": {"task_vector": ["4", 0], "weight": 1.0}},
        "7": {
            "class_type": "DM_TaskVectorStack",
            "inputs": {"task_vector": ["5", 0], "weight": 0.5, "stack": ["6", 0]},
        },
        "8": {
            "class_type": "DM_MergeTIES",
            "inputs": {
                "base": ["1", 0],
                "task_vectors": ["7", 0],
                "k": 0.2,
                "topk_scope": "global",
                "sign": "mass",
                "lam": 1.0,
            },
        },
        "9": {"class_type": "DM_TaskVectorInfo", "inputs": {"task_vector": ["8", 1]}},
    }
    outputs = run_prompt(prompt)
    assert "keys:" in outputs["9"]["text"][0]
