"""Recipe nodes: save the recipe of a task vector as JSON, and re-run a recipe from a file or from text."""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management as mm
import folder_paths

from .. import merging
from ..merging.recipes import (
    full_hashes,
    locate_inputs,
    read_recipe,
    recipe_inputs_table,
    recipe_of,
    require_rerunnable,
    task_vector_of,
    write_result,
)
from ..merging.task_vector_files import task_vector_from_files
from ..merging.task_vectors import TaskVector
from . import comfy_bridge as bridge
from .common import hidden_input, register_folder
from .compat import io, ui
from .types import CATEGORY, TaskVectorType

RECIPE_CATEGORY = f"{CATEGORY}/recipes"
RECIPE_FOLDER = "recipes"
RECIPE_SUFFIXES = (".json",)
INPUT_FOLDERS = ("checkpoints", "diffusion_models", bridge.TASK_VECTOR_FOLDER, "loras")
"""Model folders a recipe's input files are looked up in (and ComfyUI's whole output folder)."""
FILE_SOURCE_FOLDERS = (RECIPE_FOLDER, bridge.TASK_VECTOR_FOLDER, "checkpoints", "loras")
OUTPUT_SOURCE_FOLDERS = ("checkpoints", "loras")
NO_FILE = "none (use recipe_json)"
RESULT_FOLDERS = {"task_vector": bridge.TASK_VECTOR_FOLDER, "checkpoint": "checkpoints", "lora": "loras"}


def register_recipe_folder() -> None:
    """``models/recipes`` and ``output/recipes`` (where Save Recipe writes) as a folder of ``.json`` recipes."""
    register_folder(RECIPE_FOLDER, RECIPE_SUFFIXES)


def _register_source_folders() -> None:
    """The pack's own folders this module lists (registered by the extension's load hook; again here, idempotently,
    for a schema built before it ran — e.g. by a test that lists the nodes directly)."""
    register_recipe_folder()
    bridge.register_task_vector_folder()


def recipe_sources() -> list[str]:
    """Every recipe .json and every saved safetensors file a recipe may live in: ``<folder>/<file>`` for the
    model folders (task_vectors and recipes include their output folders), ``output/<folder>/<file>`` for
    checkpoints and LoRAs this pack wrote into the output folder."""
    _register_source_folders()
    sources = [NO_FILE]
    for folder in FILE_SOURCE_FOLDERS:
        suffixes = RECIPE_SUFFIXES if folder == RECIPE_FOLDER else bridge.SAFETENSORS_SUFFIXES
        for name in folder_paths.get_filename_list(folder):
            if name.lower().endswith(suffixes):
                sources.append(f"{folder}/{name}")
    output = Path(folder_paths.get_output_directory())
    for folder in OUTPUT_SOURCE_FOLDERS:
        if (output / folder).is_dir():
            for path in sorted((output / folder).rglob("*")):
                if path.is_file() and path.name.lower().endswith(bridge.SAFETENSORS_SUFFIXES):
                    sources.append(f"output/{path.relative_to(output).as_posix()}")
    return list(dict.fromkeys(sources))


def resolve_source(source: str) -> Path:
    """The file a ``recipe_file`` choice names (refusing anything outside the folders it may come from)."""
    folder, _, name = source.partition("/")
    if folder == "output":
        output = Path(folder_paths.get_output_directory()).resolve()
        path = (output / name).resolve()
        inside = any(path.is_relative_to(output / sub) for sub in OUTPUT_SOURCE_FOLDERS)
        if not inside or not path.is_file():
            raise FileNotFoundError(f"'{source}' is not a file in output/{{{', '.join(OUTPUT_SOURCE_FOLDERS)}}}")
        return path
    if folder not in FILE_SOURCE_FOLDERS or not name:
        raise ValueError(f"recipe source '{source}' must be '<folder>/<file>', the folder one of {FILE_SOURCE_FOLDERS}")
    _register_source_folders()
    path = folder_paths.get_full_path(folder, name)
    if not path:
        raise FileNotFoundError(f"'{name}' was not found in the {folder} folders")
    return Path(path)


def find_input(name: str) -> list[Path]:
    """Every file called ``name`` in the input model folders and anywhere in the output folder (the hash check
    picks the right one)."""
    _register_source_folders()
    found = []
    for folder in INPUT_FOLDERS:
        for relative in folder_paths.get_filename_list(folder):
            if Path(relative).name == name:
                path = folder_paths.get_full_path(folder, relative)
                if path:
                    found.append(Path(path))
    output = Path(folder_paths.get_output_directory())
    found += sorted(p for p in output.rglob(name) if p.is_file())  # what the pack (or anything) saved there
    return found


class SaveRecipeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SaveRecipe",
            display_name="Save Recipe",
            category=RECIPE_CATEGORY,
            description="Write how a task vector was made — its input files by name and content hash, every "
            "operation, merge method and parameter — as a small JSON recipe (output/recipes) that Run Recipe, or "
            "merging.run_recipe in Python, re-runs. Says so when the task vector cannot be re-run from files.",
            inputs=[
                TaskVectorType.Input("task_vector", tooltip="The task vector whose recipe to write."),
                io.String.Input(
                    "filename_prefix",
                    default="recipes/recipe",
                    tooltip="Name inside ComfyUI's output folder; a counter and .json are appended.",
                ),
                io.Boolean.Input(
                    "full_hash",
                    default=False,
                    optional=True,
                    tooltip="Also record each input's whole-file SHA-256 (reads every input completely; the default "
                    "hash reads 4 MiB per file).",
                ),
            ],
            outputs=[io.String.Output(display_name="recipe", tooltip="The recipe as JSON text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, task_vector: TaskVector, filename_prefix="recipes/recipe", full_hash=False):
        recipe = recipe_of(task_vector, full_hash=full_hash)
        path = bridge.output_path(filename_prefix, default_folder=RECIPE_FOLDER, suffix=".json")
        merging.save_recipe(recipe, path)
        relative = path.relative_to(Path(folder_paths.get_output_directory()).resolve())
        lines = [f"saved output/{relative.as_posix()}", *describe(recipe)]
        return io.NodeOutput(json.dumps(recipe), ui=ui.PreviewText("\n".join(lines)))


def describe(recipe: dict) -> list[str]:
    """A recipe in a few lines: re-runnable or why not, and its inputs."""
    if recipe.get("rerunnable"):
        head = f"re-runnable {recipe['result']['kind']} recipe, {len(recipe['inputs'])} input file(s):"
    else:
        head = "NOT re-runnable: " + "; ".join(recipe.get("problems") or [])
    return [head, *recipe_inputs_table(recipe)]


class RunRecipeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_RunRecipe",
            display_name="Run Recipe",
            category=RECIPE_CATEGORY,
            description="Re-run a recipe: from a recipe .json (models/recipes, output/recipes), from the metadata "
            "of a saved task vector, checkpoint or LoRA, or from JSON text. Every input file is looked up by name "
            "in the model folders and checked against the recorded size and hash first; a missing or different "
            "file stops the run, naming it. Outputs the task vector and, if asked, writes the file again.",
            inputs=[
                io.Combo.Input(
                    "recipe_file",
                    options=recipe_sources(),
                    default=NO_FILE,
                    tooltip="Where the recipe is: recipes/<file>.json, or a saved file whose metadata holds one "
                    f"(task_vectors/, checkpoints/, loras/). '{NO_FILE}' reads recipe_json instead.",
                ),
                io.String.Input(
                    "recipe_json",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip=f"The recipe as JSON text (e.g. from Save Recipe), used when recipe_file is '{NO_FILE}'.",
                ),
                io.Boolean.Input(
                    "write_file",
                    default=False,
                    optional=True,
                    tooltip="Also write what the recipe describes — a task vector file, a LoRA or a checkpoint, "
                    "with the recorded dtype and settings — into the output folder. A checkpoint recipe is always "
                    "re-run this way.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="rerun",
                    optional=True,
                    tooltip="Name of the written file inside the output folder (a bare name goes into task_vectors/, "
                    "checkpoints/ or loras/ by the recipe's kind).",
                ),
            ],
            outputs=[
                TaskVectorType.Output(
                    display_name="task_vector",
                    tooltip="The recipe's task vector; for a LoRA recipe written again, the LoRA's own delta; for a "
                    "checkpoint recipe, the written checkpoint − its base.",
                ),
                io.String.Output(display_name="recipe", tooltip="The recipe that was run, as JSON text."),
            ],
            hidden=[io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, recipe_file=NO_FILE, recipe_json="", write_file=False, filename_prefix="rerun"):
        recipe = load_recipe(recipe_file, recipe_json)
        require_rerunnable(recipe)
        paths = locate_inputs(recipe, find=find_input)
        kind = recipe["result"]["kind"]
        lines = [f"{kind} recipe: every input found and unchanged", *recipe_inputs_table(recipe)]
        run = {
            "device": mm.get_torch_device(),
            "should_stop": mm.throw_exception_if_processing_interrupted,
        }
        if kind == "checkpoint" or write_file:
            folder = RESULT_FOLDERS[kind]
            path = bridge.output_path(filename_prefix, default_folder=folder)
            vector = write_again(recipe, paths, path, hidden_input(cls, "prompt"), run)
            relative = path.relative_to(Path(folder_paths.get_output_directory()).resolve())
            lines.append(f"wrote output/{relative.as_posix()}")
        else:
            vector = task_vector_of(recipe, paths, **run)
        return io.NodeOutput(vector, json.dumps(recipe), ui=ui.PreviewText("\n".join(lines)))

    @classmethod
    def fingerprint_inputs(cls, recipe_file=NO_FILE, recipe_json="", write_file=False, filename_prefix="rerun"):
        """Run again when the recipe file or any file its inputs could be read from changed (size or time)."""
        try:
            recipe = load_recipe(recipe_file, recipe_json)
            paths = [resolve_source(recipe_file)] if recipe_file and recipe_file != NO_FILE else []
            for entry in recipe["inputs"].values():
                paths += find_input(entry["file"])
            return json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])
        except Exception:  # cannot tell: run, and let the run report the problem
            return float("nan")


def load_recipe(recipe_file: str, recipe_json: str) -> dict:
    if recipe_file and recipe_file != NO_FILE:
        return read_recipe(resolve_source(recipe_file))
    if not (recipe_json or "").strip():
        raise ValueError(f"no recipe: pick a recipe_file or paste a recipe into recipe_json ('{NO_FILE}' is selected)")
    return read_recipe(recipe_json)


def write_again(recipe: dict, paths: dict, path: Path, prompt, run: dict) -> TaskVector:
    """Write the recipe's file to ``path``; returns the task vector the node outputs for it (``prompt``: the
    workflow's, for the file's metadata, or None)."""
    metadata = {"dm_version": merging.__version__}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    kind = recipe["result"]["kind"]
    if kind == "checkpoint":
        merging.run_recipe(recipe, path, files={recipe["inputs"][i]["file"]: p for i, p in paths.items()}, **run)
        return task_vector_from_files(path, paths[recipe["result"]["base"]])
    vector = task_vector_of(recipe, paths, **run)
    write_result(recipe["result"], vector, path, metadata=metadata, full_hash=full_hashes(recipe), **run)
    return merging.load_lora(path) if kind == "lora" else vector


NODES = [SaveRecipeNode, RunRecipeNode]
