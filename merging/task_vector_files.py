"""Task vectors on disk: extraction streamed from two model files, and the saved format.

Saved task vectors use ComfyUI's "full diff" LoRA layout, so the stock ``LoraLoaderModelOnly`` applies
them: ``<module>.diff`` for a ``<module>.weight``, ``<module>.diff_b`` for a ``<module>.bias`` and
``<key>.diff`` for any other parameter (diffusion-model keys only; the stock loader maps those by their
full name). Keys keep the ``diffusion_model.`` / ``text_encoders.`` prefixes of :mod:`merging.keys`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .file_identity import FileOrigin
from .io import RenamedMapping, SafetensorsFile, parse_dtype, write_safetensors
from .keys import UNET_PREFIX, unet_key_map
from .task_vectors import StoredDeltas, TaskVector, extract_task_vector

logger = logging.getLogger(__name__)

FORMAT = "diffusion-merge/task-vector/1"
_WEIGHT, _BIAS = ".weight", ".bias"


def open_diffusion_model(path: str | os.PathLike) -> RenamedMapping:
    """A lazy view of a checkpoint's or diffusion-model file's UNet/DiT weights as ``diffusion_model.…``."""
    file = SafetensorsFile(path)
    return RenamedMapping(file, unet_key_map(file.keys(), source=Path(path).name))


def task_vector_from_files(
    finetuned_path: str | os.PathLike,
    base_path: str | os.PathLike,
    *,
    key_filter: str | None = None,
    nonfinite: str = "error",
) -> TaskVector:
    """finetuned − base streamed from two safetensors files (fp32/fp16/bf16/fp8), one key at a time."""
    finetuned, base = open_diffusion_model(finetuned_path), open_diffusion_model(base_path)
    names = (Path(finetuned_path).name, Path(base_path).name)
    vector = extract_task_vector(finetuned, base, key_filter=key_filter, nonfinite=nonfinite, names=names)
    vector.terms[0][1].origin = difference_origin(finetuned_path, base_path, key_filter)
    return vector


def difference_origin(finetuned_path, base_path, key_filter: str | None) -> dict:
    """The recipe origin of finetuned − base read from two files (see :mod:`merging.recipes`)."""
    return {
        "op": "difference",
        "finetuned": FileOrigin.of(finetuned_path),
        "base": FileOrigin.of(base_path),
        "key_filter": key_filter or None,
    }


def saved_key(key: str) -> str:
    """The name a task-vector key is stored under (see the module docstring)."""
    if key.endswith(_WEIGHT):
        return key[: -len(_WEIGHT)] + ".diff"
    if key.endswith(_BIAS):
        return key[: -len(_BIAS)] + ".diff_b"
    if key.startswith(UNET_PREFIX):
        return key + ".diff"
    raise ValueError(f"key '{key}' cannot be stored in the LoRA-loader format (only weights and biases can)")


def save_task_vector(
    vector: TaskVector,
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float16,
    metadata: Mapping[str, str] | None = None,
    device: torch.device | str | None = None,
    progress=None,
    overflow: str = "error",
    full_hash: bool = False,
) -> Path:
    """Write a task vector key by key, atomically, loadable by ComfyUI's stock LoRA loaders.

    ``progress`` (optional) is called with the number of keys written so far after each key. A delta with
    values beyond ``dtype``'s range (e.g. > 65504 in fp16) stops the save naming the key, unless
    ``overflow="clamp"`` (see :func:`merging.io.write_safetensors`). The metadata holds a re-runnable recipe
    (:mod:`merging.recipes`; ``full_hash`` adds whole-file SHA-256s of its inputs).
    """
    from .recipes import RECIPE_METADATA_KEY, recipe_of  # recipes imports this module

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    keys = vector.keys()
    raw_keys = [k for k in keys if not k.endswith((_WEIGHT, _BIAS))]
    specs = [(saved_key(k), dtype, vector.shape(k)) for k in keys]
    header = {
        "dm_format": FORMAT,
        "dm_base_fingerprint": vector.base_fingerprint or "",
        "dm_sources": json.dumps(list(vector.sources)),
        "dm_recipe": json.dumps(vector.recipe),
        "dm_raw_keys": json.dumps(raw_keys),
        "dm_dtype": str(dtype).removeprefix("torch."),
        RECIPE_METADATA_KEY: json.dumps(
            recipe_of(vector, {"kind": "task_vector", "dtype": str(dtype).removeprefix("torch.")}, full_hash=full_hash)
        ),
        **(metadata or {}),
    }

    stream = ((saved_key(key), vector.delta(key, device)) for key in keys)
    return write_safetensors(path, specs, stream, header, progress, overflow)


def load_task_vector(path: str | os.PathLike, nonfinite: str = "error") -> TaskVector:
    """A lazy task vector over a saved file (this pack's or ComfyUI's ``full_diff`` LoRA format)."""
    file = SafetensorsFile(path)
    raw_keys = set(json.loads(file.metadata.get("dm_raw_keys", "[]")))
    names = {}
    for stored in file.keys():
        names[_parameter_key(stored, raw_keys, Path(path).name)] = stored
    if not names:
        raise ValueError(f"'{Path(path).name}' holds no tensors")
    sources = tuple(json.loads(file.metadata.get("dm_sources", "[]"))) or (Path(path).name,)
    leaf = StoredDeltas(RenamedMapping(file, names), Path(path).name)
    leaf.origin = {"op": "stored", "file": FileOrigin.of(path)}
    return TaskVector(
        ((1.0, leaf),),
        base_fingerprint=file.metadata.get("dm_base_fingerprint") or None,
        nonfinite=nonfinite,
        sources=sources,
    )


def _parameter_key(stored: str, raw_keys: set[str], filename: str) -> str:
    if stored.endswith(".diff_b"):
        return stored[: -len(".diff_b")] + _BIAS
    if stored.endswith(".diff"):
        stem = stored[: -len(".diff")]
        return stem if stem in raw_keys else stem + _WEIGHT
    if any(marker in stored for marker in ("lora_up", "lora_down", "lora_A", "lora_B", "hada_", "lokr_")):
        raise ValueError(f"'{filename}' is a LoRA (key '{stored}'); use 'Task Vector from LoRA' for it")
    raise ValueError(f"'{filename}': key '{stored}' is not a task-vector key (expected '….diff' / '….diff_b')")
