"""Recipes: how a saved file was made, as JSON that names its inputs by file name and hash, and re-runs.

Every file this library writes (task vectors, merged checkpoints, extracted LoRAs) carries its recipe in
the metadata key ``dm_rerun_recipe``; :func:`recipe_of` gives the recipe of any :class:`TaskVector`,
:func:`read_recipe` reads one back (from a dict, JSON text, a ``.json`` file or a saved file), and
:func:`run_recipe` re-runs it after checking that every input file is there and unchanged. The schema
(version 1) is documented in ``docs/recipes.md``::

    {"format": "diffusion-merge/recipe", "version": 1,
     "result": {"kind": "task_vector" | "checkpoint" | "lora", ...how it was written},
     "inputs": {"input1": {"file": "base.safetensors", "bytes": 123, "dmh1": "…"}, …},
     "task_vector": {"sum": [{"coefficient": 0.5, "leaf": {"op": "difference", "finetuned": "input2",
                                                            "base": "input1", "key_filter": null}}],
                     "nonfinite": "error"},
     "rerunnable": true, "problems": []}

Leaves: ``difference`` (fine-tune − base, two files), ``stored`` (a saved task vector file), ``lora_file``
(a LoRA in ComfyUI's key names), ``select`` (a key filter on another leaf), ``merge`` (a merge method with
every resolved parameter and its input task vectors) and ``not_rerunnable`` (made from something that is not
a file, e.g. MODELs loaded in ComfyUI: the recipe says so and :func:`run_recipe` refuses it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .file_identity import HASH_NAME, FileOrigin, identity, sampled_hash
from .file_identity import full_hash as whole_file_sha256
from .io import SafetensorsFile, parse_dtype
from .task_vectors import DeltaLeaf, TaskVector, _Selected

RECIPE_FORMAT = "diffusion-merge/recipe"
RECIPE_VERSION = 1
RECIPE_METADATA_KEY = "dm_rerun_recipe"
RESULT_KINDS = ("task_vector", "checkpoint", "lora")


class RecipeError(ValueError):
    """A recipe that cannot be re-run: malformed, not re-runnable, or an input missing or changed."""


class RecipeInputMissing(RecipeError, FileNotFoundError):
    """An input file of the recipe was not found."""


class RecipeInputChanged(RecipeError):
    """An input file was found but its content hash differs from the recipe's."""


# -- writing recipes ----------------------------------------------------------------------------------


def recipe_of(vector: TaskVector, result: Mapping[str, Any] | None = None, *, full_hash: bool = False) -> dict:
    """The recipe that makes ``vector`` again (and, with ``result``, the file it was written to).

    Input files are hashed now (``dmh1``; with ``full_hash`` also the whole-file SHA-256). Parts that were
    not read from files make the recipe ``"rerunnable": false`` with a problem saying what they are.
    """
    builder = _RecipeBuilder(full_hash)
    expression = builder.vector(vector)
    return builder.finish(dict(result or {"kind": "task_vector"}), expression)


def checkpoint_recipe(
    base_path: str | os.PathLike, merge_origin: Mapping[str, Any], dtype: torch.dtype, *, full_hash: bool = False
) -> dict:
    """The recipe of a checkpoint written as base + a merge (:func:`merging.merge_checkpoint_files`);
    ``merge_origin`` as :func:`merging.merge.merge_origin` makes it."""
    builder = _RecipeBuilder(full_hash)
    base = builder.file(FileOrigin.of(base_path))
    expression = {"sum": [{"coefficient": 1.0, "leaf": builder.origin(merge_origin, None)}], "nonfinite": "error"}
    result = {"kind": "checkpoint", "base": base, "dtype": str(dtype).removeprefix("torch.")}
    return builder.finish(result, expression)


