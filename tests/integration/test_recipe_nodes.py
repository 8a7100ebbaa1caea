"""Save Recipe and Run Recipe through real ComfyUI: recipes from JSON, from saved task vectors, LoRAs and
checkpoints; inputs found in the model folders and checked by hash; what cannot be re-run is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from diffusion_merge.merging.io import SafetensorsFile
from diffusion_merge.merging.recipes import RecipeError, RecipeInputChanged, RecipeInputMissing
from diffusion_merge.nodes import checkpoints as checkpoint_nodes
from diffusion_merge.nodes import lora_extract as lora_nodes
from diffusion_merge.nodes import merge as merge_nodes
from diffusion_merge.nodes import recipes as recipe_nodes
from diffusion_merge.nodes import task_vectors as tv_nodes


def first(output):
    return output.result[0]


def text(output) -> str:
    return output.ui.as_dict()["text"][0]


def newest(folder, pattern):
    return max(folder.glob(pattern))


def assert_same_values(a, b):
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        torch.testing.assert_close(a.delta(key, "cpu"), b.delta(key, "cpu"), rtol=0, atol=0)


@pytest.fixture
def model_files(sd15_file):
    """base + two fine-tunes as checkpoints in models/checkpoints (names unique to the test)."""

    def make(tag: str):
        names = {}
        for role, variant in (("base", "base"), ("a", "finetune-a"), ("b", "finetune-b")):
            names[role] = f"{tag}_{role}.safetensors"
            sd15_file(names[role], variant, dtype=torch.float32)
        return names

    return make


def from_files(names, which):
    return first(tv_nodes.TaskVectorFromFilesNode.execute(names[which], names["base"]))


def test_a_merge_of_file_task_vectors_reruns_from_its_saved_recipe(model_files, comfyui):
    import nodes

    names = model_files("merge")
    base = nodes.CheckpointLoaderSimple().load_checkpoint(names["base"])[0]
    stack = first(merge_nodes.TaskVectorStackNode.execute(from_files(names, "a"), 1.0))
    stack = first(merge_nodes.TaskVectorStackNode.execute(from_files(names, "b"), 0.5, stack))
    _, merged = merge_nodes.MergeTIESNode.execute(base, stack, k=0.3, weight_rules="@output = 0.5\nattn = 2").result
    saved = recipe_nodes.SaveRecipeNode.execute(merged, "recipes/ties")
    recipe = json.loads(first(saved))
    assert recipe["rerunnable"] and "re-runnable task_vector recipe, 3 input file(s)" in text(saved)
    path = newest(comfyui / "output" / "recipes", "ties_*.json")
    assert json.loads(path.read_text()) == recipe
    assert f"recipes/{path.name}" in recipe_nodes.recipe_sources()

    run = recipe_nodes.RunRecipeNode.execute(recipe_file=f"recipes/{path.name}")
    assert_same_values(first(run), merged)
    assert json.loads(run.result[1]) == recipe
    assert "every input found and unchanged" in text(run)
    again = json.loads(first(recipe_nodes.SaveRecipeNode.execute(first(run), "recipes/ties_again")))
    assert again == recipe  # the recipe of a recipe-run equals the original

    from_text = recipe_nodes.RunRecipeNode.execute(recipe_json=first(saved))
    assert_same_values(first(from_text), merged)


def test_a_saved_task_vector_file_is_written_again_identically(model_files, comfyui):
    names = model_files("save")
    vector = from_files(names, "a").scale(0.5) - from_files(names, "b")
    tv_nodes.TaskVectorSaveNode.execute(vector, "task_vectors/made", "fp16")
    made = newest(comfyui / "output" / "task_vectors", "made_*.safetensors")
    run = recipe_nodes.RunRecipeNode.execute(
        recipe_file=f"task_vectors/{made.name}", write_file=True, filename_prefix="re"
    )
    again = newest(comfyui / "output" / "task_vectors", "re_*.safetensors")
    assert "wrote output/task_vectors/re_" in text(run)
    original, rewritten = SafetensorsFile(made).metadata, SafetensorsFile(again).metadata
    assert json.loads(rewritten["dm_rerun_recipe"]) == json.loads(original["dm_rerun_recipe"])
    a, b = safetensors.torch.load_file(made), safetensors.torch.load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_extracted_lora_is_written_again_identically(model_files, comfyui):
    names = model_files("lora")
    lora_nodes.TaskVectorToLoRANode.execute(from_files(names, "a"), "loras/ex", mode="energy", energy=0.8, max_rank=8)
    made = newest(comfyui / "output" / "loras", "ex_*.safetensors")
    assert f"output/loras/{made.name}" in recipe_nodes.recipe_sources()
    run = recipe_nodes.RunRecipeNode.execute(
        recipe_file=f"output/loras/{made.name}", write_file=True, filename_prefix="re"
    )
    again = newest(comfyui / "output" / "loras", "re_*.safetensors")
    a, b = safetensors.torch.load_file(made), safetensors.torch.load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(first(run).keys()) == sorted(
        first(lora_nodes.TaskVectorToLoRANode.execute(first(run), "loras/x")).keys()
    )


def test_missing_and_changed_inputs_are_named(model_files, comfyui):
    names = model_files("refuse")
    saved = first(recipe_nodes.SaveRecipeNode.execute(from_files(names, "a"), "recipes/refuse"))
    checkpoints = comfyui / "models" / "checkpoints"
    before = recipe_nodes.RunRecipeNode.fingerprint_inputs(recipe_json=saved)
    assert recipe_nodes.RunRecipeNode.fingerprint_inputs(recipe_json=saved) == before  # unchanged files: cached
    shutil.copy(checkpoints / names["b"], checkpoints / names["a"])  # same name, other weights
    assert recipe_nodes.RunRecipeNode.fingerprint_inputs(recipe_json=saved) != before
    with pytest.raises(RecipeInputChanged, match=r"refuse_a\.safetensors.*dmh1 in the recipe \w+, of .* \w+"):
        recipe_nodes.RunRecipeNode.execute(recipe_json=saved)
    changed = recipe_nodes.RunRecipeNode.fingerprint_inputs(recipe_json=saved)
    (checkpoints / names["a"]).unlink()
    assert recipe_nodes.RunRecipeNode.fingerprint_inputs(recipe_json=saved) != changed
    with pytest.raises(RecipeInputMissing, match=r"'refuse_a\.safetensors' \(input1\) was not found"):
        recipe_nodes.RunRecipeNode.execute(recipe_json=saved)


def test_recipes_of_models_loaded_in_comfyui_say_they_cannot_be_rerun(tiny_sd15, comfyui):
    base = tiny_sd15(0)
    vector = first(tv_nodes.TaskVectorFromModelsNode.execute(tiny_sd15(0, "finetune-a"), base))
    saved = recipe_nodes.SaveRecipeNode.execute(vector, "recipes/models")
    assert "NOT re-runnable" in text(saved) and "finetuned MODEL" in text(saved)
    with pytest.raises(RecipeError, match=r"cannot be re-run.*finetuned MODEL"):
        recipe_nodes.RunRecipeNode.execute(recipe_json=first(saved))
    patched, _ = tv_nodes.TaskVectorApplyNode.execute(base, vector, 0.5).result
    metadata = checkpoint_nodes.checkpoint_metadata(patched, None, torch.float16)  # what Save Checkpoint writes
    recipe = json.loads(metadata["dm_rerun_recipe"])
    assert recipe["result"] == {"kind": "checkpoint", "base": None, "dtype": "float16"}
    assert recipe["task_vector"]["sum"][0]["coefficient"] == 0.5
    with pytest.raises(RecipeError, match="saved from a MODEL loaded in ComfyUI"):
        recipe_nodes.RunRecipeNode.execute(recipe_json=metadata["dm_rerun_recipe"])


def test_no_recipe_is_a_clear_error(comfyui):
    with pytest.raises(ValueError, match="no recipe: pick a recipe_file or paste a recipe"):
        recipe_nodes.RunRecipeNode.execute()
    with pytest.raises(ValueError, match="must be '<folder>/<file>'"):
        recipe_nodes.RunRecipeNode.execute(recipe_file="elsewhere/x.json")
    with pytest.raises(FileNotFoundError, match="is not a file in output"):
        recipe_nodes.RunRecipeNode.execute(recipe_file="output/loras/../../escape.safetensors")


def test_recipe_files_in_models_recipes_are_listed(comfyui):
    folder = comfyui / "models" / "recipes"
    folder.mkdir(exist_ok=True)
    import folder_paths

    folder_paths.add_model_folder_path("recipes", str(folder))
    (folder / "shared.json").write_text("{}")
    assert "recipes/shared.json" in recipe_nodes.recipe_sources()
    with pytest.raises(RecipeError, match="not a diffusion-merge recipe"):
        recipe_nodes.RunRecipeNode.execute(recipe_file="recipes/shared.json")
