"""The save nodes refuse values the file's dtype cannot hold and NaN/Inf (clamping is opt-in); training stops
with an error when its loss turns non-finite."""

from __future__ import annotations

import pytest
import torch

from diffusion_merge.merging import SafetensorsFile
from diffusion_merge.nodes import checkpoints, training
from diffusion_merge.nodes import task_vectors as tv_nodes
from diffusion_merge.nodes.training_runtime import TrainingDiverged


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def huge_vector(tiny_sd15):
    """τ of a demo fine-tune scaled as seven Scale(10) nodes would: its deltas exceed fp16's 65504."""
    vector = tv_nodes.TaskVectorFromModelsNode.execute(tiny_sd15(0, "finetune-a"), tiny_sd15(0)).result[0]
    for _ in range(7):
        vector = tv_nodes.TaskVectorScaleNode.execute(vector, 10.0).result[0]
    return vector


def test_save_task_vector_refuses_fp16_overflow_naming_the_key(comfyui, huge_vector):
    folder = comfyui / "output" / "task_vectors"
    before = files_in(folder)
    with pytest.raises(ValueError, match=r"tensor 'diffusion_model\..+' \(\d+ of \d+\) has values up to .* fp16"):
        tv_nodes.TaskVectorSaveNode.execute(huge_vector, "task_vectors/overflow", "fp16")
    assert files_in(folder) == before  # no file, no temporary file
    tv_nodes.TaskVectorSaveNode.execute(huge_vector, "task_vectors/overflow_clamped", "fp16", overflow="clamp")
    (saved,) = folder.glob("overflow_clamped_*.safetensors")
    file = SafetensorsFile(saved)
    assert all(bool(torch.isfinite(file[key]).all()) for key in file)


def test_save_checkpoint_refuses_fp16_overflow(comfyui, tiny_sd15, huge_vector):
    patched = tv_nodes.TaskVectorApplyNode.execute(tiny_sd15(0), huge_vector, 1.0).result[0]
    folder = comfyui / "output" / "checkpoints"
    before = files_in(folder)
    with pytest.raises(ValueError, match=r"tensor 'model\.diffusion_model\..+' .* beyond the largest fp16 value"):
        checkpoints.SaveCheckpointStreamingNode.execute(patched, "checkpoints/overflow", "fp16")
    assert files_in(folder) == before
    checkpoints.SaveCheckpointStreamingNode.execute(patched, "checkpoints/overflow_fp32", "fp32")  # fp32 holds it


def test_training_stops_when_the_loss_turns_nonfinite(tiny_sd15):
    """lr 1 with SGD and no clipping diverges on the demo model within a few steps; before, it trained on
    through NaN and output a LoRA of NaNs."""
    generator = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(3, 4, 8, 8, generator=generator) * 0.5}
    positive = [[torch.randn(1, 77, 64, generator=generator), {}]]
    settings = dict(steps=20, batch_size=2, learning_rate=1.0, optimizer="SGD", grad_clip=0.0)
    settings |= dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, seed=0)
    with (
        torch.inference_mode(),
        pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ of 20: the loss is nan .*learning rate"),
    ):
        training.TrainRangeExpertLoRANode.execute(tiny_sd15(0), latents, positive, **settings)


def test_save_range_expert_lora_refuses_nan_weights_naming_them(comfyui):
    lora = {"a.lora_up.weight": torch.zeros(4, 2), "a.lora_down.weight": torch.full((2, 4), float("nan"))}
    folder = comfyui / "output" / "loras"
    before = files_in(folder)
    with pytest.raises(ValueError, match=r"1 of the 2 tensors of the LoRA hold NaN/Inf values: 'a\.lora_down\.weight'"):
        training.SaveRangeExpertLoRANode.execute(lora, "loras/diverged")
    assert files_in(folder) == before