def not_rerunnable_recipe(vector: TaskVector | None, result: Mapping[str, Any], problem: str) -> dict:
    """A recipe that records what it can of ``vector`` but says why the result cannot be made again."""
    builder = _RecipeBuilder(False)
    expression = builder.vector(vector) if vector is not None else None
    builder.problems.insert(0, problem)
    return builder.finish(dict(result), expression)


class _RecipeBuilder:
    """Walks a task vector's leaves, numbering input files in the order they are first met."""

    def __init__(self, full_hash: bool):
        self.full_hash = full_hash
        self.inputs: dict[str, dict] = {}
        self._ids: dict[Path, str] = {}
        self.problems: list[str] = []

    def finish(self, result: dict, expression: dict | None) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "result": result,
            "inputs": self.inputs,
            "task_vector": expression,
            "rerunnable": not self.problems,
            "problems": self.problems,
        }

    def vector(self, vector: TaskVector) -> dict:
        terms = [{"coefficient": float(c), "leaf": self.leaf(leaf)} for c, leaf in vector.terms]
        return {"sum": terms, "nonfinite": vector.nonfinite}

    def leaf(self, leaf: DeltaLeaf) -> dict:
        if isinstance(leaf, _Selected):
            if leaf.pattern is None:
                return self._not_rerunnable(leaf, "a key selection without its pattern")
            return {"op": "select", "pattern": leaf.pattern, "of": self.leaf(leaf.leaf)}
        if leaf.origin is None:
            return self._not_rerunnable(leaf, _what(leaf))
        return self.origin(leaf.origin, leaf)

    def origin(self, origin: Mapping[str, Any], leaf: DeltaLeaf | None) -> dict:
        op = origin["op"]
        if op == "difference":
            return {
                "op": op,
                "finetuned": self.file(origin["finetuned"]),
                "base": self.file(origin["base"]),
                "key_filter": origin["key_filter"],
            }
        if op in ("stored", "lora_file"):
            return {"op": op, "file": self.file(origin["file"])}
        if op == "merge":
            inputs = []
            for index, vector in enumerate(origin["inputs"], start=1):
                if isinstance(vector, TaskVector):
                    inputs.append(self.vector(vector))
                else:
                    inputs.append(self._not_rerunnable(leaf, f"merge input {index}: an in-memory mapping of tensors"))
            return {
                "op": op,
                "method": origin["method"],
                "params": origin["params"],
                "storage_dtype": origin["storage_dtype"],
                "inputs": inputs,
            }
        return self._not_rerunnable(leaf, f"an unknown origin '{op}'")

    def file(self, origin: FileOrigin) -> str:
        if origin.path in self._ids:
            return self._ids[origin.path]
        input_id = f"input{len(self._ids) + 1}"
        if any(path.name == origin.path.name for path in self._ids):
            self.problems.append(f"two different input files are named '{origin.path.name}'; rename one")
        self._ids[origin.path] = input_id
        if not origin.path.is_file():
            self.problems.append(f"input '{origin.path.name}' no longer exists")
            self.inputs[input_id] = {"file": origin.path.name}
        else:
            if origin.changed():
                self.problems.append(
                    f"input '{origin.path.name}' changed on disk after it was read; its hash would not describe "
                    "what was used"
                )
            self.inputs[input_id] = identity(origin.path, full=self.full_hash)
        return input_id

    def _not_rerunnable(self, leaf: DeltaLeaf | None, what: str) -> dict:
        self.problems.append(f"made from {what}, which is not a file and cannot be read again")
        return {"op": "not_rerunnable", "what": what, "describe": leaf.describe() if leaf is not None else {}}


def _what(leaf: DeltaLeaf) -> str:
    description = leaf.describe()
    if description.get("op") == "difference":
        return f"the difference of '{description.get('finetuned')}' and '{description.get('base')}'"
    source = description.get("source")
    return f"'{source}' ({description.get('op')})" if source else f"a '{description.get('op')}' task vector"


# -- reading recipes ----------------------------------------------------------------------------------


