"""Merging checkpoint files into a checkpoint file, streamed: no model is ever loaded whole.

Every source is read one tensor at a time (:mod:`merging.io`), the merge runs chunk by chunk
(:func:`merging.merge.iter_merged`) and the result is written as it is produced, so memory stays at a
few chunks whatever the model size — a Flux-size merge of fp8 files fits in a few GiB.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .chunks import CHUNK_NUMEL, as_sources, union_shapes
from .io import ReadBuffer, RenamedMapping, SafetensorsFile, as_float32, parse_dtype, write_safetensors
from .keys import unet_key_map
from .merge import iter_merged
from .methods import resolve_merge
from .task_vector_files import open_diffusion_model
from .task_vectors import extract_task_vector


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
    overflow: str = "error",
    **params: Any,
) -> Path:
    """Write base + merge(τᵢ = finetunedᵢ − base) to ``output_path`` in the base file's own layout.

    ``method`` and ``params`` are those of :func:`merging.merge_task_vectors`. The diffusion-model keys are
    merged; every other tensor of the base file (text encoder, VAE) is copied. Floating-point tensors are
    stored in ``dtype``; a merged weight beyond its range (or NaN/Inf) stops the write naming the key, unless
    ``overflow="clamp"`` (see :func:`merging.io.write_safetensors`). The merge recipe goes into the
    metadata. Returns the written path.
    """
    target = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    base = SafetensorsFile(base_path)
    unet = unet_key_map(base.keys(), source=Path(base_path).name)
    # One reader of the base for every task vector and the output: each base tensor is read once per pass
    # (not once per task vector plus once for the output), into one reused buffer.
    shared_base = RenamedMapping(_ChunkReads(base, _chunk_bytes(base, unet.values())), unet)
    names = [(Path(path).name, Path(base_path).name) for path in finetuned_paths]
    vectors = [
        extract_task_vector(open_diffusion_model(path), shared_base, names=pair)
        for path, pair in zip(finetuned_paths, names, strict=True)
    ]
    config = resolve_merge(method, len(vectors), **params)
    merged_keys = list(union_shapes(as_sources(vectors)))
    copied = [key for key in base if key not in set(unet.values())]
    specs = [_spec(base, unet[key], target) for key in merged_keys] + [_spec(base, key, target) for key in copied]

    def stream():
        upcast = ReadBuffer()
        merged = iter_merged(vectors, method, device=device, progress=progress, should_stop=should_stop, **params)
        for key, delta in merged:
            theta = as_float32(shared_base[key].to(delta.device), upcast)
            yield unet[key], delta.add_(theta)  # the delta is ours to overwrite
        for key in copied:
            yield key, base[key]

    metadata = {
        "dm_recipe": json.dumps(config.recipe()),
        "dm_base": Path(base_path).name,
        "dm_sources": json.dumps([Path(p).name for p in finetuned_paths]),
        "dm_base_fingerprint": vectors[0].base_fingerprint or "",
    }
    return write_safetensors(output_path, specs, stream(), metadata, overflow=overflow)


def _spec(file: SafetensorsFile, key: str, target: torch.dtype):
    stored = file.dtype_of(key)
    return key, target if stored.is_floating_point else stored, file.shape_of(key)


_ALIGN = 64
_KEY_SLACK = _ALIGN + 2 * 4096  # per tensor: alignment, and the block-aligned span of a direct read


def _chunk_bytes(file: SafetensorsFile, keys) -> int:
    """Room for two of the largest chunks a merge gathers from ``file`` (CHUNK_NUMEL entries or its largest
    key), so that a chunk's tensors rarely straddle the point where the buffer wraps around."""
    keys = list(keys)
    largest = max((math.prod(file.shape_of(k)) for k in keys), default=0)
    itemsize = max((file.dtype_of(k).itemsize for k in keys), default=4)
    return 2 * (max(CHUNK_NUMEL, largest) * itemsize + len(keys) * _KEY_SLACK)


class _ChunkReads(Mapping[str, torch.Tensor]):
    """A file mapping that reads tensors one after another into one reused buffer of ``size`` bytes and
    serves a tensor again while it is still there: the base tensors of a chunk are read once for all task
    vectors and the output. A returned tensor is valid until the buffer wraps around (the merge uses each
    before the next chunk is read); never modify one."""

    def __init__(self, file: SafetensorsFile, size: int):
        self.file = file
        self._arena = torch.empty(size, dtype=torch.uint8)
        self._kept: dict[str, torch.Tensor] = {}
        self._offset = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._kept:
            self._kept[key] = self.file.read(key, self)
        return self._kept[key]

    def take(self, size: int) -> torch.Tensor:
        """Memory for the next read (the ``ReadBuffer`` protocol); wraps around, forgetting older tensors."""
        if self._offset + size > self._arena.numel():
            self._kept.clear()
            self._offset = 0
        start = self._offset
        self._offset += -(-size // _ALIGN) * _ALIGN
        return self._arena[start : start + size]

    def __iter__(self) -> Iterator[str]:
        return iter(self.file)

    def __len__(self) -> int:
        return len(self.file)

    def __contains__(self, key: object) -> bool:
        return key in self.file

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.file.shape_of(key)

    def head(self, key: str, count: int) -> torch.Tensor:
        return self.file.head(key, count)
