"""Recipes: every saved file says how it was made, by input file name and hash; re-running a recipe gives the
same values and the same recipe; missing or changed inputs and things that are not files are refused clearly."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from diffusion_merge import merging
from diffusion_merge.merging import file_identity
from diffusion_merge.merging.io import SafetensorsFile
from diffusion_merge.merging.merge import merge_to_task_vector
from diffusion_merge.merging.recipes import (
    RecipeError,
    RecipeInputChanged,
    RecipeInputMissing,
    read_recipe,
    recipe_of,
    run_recipe,
)
from diffusion_merge.merging.task_vectors import StoredDeltas, TaskVector

SHAPES = {
    "input_blocks.0.0.weight": (8, 4, 3, 3),
    "input_blocks.0.0.bias": (8,),
    "input_blocks.1.1.proj.weight": (8, 8),
    "middle_block.1.norm.weight": (8,),
    "output_blocks.0.0.weight": (6, 8),
    "out.2.weight": (4, 6),
}


def weights(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(shape, generator=g) for k, shape in SHAPES.items()}


@pytest.fixture
def files(tmp_path):
    """base, three fine-tunes of it (checkpoint layout, fp32) in ``tmp_path/models``."""
    folder = tmp_path / "models"
    folder.mkdir()
    base = weights(0)
    paths = {}
    for name, seed in (("base", None), ("ft_a", 1), ("ft_b", 2), ("ft_c", 3)):
        state = base if seed is None else {k: v + 0.1 * weights(seed)[k] for k, v in base.items()}
        path = folder / f"{name}.safetensors"
        safetensors.torch.save_file({"model.diffusion_model." + k: v for k, v in state.items()}, path)
        paths[name] = path
    return paths


def tau(files, name, **kwargs):
    return merging.task_vector_from_files(files[name], files["base"], **kwargs)


def roundtrip(recipe: dict) -> dict:
    """The recipe as it comes back from a file (JSON)."""
    return json.loads(json.dumps(recipe))


def assert_same_values(a: TaskVector, b: TaskVector) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        torch.testing.assert_close(a.delta(key, "cpu"), b.delta(key, "cpu"), rtol=0, atol=0)


def rerun(recipe: dict, files) -> TaskVector:
    return run_recipe(roundtrip(recipe), folders=[files["base"].parent])


# -- task vectors from files and their algebra --------------------------------------------------------


def test_task_vector_from_files_reruns_to_the_same_values_and_recipe(files):
    vector = tau(files, "ft_a")
    recipe = recipe_of(vector)
    assert recipe["rerunnable"] and recipe["problems"] == []
    assert [entry["file"] for entry in recipe["inputs"].values()] == ["ft_a.safetensors", "base.safetensors"]
    again = rerun(recipe, files)
    assert_same_values(again, vector)
    assert recipe_of(again) == recipe
    assert again.base_fingerprint == vector.base_fingerprint and again.sources == vector.sources


def test_scale_add_negate_subtract_and_select_rerun(files):
    a, b, c = tau(files, "ft_a"), tau(files, "ft_b", key_filter="blocks"), tau(files, "ft_c", nonfinite="skip")
    vector = (a.scale(0.5) + (-b) - c * 2.0).select(r"input_blocks|out\.")
    recipe = recipe_of(vector)
    again = rerun(recipe, files)
    assert_same_values(again, vector)
    assert recipe_of(again) == recipe
    assert recipe["task_vector"]["sum"][0]["coefficient"] == 0.5
    assert recipe["task_vector"]["sum"][0]["leaf"]["op"] == "select"
    assert len(recipe["inputs"]) == 4  # base once, whatever the number of differences using it


MERGES = [
    ("weighted", {"lam": 0.8}),
    ("ties", {"k": 0.5, "topk_scope": "global"}),
    ("ties", {"k": 0.3, "topk_scope": "per_tensor", "sign": "count"}),
    ("dare", {"p": 0.5, "seed": 7, "sign": "mass"}),
    ("las", {"k": 0.2}),
    ("drm", {"drop_rate": 0.5, "direction": "auto", "conv": True}),
]


@pytest.mark.parametrize(("method", "params"), MERGES, ids=lambda v: v if isinstance(v, str) else None)
def test_every_merge_method_with_block_and_key_weights_reruns(files, method, params):
    vectors = [tau(files, "ft_a"), tau(files, "ft_b").scale(0.7), tau(files, "ft_c")]
    merged = merge_to_task_vector(
        vectors,
        method,
        weights=[1.0, 0.5, 0.25],
        key_weights=[("proj", 0.5)],
        block_weights={"output": 2.0},
        storage_dtype=torch.float16,
        **params,
    )
    recipe = recipe_of(merged)
    leaf = recipe["task_vector"]["sum"][0]["leaf"]
    assert leaf["op"] == "merge" and leaf["method"] == method and leaf["storage_dtype"] == "float16"
    assert leaf["params"]["block_weights"] == {"output": 2.0} and leaf["params"]["key_weights"] == [["proj", 0.5]]
    assert leaf["params"]["weights"] == [1.0, 0.5, 0.25]
    again = rerun(recipe, files)
    assert_same_values(again, merged)
    assert recipe_of(again) == recipe


def test_a_merge_of_merges_reruns(files):
    inner = merge_to_task_vector([tau(files, "ft_a"), tau(files, "ft_b")], "ties", k=0.5)
    outer = merge_to_task_vector([inner, tau(files, "ft_c")], "weighted", weights=[0.5, 0.5])
    recipe = recipe_of(outer)
    again = rerun(recipe, files)
    assert_same_values(again, outer)
    assert recipe_of(again) == recipe


# -- written files: task vectors, checkpoints, LoRAs -------------------------------------------------


def file_recipe(path) -> dict:
    return json.loads(SafetensorsFile(path).metadata["dm_rerun_recipe"])


def test_saved_task_vector_file_reruns_to_an_identical_file(files, tmp_path):
    first = merging.save_task_vector(tau(files, "ft_a") - tau(files, "ft_b"), tmp_path / "tv.safetensors", "bf16")
    again = run_recipe(first, tmp_path / "again.safetensors", folders=[files["base"].parent])
    assert file_recipe(again) == file_recipe(first)
    assert file_recipe(first)["result"] == {"kind": "task_vector", "dtype": "bfloat16"}
    assert safetensors.torch.load_file(again).keys() == safetensors.torch.load_file(first).keys()
    for key, value in safetensors.torch.load_file(first).items():
        assert torch.equal(safetensors.torch.load_file(again)[key], value), key


def test_a_loaded_task_vector_file_is_an_input_of_its_own(files, tmp_path):
    saved = merging.save_task_vector(tau(files, "ft_a"), tmp_path / "tv.safetensors", "fp32")
    vector = merging.load_task_vector(saved).scale(2.0)
    recipe = recipe_of(vector)
    assert [e["file"] for e in recipe["inputs"].values()] == ["tv.safetensors"]
    assert recipe["task_vector"]["sum"][0]["leaf"] == {"op": "stored", "file": "input1"}
    again = run_recipe(roundtrip(recipe), folders=[tmp_path])
    assert_same_values(again, vector)


def test_merge_checkpoint_files_reruns_to_an_identical_checkpoint(files, tmp_path):
    finetunes = [files["ft_a"], files["ft_b"]]
    out = merging.merge_checkpoint_files(
        files["base"], finetunes, tmp_path / "m.safetensors", "ties", k=0.4, block_weights={"input": 0.5}, dtype="bf16"
    )
    recipe = file_recipe(out)
    assert recipe["result"] == {"kind": "checkpoint", "base": "input1", "dtype": "bfloat16"}
    again = run_recipe(out, tmp_path / "again.safetensors", folders=[files["base"].parent])
    assert file_recipe(again) == recipe
    first, second = safetensors.torch.load_file(out), safetensors.torch.load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # without an output path the recipe gives its task vector: checkpoint − base, up to the storage rounding
    vector = run_recipe(out, folders=[files["base"].parent])
    base = safetensors.torch.load_file(files["base"])
    key = "diffusion_model.out.2.weight"
    expected = first["model." + key].float() - base["model." + key]
    torch.testing.assert_close(vector.delta(key, "cpu"), expected, atol=1e-2, rtol=0)


def test_extracted_lora_reruns_to_an_identical_lora(files, tmp_path):
    merged = merge_to_task_vector([tau(files, "ft_a"), tau(files, "ft_b")], "dare", p=0.3, seed=1)
    first = tmp_path / "l.safetensors"
    merging.extract_lora(merged, first, energy=0.8, max_rank=3, conv="diff", other_keys="drop", backend="svd")
    recipe = file_recipe(first)
    assert recipe["result"] == {
        "kind": "lora",
        "rank": None,
        "energy": 0.8,
        "max_rank": 3,
        "conv": "diff",
        "other_keys": "drop",
        "backend": "svd",
        "dtype": "float16",
    }
    again = run_recipe(first, tmp_path / "again.safetensors", folders=[files["base"].parent])
    assert file_recipe(again) == recipe
    a, b = safetensors.torch.load_file(first), safetensors.torch.load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_file_is_a_rerunnable_input(files, tmp_path):
    merging.extract_lora(tau(files, "ft_a"), tmp_path / "a.safetensors", rank=2)
    vector = merging.load_lora(tmp_path / "a.safetensors").scale(0.5) + tau(files, "ft_b")
    recipe = recipe_of(vector)
    assert recipe["task_vector"]["sum"][0]["leaf"]["op"] == "lora_file"
    again = run_recipe(roundtrip(recipe), folders=[tmp_path, files["base"].parent])
    assert_same_values(again, vector)
    assert recipe_of(again) == recipe


def test_recipes_go_to_and_come_from_json_files(files, tmp_path):
    recipe = recipe_of(tau(files, "ft_a").scale(0.25))
    path = merging.save_recipe(recipe, tmp_path / "r.json")
    assert read_recipe(path) == roundtrip(recipe)
    assert read_recipe(path.read_text()) == roundtrip(recipe)
    shutil.copy(files["ft_a"], tmp_path / "ft_a.safetensors")  # the recipe's own folder is searched too
    shutil.copy(files["base"], tmp_path / "base.safetensors")
    assert_same_values(run_recipe(path), tau(files, "ft_a").scale(0.25))


# -- refusals -----------------------------------------------------------------------------------------


def test_a_missing_input_is_named(files):
    recipe = recipe_of(tau(files, "ft_b"))
    files["ft_b"].unlink()
    with pytest.raises(RecipeInputMissing, match=r"'ft_b\.safetensors' \(input1\) was not found in .*models"):
        run_recipe(recipe, folders=[files["base"].parent])


def test_a_changed_input_is_named_with_both_hashes(files):
    recipe = recipe_of(tau(files, "ft_a"))
    expected = recipe["inputs"]["input1"]["dmh1"]
    shutil.copy(files["ft_b"], files["ft_a"])  # same name and size, other content
    found = file_identity.sampled_hash(files["ft_a"])
    with pytest.raises(RecipeInputChanged, match=rf"'ft_a\.safetensors'.*{expected}.*{found}"):
        run_recipe(recipe, folders=[files["base"].parent])


def test_a_file_of_another_size_is_refused(files):
    recipe = recipe_of(tau(files, "ft_a"))
    safetensors.torch.save_file({"x": torch.zeros(3)}, files["ft_a"])
    with pytest.raises(RecipeInputChanged, match="bytes"):
        run_recipe(recipe, folders=[files["base"].parent])


def test_the_first_matching_file_of_several_with_that_name_is_used(files, tmp_path):
    recipe = recipe_of(tau(files, "ft_a"))
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    shutil.copy(files["ft_b"], decoy / "ft_a.safetensors")
    again = run_recipe(recipe, folders=[decoy, files["base"].parent])
    assert_same_values(again, tau(files, "ft_a"))


def test_in_memory_task_vectors_are_marked_not_rerunnable(files):
    def named(state):  # under the names a file's task vector has (bare UNet keys would not meet them)
        return {"diffusion_model." + k: v for k, v in state.items()}

    in_memory = merging.extract_task_vector(
        named(weights(1)), named(weights(0)), names=("finetuned MODEL", "base MODEL")
    )
    recipe = recipe_of(in_memory.scale(0.5) + tau(files, "ft_a"))
    assert recipe["rerunnable"] is False
    assert "'finetuned MODEL' and 'base MODEL'" in recipe["problems"][0]
    assert recipe["task_vector"]["sum"][0]["leaf"]["op"] == "not_rerunnable"
    with pytest.raises(RecipeError, match=r"cannot be re-run.*finetuned MODEL"):
        run_recipe(recipe, folders=[files["base"].parent])
    merged = merge_to_task_vector([in_memory, tau(files, "ft_b")], "weighted")
    assert recipe_of(merged)["rerunnable"] is False
    stored = TaskVector(((1.0, StoredDeltas({"diffusion_model.x": torch.ones(2)}, "my dict")),))
    assert "'my dict'" in recipe_of(stored)["problems"][0]


def test_a_file_changed_after_it_was_opened_makes_the_recipe_not_rerunnable(files):
    vector = tau(files, "ft_a")
    stat = files["ft_a"].stat()
    os.utime(files["ft_a"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    recipe = recipe_of(vector)
    assert not recipe["rerunnable"] and "changed on disk" in recipe["problems"][0]


def test_old_new_and_foreign_recipes_are_refused(files, tmp_path):
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file({"x.diff": torch.zeros(1)}, old, metadata={"dm_recipe": "{}"})
    with pytest.raises(RecipeError, match="older version"):
        read_recipe(old)
    safetensors.torch.save_file({"x.diff": torch.zeros(1)}, tmp_path / "none.safetensors")
    with pytest.raises(RecipeError, match="holds no diffusion-merge recipe"):
        read_recipe(tmp_path / "none.safetensors")
    recipe = roundtrip(recipe_of(tau(files, "ft_a")))
    with pytest.raises(RecipeError, match="newer diffusion-merge"):
        read_recipe({**recipe, "version": 2})
    with pytest.raises(RecipeError, match="not a diffusion-merge recipe"):
        read_recipe({**recipe, "format": "sd-mecha"})
    with pytest.raises(RecipeError, match="result kind"):
        read_recipe({**recipe, "result": {"kind": "image"}})
    with pytest.raises(RecipeError, match="not valid JSON"):
        read_recipe("{not json")
    with pytest.raises(RecipeError, match="no valid file name"):
        run_recipe({**recipe, "inputs": {"input1": {"file": "../escape.safetensors", "dmh1": "0"}}})


def test_writing_a_checkpoint_result_needs_an_output_path_only_to_write(files, tmp_path):
    out = merging.merge_checkpoint_files(files["base"], [files["ft_a"]], tmp_path / "m.safetensors", "weighted")
    assert isinstance(run_recipe(out, folders=[files["base"].parent]), TaskVector)


# -- the hash ------------------------------------------------------------------------------------------


def test_sampled_hash_reads_little_of_large_files_and_still_sees_sampled_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(file_identity, "WHOLE_DATA_LIMIT", 1 << 16)
    monkeypatch.setattr(file_identity, "SAMPLE_BYTES", 1024)
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"w": torch.arange(1 << 18, dtype=torch.float32)}, path)  # 1 MiB of data
    before = file_identity.sampled_hash(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # the last byte is always in a sample
    path.write_bytes(bytes(raw))
    assert file_identity.sampled_hash(path) != before
    middle = len(raw) - 3000  # between the last two samples: only the full hash sees it
    unseen = file_identity.sampled_hash(path)
    raw[middle] ^= 1
    path.write_bytes(bytes(raw))
    assert file_identity.sampled_hash(path) == unseen
    assert file_identity.identity(path, full=True)["sha256"] == file_identity.full_hash(path)


def test_full_hash_is_recorded_on_request_and_checked(files):
    recipe = recipe_of(tau(files, "ft_a"), full_hash=True)
    assert all("sha256" in entry for entry in recipe["inputs"].values())
    recipe["inputs"]["input1"]["sha256"] = "0" * 64
    with pytest.raises(RecipeInputChanged, match="sha256"):
        run_recipe(recipe, folders=[files["base"].parent])


def test_small_files_are_hashed_whole(tmp_path):
    path = tmp_path / "s.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1000)}, path)
    before = file_identity.sampled_hash(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    assert file_identity.sampled_hash(path) != before


def test_a_recipe_with_full_hashes_reruns_to_a_file_with_full_hashes(files, tmp_path):
    first = merging.save_task_vector(tau(files, "ft_a"), tmp_path / "tv.safetensors", "fp32", full_hash=True)
    assert all("sha256" in entry for entry in file_recipe(first)["inputs"].values())
    again = run_recipe(first, tmp_path / "again.safetensors", folders=[files["base"].parent])
    assert file_recipe(again) == file_recipe(first)


def test_a_malformed_step_is_named(files):
    recipe = roundtrip(recipe_of(tau(files, "ft_a")))
    del recipe["task_vector"]["sum"][0]["leaf"]["base"]
    with pytest.raises(RecipeError, match="recipe step 'difference' has no 'base'"):
        run_recipe(recipe, folders=[files["base"].parent])
    recipe["task_vector"]["sum"][0]["leaf"] = {"op": "magic"}
    with pytest.raises(RecipeError, match="unknown recipe step 'magic'"):
        run_recipe(recipe, folders=[files["base"].parent])