def read_recipe(source: Mapping[str, Any] | str | os.PathLike) -> dict:
    """A recipe from a dict, JSON text, a ``.json`` file or a saved ``.safetensors`` file's metadata.

    Raises :class:`RecipeError` when there is none or it is not a recipe this version understands.
    """
    if isinstance(source, Mapping):
        recipe = dict(source)
    elif isinstance(source, str) and source.lstrip().startswith("{"):
        recipe = _parse_json(source, "the recipe text")
    else:
        recipe = _recipe_from_file(Path(source))
    check_recipe(recipe)
    return recipe


def _parse_json(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise RecipeError(f"{what} is not a JSON object")
    return value


def _recipe_from_file(path: Path) -> dict:
    if not path.is_file():
        raise RecipeInputMissing(f"no such recipe file: '{path}'")
    if path.suffix.lower() == ".json":
        return _parse_json(path.read_text(encoding="utf-8"), f"'{path.name}'")
    metadata = SafetensorsFile(path).metadata
    if RECIPE_METADATA_KEY in metadata:
        return _parse_json(metadata[RECIPE_METADATA_KEY], f"the recipe in '{path.name}'")
    if "dm_recipe" in metadata:
        raise RecipeError(
            f"'{path.name}' was saved by an older version of diffusion-merge: its metadata describes the recipe "
            "but does not name the input files by hash, so it cannot be re-run"
        )
    raise RecipeError(f"'{path.name}' holds no diffusion-merge recipe")


def check_recipe(recipe: Mapping[str, Any]) -> None:
    """Refuse a recipe of another format, a newer version, or with missing parts (names what is wrong)."""
    if recipe.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"not a diffusion-merge recipe (format {recipe.get('format')!r}, expected {RECIPE_FORMAT!r})")
    version = recipe.get("version")
    if not isinstance(version, int) or version < 1:
        raise RecipeError(f"recipe version {version!r} is not valid")
    if version > RECIPE_VERSION:
        raise RecipeError(
            f"recipe version {version} was written by a newer diffusion-merge (this one reads up to "
            f"{RECIPE_VERSION}); update the pack"
        )
    for part in ("result", "inputs", "task_vector"):
        if part not in recipe:
            raise RecipeError(f"the recipe has no '{part}'")
    kind = recipe["result"].get("kind") if isinstance(recipe["result"], Mapping) else None
    if kind not in RESULT_KINDS:
        raise RecipeError(f"the recipe's result kind {kind!r} is not one of {list(RESULT_KINDS)}")


# -- re-running ---------------------------------------------------------------------------------------


def locate_inputs(
    recipe: Mapping[str, Any],
    folders: Iterable[str | os.PathLike] = (),
    files: Mapping[str, str | os.PathLike] | None = None,
    find: Callable[[str], Iterable[str | os.PathLike]] | None = None,
) -> dict[str, Path]:
    """{input id: path} for every input, each checked against the recipe's size and hashes.

    A file is looked up by its recorded name: in ``files`` ({name: path}) if it is there, else among
    ``find(name)`` (candidate paths, e.g. every model folder's file of that name) and each of ``folders``; the
    first candidate whose size and hashes match is taken. Raises :class:`RecipeInputMissing` naming the file
    and where it looked, or :class:`RecipeInputChanged` naming the file and both hashes.
    """
    folders = [Path(f) for f in folders]
    located = {}
    for input_id, entry in recipe["inputs"].items():
        name = entry.get("file")
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise RecipeError(f"recipe input {input_id} has no valid file name ({name!r})")
        candidates = _candidates(name, folders, files or {}, find)
        if not candidates:
            places = [str(f) for f in folders] + (["the model and output folders"] if find is not None else [])
            where = ", ".join(places) or "no folder (pass folders=[...] or files={name: path})"
            raise RecipeInputMissing(f"recipe input '{name}' ({input_id}) was not found in {where}")
        located[input_id] = _first_matching(name, candidates, entry)
    return located


