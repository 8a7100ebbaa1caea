"""A model file overwritten in place under a cached task vector: ComfyUI's cache and every read notice it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import safetensors.torch
import torch

from diffusion_merge.merging import load_task_vector, task_vector_from_files
from diffusion_merge.merging.io import StaleFileError
from diffusion_merge.nodes import task_vectors as tv_nodes

from ..conftest import new_prompt_executor


def unet_state(demo, variant: str) -> dict[str, torch.Tensor]:
    model = demo.build_sd15(0, variant)
    return {"model.diffusion_model." + k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def write_checkpoint(path, state, padding: int = 0):
    """Write ``state``; ``padding`` characters of metadata move every tensor to other offsets."""
    safetensors.torch.save_file(state, str(path), metadata={"padding": "x" * padding})
    return path


def overwrite_in_place(path, state, padding: int) -> None:
    """Rewrite the same file (same inode) with other bytes, a moment later (so its mtime differs)."""
    time.sleep(0.05)
    scratch = path.with_name(path.name + ".scratch")
    write_checkpoint(scratch, state, padding)
    data = scratch.read_bytes()
    scratch.unlink()
    with open(path, "r+b") as handle:  # in place: the inode an open reader holds sees the new bytes
        handle.write(data)
        handle.truncate()


def expected_delta(finetuned: dict, base: dict, key: str) -> torch.Tensor:
    return finetuned["model." + key].float() - base["model." + key].float()


class Session:
    """One PromptExecutor for several prompts, so that ComfyUI's cache carries over as in the server."""

    def __init__(self):
        import execution

        self.execution = execution
        self.executor = new_prompt_executor()

    def run(self, prompt: dict) -> dict:
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], valid[1]
        self.executor.server.events.clear()
        self.executor.execute(prompt, prompt_id, {"client_id": "tests"}, valid[2])
        errors = [data for event, data in self.executor.server.events if event == "execution_error"]
        assert self.executor.success, errors
        return self.executor.history_result["outputs"]


def save_prompt(finetuned: str, base: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "DM_TaskVectorFromFiles", "inputs": {"finetuned_file": finetuned, "base_file": base}},
        "2": {
            "class_type": "DM_TaskVectorSave",
            "inputs": {"task_vector": ["1", 0], "filename_prefix": prefix, "dtype": "fp32"},
        },
    }


def test_cached_task_vector_from_files_is_rebuilt_when_a_file_is_overwritten(comfyui, demo):
    folder = comfyui / "models" / "checkpoints"
    base, first, second = unet_state(demo, "base"), unet_state(demo, "finetune-a"), unet_state(demo, "finetune-b")
    write_checkpoint(folder / "stale_base.safetensors", base)
    finetuned_path = write_checkpoint(folder / "stale_ft.safetensors", first)
    session = Session()
    session.run(save_prompt("stale_ft.safetensors", "stale_base.safetensors", "task_vectors/stale_before"))

    overwrite_in_place(finetuned_path, second, padding=4096)  # same name, other tensors at other offsets
    session.run(save_prompt("stale_ft.safetensors", "stale_base.safetensors", "task_vectors/stale_after"))

    (saved,) = (comfyui / "output" / "task_vectors").glob("stale_after_*.safetensors")
    deltas = load_task_vector(saved)
    keys = deltas.keys()
    assert keys
    for key in keys:
        torch.testing.assert_close(deltas.delta(key, "cpu"), expected_delta(second, base, key), rtol=0, atol=1e-6)


def test_the_node_fingerprint_changes_with_the_file(comfyui, demo):
    folder = comfyui / "models" / "checkpoints"
    path = write_checkpoint(folder / "fingerprinted.safetensors", unet_state(demo, "base"))
    before = tv_nodes.TaskVectorFromFilesNode.fingerprint_inputs(
        "fingerprinted.safetensors", "fingerprinted.safetensors"
    )
    again = tv_nodes.TaskVectorFromFilesNode.fingerprint_inputs(
        "fingerprinted.safetensors", "fingerprinted.safetensors"
    )
    overwrite_in_place(path, unet_state(demo, "finetune-a"), padding=0)
    after = tv_nodes.TaskVectorFromFilesNode.fingerprint_inputs(
        "fingerprinted.safetensors", "fingerprinted.safetensors"
    )
    assert before == again and after != before
    missing = tv_nodes.TaskVectorLoadNode.fingerprint_inputs("no_such_file.safetensors")
    assert missing != missing  # NaN: ComfyUI runs the node, which then names the missing file


def test_a_read_after_the_file_changed_is_refused_naming_it(tmp_path, demo):
    base, first, second = unet_state(demo, "base"), unet_state(demo, "finetune-a"), unet_state(demo, "finetune-b")
    write_checkpoint(tmp_path / "base.safetensors", base)
    finetuned_path = write_checkpoint(tmp_path / "finetune.safetensors", first)
    vector = task_vector_from_files(finetuned_path, tmp_path / "base.safetensors")
    key = vector.keys()[0]
    torch.testing.assert_close(vector.delta(key, "cpu"), expected_delta(first, base, key))

    overwrite_in_place(finetuned_path, second, padding=4096)
    with pytest.raises(StaleFileError, match=r"'finetune\.safetensors' changed on disk"):
        for key in vector.keys():
            vector.delta(key, "cpu")
