"""Key names are normalised the same way for dicts and files, and key sets that barely meet are refused."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import diffusion_merge.merging as merging
from diffusion_merge.merging.keys import KeyMismatchError, normalise_key, normalised

UNET_KEYS = [f"input_blocks.{i}.0.weight" for i in range(3)] + ["out.2.weight", "out.2.bias"]


def checkpoint(seed: int, change: float = 0.0) -> dict[str, torch.Tensor]:
    """A checkpoint-layout state dict: UNet under ``model.diffusion_model.`` plus a VAE key."""
    generator = torch.Generator().manual_seed(seed)
    state = {f"model.diffusion_model.{k}": torch.randn(4, 3, generator=generator) for k in UNET_KEYS}
    if change:
        state = {
            k: v + change * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in state.items()
        }
    state["first_stage_model.decoder.weight"] = torch.ones(2)
    return state


@pytest.fixture
def files(tmp_path):
    base, finetuned = checkpoint(0), checkpoint(0, change=0.1)
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    safetensors.torch.save_file(finetuned, tmp_path / "ft.safetensors")
    return base, finetuned, tmp_path / "ft.safetensors", tmp_path / "base.safetensors"


def test_in_memory_and_file_task_vectors_use_the_same_key_names(files):
    base, finetuned, ft_path, base_path = files
    in_memory = merging.task_vector(finetuned, base)
    from_files = merging.task_vector_from_files(ft_path, base_path)
    unet = {f"diffusion_model.{k}" for k in UNET_KEYS}
    assert set(from_files.keys()) == unet
    assert unet <= set(in_memory) and "first_stage_model.decoder.weight" in in_memory
    for key in unet:
        torch.testing.assert_close(in_memory[key], from_files.delta(key, "cpu"))


def test_apply_to_a_checkpoint_state_dict_changes_every_unet_key(files):
    base, finetuned, ft_path, base_path = files
    applied = merging.apply_task_vector(base, merging.task_vector_from_files(ft_path, base_path))
    assert set(applied) == set(base)  # the checkpoint keeps its own key names
    for key in base:
        torch.testing.assert_close(applied[key], finetuned[key] if "diffusion_model" in key else base[key])


def test_merging_an_in_memory_and_a_file_task_vector_meets_key_by_key(files):
    base, finetuned, ft_path, base_path = files
    in_memory = merging.task_vector(finetuned, base)
    from_files = merging.task_vector_from_files(ft_path, base_path)
    merged = merging.merge_task_vectors([in_memory, from_files], "weighted", weights=[0.5, 0.5])
    for key in from_files.keys():
        torch.testing.assert_close(merged[key], from_files.delta(key, "cpu"))
    total = (merging.TaskVector(((1.0, merging.StoredDeltas(in_memory)),)) + from_files).delta(
        "diffusion_model.out.2.weight", "cpu"
    )
    torch.testing.assert_close(total, 2 * in_memory["diffusion_model.out.2.weight"])


def bare_unet_delta(files) -> dict[str, torch.Tensor]:
    base, finetuned, _, _ = files
    prefix = "model.diffusion_model."
    return {k.removeprefix(prefix): finetuned[k] - base[k] for k in base if k.startswith(prefix)}


def test_apply_refuses_a_task_vector_whose_keys_name_no_weight(files):
    base = files[0]
    with pytest.raises(KeyMismatchError) as raised:
        merging.apply_task_vector(base, bare_unet_delta(files))
    message = str(raised.value)
    assert "share 0 of their keys" in message
    assert "'input_blocks.0.0.weight'" in message and "'diffusion_model.input_blocks.0.0.weight'" in message
    assert "prefix" in message


def test_add_and_merge_refuse_task_vectors_that_barely_meet(files):
    _, _, ft_path, base_path = files
    from_files = merging.task_vector_from_files(ft_path, base_path)
    bare = merging.TaskVector(((1.0, merging.StoredDeltas(bare_unet_delta(files))),))
    with pytest.raises(KeyMismatchError, match="the first task vector and the second task vector share 0"):
        from_files + bare
    with pytest.raises(KeyMismatchError, match="share 0"):
        from_files - bare
    with pytest.raises(KeyMismatchError, match="task vector 1 and task vector 2 share 0"):
        merging.merge_task_vectors([from_files, bare_unet_delta(files)], "ties", k=0.5)


def test_disjoint_parts_of_one_base_still_add(files):
    _, _, ft_path, base_path = files
    early = merging.task_vector_from_files(ft_path, base_path, key_filter=r"input_blocks\.0\.")
    late = merging.task_vector_from_files(ft_path, base_path, key_filter=r"^diffusion_model\.out\.")
    both = early + late  # one base architecture: key filters may split it
    assert set(both.keys()) == set(early.keys()) | set(late.keys())
    merged = merging.merge_task_vectors([early, late], "weighted")
    assert set(merged) == set(both.keys())


def test_normalisation_refuses_two_names_for_one_parameter():
    assert normalise_key("model.diffusion_model.a.weight") == "diffusion_model.a.weight"
    assert normalise_key("cond_stage_model.a.weight") == "cond_stage_model.a.weight"
    with pytest.raises(ValueError, match="both"):
        normalised({"model.diffusion_model.a": torch.zeros(1), "diffusion_model.a": torch.zeros(1)})