def _candidates(name, folders, files, find) -> list[Path]:
    if name in files:
        return [Path(files[name])]
    found = [Path(p) for p in (find(name) if find is not None else ())]
    found += [folder / name for folder in folders if (folder / name).is_file()]
    return list(dict.fromkeys(p.resolve() for p in found))


def _first_matching(name: str, candidates: list[Path], entry: Mapping[str, Any]) -> Path:
    first_error: RecipeInputChanged | None = None
    for path in candidates:
        try:
            verify_input(name, path, entry)
        except RecipeInputChanged as error:
            first_error = first_error or error
            continue
        return path
    if len(candidates) > 1:
        raise RecipeInputChanged(f"{first_error} ({len(candidates)} files named '{name}' checked, none matches)")
    assert first_error is not None  # candidates is never empty here
    raise first_error


def verify_input(name: str, path: Path, entry: Mapping[str, Any]) -> None:
    """Refuse ``path`` if its size or hashes differ from the recipe's entry for ``name``."""
    if not path.is_file():
        raise RecipeInputMissing(f"recipe input '{name}': '{path}' is not a file")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise RecipeInputChanged(
            f"recipe input '{name}' differs: the recipe's file has {entry['bytes']} bytes, '{path}' has {size} "
            f"(recipe {HASH_NAME} {entry.get(HASH_NAME, '?')}, found {sampled_hash(path)})"
        )
    checks = [(HASH_NAME, sampled_hash)] + ([("sha256", whole_file_sha256)] if "sha256" in entry else [])
    if HASH_NAME not in entry:
        raise RecipeError(f"recipe input '{name}' records no {HASH_NAME} hash")
    for label, compute in checks:
        found = compute(path)
        if found != entry[label]:
            raise RecipeInputChanged(
                f"recipe input '{name}' differs from the file the recipe was made with: {label} in the recipe "
                f"{entry[label]}, of '{path}' {found}"
            )


@dataclass
class _Context:
    paths: Mapping[str, Path]
    device: torch.device | str | None
    progress: Callable[[int, int], None] | None
    should_stop: Callable[[], bool | None] | None


def task_vector_of(
    recipe: Mapping[str, Any],
    paths: Mapping[str, Path],
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool | None] | None = None,
) -> TaskVector:
    """The recipe's task vector from located input files (merges run now; everything else stays lazy)."""
    require_rerunnable(recipe)
    return _build_vector(recipe["task_vector"], _Context(paths, device, progress, should_stop))


def require_rerunnable(recipe: Mapping[str, Any]) -> None:
    if not recipe.get("rerunnable") or recipe.get("task_vector") is None:
        problems = "; ".join(recipe.get("problems") or ["it says it is not re-runnable"])
        raise RecipeError(f"this recipe cannot be re-run: {problems}")


def _build_vector(expression: Mapping[str, Any], context: _Context) -> TaskVector:
    terms = []
    parts: list[TaskVector] = []
    for term in _list(expression, "sum"):
        part = _build_leaf(term["leaf"], context)
        parts.append(part)
        terms.append((float(term["coefficient"]), part.terms[0][1]))
    if not terms:
        raise RecipeError("a task vector in the recipe has no terms")
    fingerprints = [p.base_fingerprint for p in parts if p.base_fingerprint]
    sources = tuple(dict.fromkeys(source for part in parts for source in part.sources))
    return TaskVector(
        tuple(terms),
        base_fingerprint=fingerprints[0] if fingerprints else None,
        nonfinite=expression.get("nonfinite", "error"),
        sources=sources,
    )


def _build_leaf(leaf: Mapping[str, Any], context: _Context) -> TaskVector:
    """A one-term task vector (coefficient 1) holding the leaf the expression describes."""
    try:
        return _make_leaf(leaf, context)
    except KeyError as missing:
        raise RecipeError(f"recipe step {leaf.get('op')!r} has no {missing}") from None


