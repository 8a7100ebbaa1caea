"""Streaming checkpoint save: the file loads with the stock loader and samples like the patched MODEL."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffusion_merge.merging import SafetensorsFile
from diffusion_merge.nodes import checkpoints
from diffusion_merge.nodes import task_vectors as tv_nodes


@pytest.fixture
def detectable_pair(demo):
    base = demo.build_sd15(0, "base", **demo.SD15_DETECTABLE)
    finetuned = demo.build_sd15(0, "finetune-b", **demo.SD15_DETECTABLE)
    return base, finetuned


def saved_checkpoint(comfyui, prefix):
    return next((comfyui / "output" / "checkpoints").glob(f"{prefix}_*.safetensors"))


def test_streamed_checkpoint_of_a_patched_model_loads_and_samples_identically(detectable_pair, sample, comfyui):
    import nodes

    base, finetuned = detectable_pair
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0].scale(0.75)
    patched = tv_nodes.TaskVectorApplyNode.execute(base, vector, 1.0).result[0]
    context = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    expected = sample(patched, positive=context, negative=context)

    checkpoints.SaveCheckpointStreamingNode.execute(patched, "checkpoints/merged_test", "fp32")
    path = saved_checkpoint(comfyui, "merged_test")
    shutil.copy(path, comfyui / "models" / "checkpoints" / path.name)
    (loaded,) = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:1]
    assert torch.allclose(sample(loaded, positive=context, negative=context), expected, atol=1e-4, rtol=0)

    recipe = json.loads(SafetensorsFile(path).metadata["dm_recipe"])
    assert recipe == [vector.recipe]
    assert all(k.startswith("model.diffusion_model.") for k in SafetensorsFile(path))


def test_streamed_checkpoint_keeps_the_input_model_unpatched(detectable_pair, comfyui):
    base, finetuned = detectable_pair
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    patched = tv_nodes.TaskVectorApplyNode.execute(
        base, tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    ).result[0]
    checkpoints.SaveCheckpointStreamingNode.execute(patched, "checkpoints/untouched", "fp16")
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not base.patches


def test_checkpoint_with_clip_and_vae_uses_comfyui_layout(demo, comfyui):
    model, clip, vae = demo.build_sd15(0), demo.build_clip(0), demo.build_vae(0)
    checkpoints.SaveCheckpointStreamingNode.execute(model, "checkpoints/full", "fp16", clip, vae)
    keys = list(SafetensorsFile(saved_checkpoint(comfyui, "full")))
    assert any(k.startswith("cond_stage_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("model.diffusion_model.") for k in keys)
