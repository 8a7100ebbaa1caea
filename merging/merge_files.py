"""Merging checkpoint files into a checkpoint file, streamed: no model is ever loaded whole.

Every source is read one tensor at a time (:mod:`merging.io`), the merge runs chunk by chunk
(:func:`merging.merge.iter_merged`) and the result is written as it is produced, so memory stays at a
few chunks whatever the model size — a Flux-size merge of fp8 files fits in a few GiB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .chunks import as_sources, union_shapes
from .io import SafetensorsFile, parse_dtype, write_safetensors
from .keys import unet_key_map
from .merge import iter_merged
from .methods import resolve_merge
from .task_vector_files import task_vector_from_files


def merge_checkpoint_files(
    base_path: str | os.PathLike,
    finetuned_paths: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    method: str,
    *,
    dtype: str | torch.dtype = "fp16",
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool | None] | None = None,
    **params: Any,
) -> Path:
    """Write base + merge(τᵢ = finetunedᵢ − base) to ``output_path`` in the base file's own layout.

    ``method`` and ``params`` are those of :func:`merging.merge_task_vectors`. The diffusion-model keys are
    merged; every other tensor of the base file (text encoder, VAE) is copied. Floating-point tensors are
    stored in ``dtype``. The merge recipe goes into the metadata. Returns the written path.
    """
    target = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    base = SafetensorsFile(base_path)
    unet = unet_key_map(base.keys(), source=Path(base_path).name)
    vectors = [task_vector_from_files(path, base_path) for path in finetuned_paths]
    config = resolve_merge(method, len(vectors), **params)
    merged_keys = list(union_shapes(as_sources(vectors)))
    copied = [key for key in base if key not in set(unet.values())]
    specs = [_spec(base, unet[key], target) for key in merged_keys] + [_spec(base, key, target) for key in copied]

    def stream():
        merged = iter_merged(vectors, method, device=device, progress=progress, should_stop=should_stop, **params)
        for key, delta in merged:
            yield unet[key], base[unet[key]].to(device=delta.device, dtype=torch.float32).add_(delta)
        for key in copied:
            yield key, base[key]

    metadata = {
        "dm_recipe": json.dumps(config.recipe()),
        "dm_base": Path(base_path).name,
        "dm_sources": json.dumps([Path(p).name for p in finetuned_paths]),
        "dm_base_fingerprint": vectors[0].base_fingerprint or "",
    }
    return write_safetensors(output_path, specs, stream(), metadata)


def _spec(file: SafetensorsFile, key: str, target: torch.dtype):
    stored = file.dtype_of(key)
    return key, target if stored.is_floating_point else stored, file.shape_of(key)