def _make_leaf(leaf: Mapping[str, Any], context: _Context) -> TaskVector:
    from .lora_extract import load_lora
    from .merge import merge_to_task_vector
    from .task_vector_files import load_task_vector, task_vector_from_files

    op = leaf.get("op")
    if op == "difference":
        finetuned, base = _path(leaf["finetuned"], context), _path(leaf["base"], context)
        return task_vector_from_files(finetuned, base, key_filter=leaf.get("key_filter"))
    if op == "stored":
        return load_task_vector(_path(leaf["file"], context))
    if op == "lora_file":
        return load_lora(_path(leaf["file"], context))
    if op == "select":
        return _build_leaf(leaf["of"], context).select(leaf["pattern"])
    if op == "merge":
        inputs = [_build_vector(expression, context) for expression in _list(leaf, "inputs")]
        return merge_to_task_vector(
            inputs,
            leaf["method"],
            storage_dtype=parse_dtype(leaf.get("storage_dtype", "float32")),
            device=context.device,
            progress=context.progress,
            should_stop=context.should_stop,
            **leaf.get("params", {}),
        )
    if op == "not_rerunnable":
        raise RecipeError(f"this recipe cannot be re-run: it was made from {leaf.get('what')}")
    raise RecipeError(f"unknown recipe step {op!r}")


def _list(mapping: Mapping[str, Any], name: str) -> list:
    value = mapping.get(name)
    if not isinstance(value, list):
        raise RecipeError(f"recipe part '{name}' must be a list, not {value!r}")
    return value


def _path(input_id: str, context: _Context) -> Path:
    if input_id not in context.paths:
        raise RecipeError(f"the recipe refers to '{input_id}', which is not one of its inputs")
    return context.paths[input_id]


def run_recipe(
    recipe: Mapping[str, Any] | str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    folders: Iterable[str | os.PathLike] = (),
    files: Mapping[str, str | os.PathLike] | None = None,
    find: Callable[[str], Iterable[str | os.PathLike]] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool | None] | None = None,
) -> TaskVector | Path:
    """Re-run a recipe (a dict, JSON text, a ``.json`` file or a saved file holding one).

    Inputs are looked up by file name in ``files`` ({name: path}), then in ``folders`` (and, when ``recipe`` is
    a path, in its own folder), and checked against the recorded size and hashes first. Without
    ``output_path`` returns the task vector (lazy where possible; merges run now). With ``output_path`` writes
    what the recipe describes — a task vector file, a checkpoint (base + merge) or a LoRA, with the recorded
    dtype and settings — and returns the path; its recipe equals the original's.
    """
    folders = list(folders)
    if isinstance(recipe, (str, os.PathLike)) and not str(recipe).lstrip().startswith("{"):
        folders.append(Path(recipe).resolve().parent)
    recipe = read_recipe(recipe)
    require_rerunnable(recipe)
    paths = locate_inputs(recipe, folders, files, find)
    kind = recipe["result"]["kind"]
    if output_path is None:
        return task_vector_of(recipe, paths, device=device, progress=progress, should_stop=should_stop)
    if kind == "checkpoint":
        return _rerun_checkpoint(recipe, paths, Path(output_path), device, progress, should_stop)
    vector = task_vector_of(recipe, paths, device=device, progress=progress, should_stop=should_stop)
    return write_result(
        recipe["result"],
        vector,
        Path(output_path),
        device=device,
        should_stop=should_stop,
        full_hash=full_hashes(recipe),
    )


def full_hashes(recipe: Mapping[str, Any]) -> bool:
    """Whether the recipe recorded whole-file SHA-256s (a re-run records them too, so its recipe is equal)."""
    return any("sha256" in entry for entry in recipe.get("inputs", {}).values())


