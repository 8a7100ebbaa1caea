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

from .buffers import ByteMemory, Scratch
from .chunks import CHUNK_NUMEL, as_sources, union_shapes
from .device import best_device, runs_ahead
from .io import RenamedMapping, SafetensorsFile, as_float32, parse_dtype, write_safetensors
from .keys import unet_key_map
from .merge import iter_merged, merge_origin
from .methods import resolve_merge
from .recipes import RECIPE_METADATA_KEY, checkpoint_recipe
from .task_vector_files import difference_origin, open_diffusion_model
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
    full_hash: bool = False,
    **params: Any,
) -> Path:
    """Write base + merge(τᵢ = finetunedᵢ − base) to ``output_path`` in the base file's own layout.

    ``method`` and ``params`` are those of :func:`merging.merge_task_vectors`. The diffusion-model keys are
    merged; every other tensor of the base file (text encoder, VAE) is copied. Floating-point tensors are
    stored in ``dtype``; a merged weight beyond its range (or NaN/Inf) stops the write naming the key, unless
    ``overflow="clamp"`` (see :func:`merging.io.write_safetensors`). The merge recipe goes into the metadata,
    with a re-runnable one naming the input files by hash (:mod:`merging.recipes`; ``full_hash`` adds whole-file
    SHA-256s). Returns the written path.
    """
    target = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    base = SafetensorsFile(base_path)
    unet = unet_key_map(base.keys(), source=Path(base_path).name)
    # One reader of the base for every task vector and the output: each base tensor is read once per pass
    # (not once per task vector plus once for the output), into one reused buffer.
    # A merge on a device that runs ahead reads chunk i+1 before it hands out chunk i: room for one more chunk.
    run_device = torch.device(device) if device is not None else best_device()
    chunks_held = 3 if runs_ahead(run_device) else 2
    # fp16/bf16 base tensors are upcast once, there, instead of once per task vector and once for the output.
    upcast = all(base.dtype_of(key) in _UPCAST_ONCE for key in unet.values())
    arena = _chunk_bytes(base, unet.values(), chunks_held, itemsize=4 if upcast else None)
    shared_base = RenamedMapping(_ChunkReads(base, arena, upcast), unet)
    names = [(Path(path).name, Path(base_path).name) for path in finetuned_paths]
    vectors = [
        extract_task_vector(open_diffusion_model(path), shared_base, names=pair)
        for path, pair in zip(finetuned_paths, names, strict=True)
    ]
    for vector, path in zip(vectors, finetuned_paths, strict=True):
        vector.terms[0][1].origin = difference_origin(path, base_path, None)
    config = resolve_merge(method, len(vectors), **params)
    merged_keys = list(union_shapes(as_sources(vectors)))
    copied = [key for key in base if key not in set(unet.values())]
    specs = [_spec(base, unet[key], target) for key in merged_keys] + [_spec(base, key, target) for key in copied]

    def stream():
        upcast = Scratch()
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
        RECIPE_METADATA_KEY: json.dumps(
            checkpoint_recipe(
                base_path, merge_origin(config.recipe(), vectors, torch.float32), target, full_hash=full_hash
            )
        ),
    }
    return write_safetensors(output_path, specs, stream(), metadata, overflow=overflow)


def _spec(file: SafetensorsFile, key: str, target: torch.dtype):
    stored = file.dtype_of(key)
    return key, target if stored.is_floating_point else stored, file.shape_of(key)


_ALIGN = 64
_KEY_SLACK = _ALIGN + 2 * 4096  # per tensor: alignment, and the block-aligned span of a direct read


_UPCAST_ONCE = (torch.float16, torch.bfloat16)


def _chunk_bytes(file: SafetensorsFile, keys, chunks: int = 2, itemsize: int | None = None) -> int:
    """Room for ``chunks`` of the largest chunks a merge gathers from ``file`` (CHUNK_NUMEL entries or its
    largest key), held with ``itemsize`` bytes per entry (default: as stored): the chunks in use and one
    more, so that their tensors rarely straddle the point where the buffer wraps around."""
    keys = list(keys)
    largest = max((math.prod(file.shape_of(k)) for k in keys), default=0)
    itemsize = itemsize or max((file.dtype_of(k).itemsize for k in keys), default=4)
    return chunks * (max(CHUNK_NUMEL, largest) * itemsize + len(keys) * _KEY_SLACK)


class _ChunkReads(Mapping[str, torch.Tensor]):
    """A file mapping that reads tensors one after another into one reused buffer of ``size`` bytes and
    serves a tensor again while it is still there: the base tensors of a chunk are read once for all task
    vectors and the output. With ``upcast`` the buffer holds them in fp32 (read through a staging buffer):
    every user needs fp32, and converting once saves a conversion per task vector and one for the output.
    A returned tensor is valid until the buffer wraps around (the merge uses each before the next chunk is
    read); never modify one."""

    def __init__(self, file: SafetensorsFile, size: int, upcast: bool = False):
        self.file, self.upcast = file, upcast
        self._arena = torch.empty(size, dtype=torch.uint8)
        self._staging = Scratch()
        self._kept: dict[str, torch.Tensor] = {}
        self._offset = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._kept:
            if self.upcast:
                raw = self.file.read(key, self._staging)
                held = self.take(raw.numel() * 4).view(torch.float32).view(raw.shape)
                self._kept[key] = held.copy_(raw)
            else:
                self._kept[key] = self.file.read(key, self)
        return self._kept[key]

    def take(self, size: int) -> torch.Tensor:
        """Memory for the next read (:class:`~merging.buffers.ByteMemory`); wraps around, forgetting older tensors."""
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

    def read(self, key: str, buffer: ByteMemory) -> torch.Tensor:
        return self[key]  # already in this mapping's own memory

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.file.shape_of(key)

    def head(self, key: str, count: int) -> torch.Tensor:
        return self.file.head(key, count)