def write_result(
    result: Mapping[str, Any],
    vector: TaskVector,
    output_path: Path,
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool | None] | None = None,
    metadata: Mapping[str, str] | None = None,
    full_hash: bool = False,
) -> Path:
    """Write ``vector`` as the file a task-vector or LoRA recipe result describes."""
    from .lora_extract import extract_lora
    from .task_vector_files import save_task_vector

    if result["kind"] == "task_vector":
        dtype = result.get("dtype", "float16")
        done = (lambda count: progress(count, len(vector))) if progress is not None else None
        return save_task_vector(
            vector, output_path, dtype=dtype, device=device, progress=done, metadata=metadata, full_hash=full_hash
        )
    if result["kind"] == "lora":
        settings = {name: result.get(name) for name in ("rank", "energy", "max_rank")}
        extract_lora(
            vector,
            output_path,
            **settings,
            conv=result.get("conv", "locon"),
            other_keys=result.get("other_keys", "diff"),
            backend=result.get("backend", "auto"),
            dtype=result.get("dtype", "float16"),
            device=device,
            metadata=metadata,
            progress=progress,
            should_stop=should_stop,
            full_hash=full_hash,
        )
        return output_path
    raise RecipeError(f"a '{result['kind']}' result is not written from a task vector")


def _rerun_checkpoint(recipe, paths, output_path, device, progress, should_stop) -> Path:
    """base + merge of (finetunedᵢ − base): the only checkpoint recipe this version writes."""
    from .merge_files import merge_checkpoint_files

    base_id = recipe["result"].get("base")
    plan = _checkpoint_merge_plan(recipe, base_id)
    if plan is None:
        raise RecipeError(
            "this checkpoint recipe is not a merge of fine-tunes of its base file, the only kind this version re-runs"
        )
    merge, finetuned_ids = plan
    return merge_checkpoint_files(
        paths[base_id],
        [paths[i] for i in finetuned_ids],
        output_path,
        merge["method"],
        dtype=recipe["result"].get("dtype", "float16"),
        device=device,
        progress=progress,
        should_stop=should_stop,
        full_hash=full_hashes(recipe),
        **merge.get("params", {}),
    )


def _checkpoint_merge_plan(recipe, base_id) -> tuple[dict, list[str]] | None:
    terms = recipe["task_vector"].get("sum") or []
    if base_id is None or len(terms) != 1 or terms[0].get("coefficient") != 1.0:
        return None
    merge = terms[0]["leaf"]
    if merge.get("op") != "merge":
        return None
    finetuned = []
    for expression in merge.get("inputs", []):
        inner = expression.get("sum") or []
        if len(inner) != 1 or inner[0].get("coefficient") != 1.0:
            return None
        leaf = inner[0]["leaf"]
        if leaf.get("op") != "difference" or leaf.get("base") != base_id or leaf.get("key_filter"):
            return None
        finetuned.append(leaf["finetuned"])
    return merge, finetuned


def recipe_inputs_table(recipe: Mapping[str, Any]) -> list[str]:
    """One line per input: name, size and hash (for node displays and error messages)."""
    lines = []
    for input_id, entry in recipe.get("inputs", {}).items():
        size = entry.get("bytes")
        size_text = f"{size / 1e6:,.1f} MB" if isinstance(size, int) else "? bytes"
        lines.append(f"{input_id}: {entry.get('file')} ({size_text}, {HASH_NAME} {str(entry.get(HASH_NAME))[:12]}…)")
    return lines


def save_recipe(recipe: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a recipe as indented JSON (a ``.json`` file to share or to keep in a recipes folder)."""
    check_recipe(recipe)
    path = Path(path)
    path.write_text(json.dumps(recipe, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


__all__: Sequence[str] = (
    "RECIPE_FORMAT",
    "RECIPE_METADATA_KEY",
    "RECIPE_VERSION",
    "RecipeError",
    "RecipeInputChanged",
    "RecipeInputMissing",
    "check_recipe",
    "locate_inputs",
    "read_recipe",
    "recipe_of",
    "run_recipe",
    "save_recipe",
    "task_vector_of",
)
