"""Where merge work happens: task-vector sources, key plans, chunks of stacked deltas and scratch memory.

Every merge method runs on *chunks*: a few consecutive keys whose deltas are stacked into one fp32 tensor
of shape (N tasks, entries of those keys). Small keys share a chunk, so one kernel does the work of many
(GPU launch overhead dominates per-key code on models with thousands of small tensors); a key larger than
the chunk size gets a chunk of its own. Only one chunk is resident at a time, so memory stays bounded by
the chunk size and the largest key, never by the model.

On the CPU, stages that treat every entry on its own (global trims, sums, sign elections) run on *blocks*:
column ranges of a chunk small enough that the stack and its temporaries stay in the CPU caches while a
dozen elementwise ops pass over them, each about three times cheaper there than over main memory. A block
is gathered piece by piece from the sources (:func:`gather_block`), so even a key larger than a block is
never stacked whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from . import device as devices
from .buffers import Scratch
from .io import shape_of
from .keys import check_shared_keys, normalised
from .task_vectors import TaskVector, same_architecture

logger = logging.getLogger(__name__)

CHUNK_NUMEL = 1 << 24
"""Entries per task row of a chunk (64 MiB of fp32); keys larger than this get a chunk of their own."""

CPU_BLOCK_NUMEL = 1 << 19
"""Entries of all task rows of a CPU block together (2 MiB of fp32; per row, this over the number of tasks)."""

_CAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DeltaSource(Protocol):
    """What the merge needs from one task vector: its keys, their shapes, and one key's delta on demand."""

    def keys(self) -> Sequence[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def fetch(self, key: str, device: torch.device) -> torch.Tensor | None:
        """The key's delta on ``device`` in any float dtype (never mutated), or None if the key is absent."""

    def fetch_into(self, key: str, out: torch.Tensor, start: int = 0) -> bool:
        """Write the key's fp32 delta into ``out``: the whole key (``out`` has its shape), or entries
        [start, start + out.numel()) of the flattened key; False (``out`` untouched) when the key is absent.
        Ranges of one key are asked for in order from ``start`` 0, with no other key in between, so a source
        may keep what it read for the first range until the last."""


class MappingSource:
    """A key→tensor mapping (a dict, or a lazy file mapping that can tell shapes without reading)."""

    def __init__(self, mapping: Mapping[str, torch.Tensor]):
        self.mapping = mapping
        self._held: tuple[str, torch.Tensor] | None = None

    def keys(self) -> Sequence[str]:
        return list(self.mapping.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(shape_of(self.mapping, key))

    def fetch(self, key: str, device: torch.device) -> torch.Tensor | None:
        if key not in self.mapping:
            return None
        tensor = self.mapping[key]
        if tensor.dtype in _CAT_DTYPES:
            return tensor.to(device)
        return tensor.to(device=device, dtype=torch.float32)

    def fetch_into(self, key: str, out: torch.Tensor, start: int = 0) -> bool:
        if key not in self.mapping:
            return False
        if start == 0 or self._held is None or self._held[0] != key:
            self._held = (key, self.mapping[key].detach().reshape(-1))  # a file mapping reads it on every lookup
        out.copy_(_flat_range(self._held[1], start, out))
        return True


def _flat_range(flat: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
    """The entries of a flattened key that ``out`` receives, in ``out``'s shape."""
    return flat[start : start + out.numel()].view(out.shape)


class TaskVectorSource:
    """A lazy :class:`TaskVector`: each key's delta is computed when its chunk is gathered."""

    def __init__(self, vector: TaskVector):
        self.vector = vector
        self._held: tuple[str, torch.Tensor] | None = None

    def keys(self) -> Sequence[str]:
        return self.vector.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.vector.shape(key)

    def fetch(self, key: str, device: torch.device) -> torch.Tensor | None:
        return self.vector.delta(key, device) if key in self.vector else None

    def fetch_into(self, key: str, out: torch.Tensor, start: int = 0) -> bool:
        if key not in self.vector:
            return False
        plain = self.vector.plain_difference(key)
        if plain is not None:  # computed range by range, each straight into ``out``
            plain.compute_into(key, out, start)
        elif out.numel() == math.prod(self.vector.shape(key)):
            self.vector.delta_into(key, out)
        else:  # any other combination of leaves: the whole key once, then its ranges
            if start == 0 or self._held is None or self._held[0] != key:
                self._held = (key, self.vector.delta(key, out.device).reshape(-1))
            out.copy_(_flat_range(self._held[1], start, out))
        return True


def as_sources(task_vectors: Sequence[Mapping[str, torch.Tensor] | TaskVector]) -> list[DeltaSource]:
    """Wrap each task vector; warn when TaskVectors say they were extracted from different base models."""
    if isinstance(task_vectors, (Mapping, TaskVector)) or not isinstance(task_vectors, Sequence):
        raise ValueError("task_vectors must be a sequence (list or tuple) of key→tensor mappings or TaskVectors")
    if not task_vectors:
        raise ValueError("no task vectors to merge: pass at least one")
    sources: list[DeltaSource] = []
    for index, vector in enumerate(task_vectors, start=1):
        if isinstance(vector, TaskVector):
            sources.append(TaskVectorSource(vector))
        elif isinstance(vector, Mapping):
            sources.append(MappingSource(normalised(vector, f"task vector {index}")))
        else:
            raise ValueError(
                f"task vector {index} is a {type(vector).__name__}; expected a key→tensor mapping or a TaskVector"
            )
    _check_key_sets(task_vectors, sources)
    fingerprints = {v.base_fingerprint for v in task_vectors if isinstance(v, TaskVector) and v.base_fingerprint}
    if len(fingerprints) > 1:
        logger.warning(
            "merging task vectors extracted from different base models (fingerprints %s); "
            "the merge is only meaningful on a shared base",
            ", ".join(sorted(fingerprints)),
        )
    return sources


def _check_key_sets(task_vectors, sources: list[DeltaSource]) -> None:
    """Refuse task vectors whose keys barely meet the first one's (see :func:`merging.keys.check_shared_keys`);
    task vectors extracted from one base architecture may hold disjoint parts of it (key filters)."""
    first_print = getattr(task_vectors[0], "base_fingerprint", None)
    for index, (vector, source) in enumerate(zip(task_vectors[1:], sources[1:], strict=True), start=2):
        if same_architecture(first_print, getattr(vector, "base_fingerprint", None)):
            continue
        check_shared_keys(sources[0].keys(), source.keys(), ("task vector 1", f"task vector {index}"))


def union_shapes(sources: Sequence[DeltaSource]) -> dict[str, tuple[int, ...]]:
    """Every key of any task vector with its shape, in first-seen order; a key absent from a task is zero."""
    shapes: dict[str, tuple[int, ...]] = {}
    first: dict[str, int] = {}
    for index, source in enumerate(sources, start=1):
        for key in source.keys():
            shape = tuple(source.shape(key))
            if key not in shapes:
                shapes[key], first[key] = shape, index
            elif shapes[key] != shape:
                raise ValueError(
                    f"task vector {index}: key '{key}' is {shape} but task vector {first[key]} has "
                    f"{shapes[key]} — were both extracted from the same architecture?"
                )
    if not shapes:
        raise ValueError("the task vectors hold no keys")
    return shapes


@dataclass(frozen=True)
class Segment:
    """One key's place in a chunk: entries [offset, offset + numel) of every task row."""

    key: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class Chunk:
    """Consecutive keys stacked together; see the module docstring."""

    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        last = self.segments[-1]
        return last.offset + last.numel

    @staticmethod
    def of(segment: Segment) -> Chunk:
        """A chunk holding just this key, rebased to offset 0 (for per-key stages)."""
        return Chunk((Segment(segment.key, 0, segment.shape),))


def plan_chunks(shapes: Mapping[str, tuple[int, ...]], keys: Sequence[str], limit: int = CHUNK_NUMEL) -> list[Chunk]:
    """Group ``keys`` (in order) into chunks of at most ``limit`` entries; a larger key stands alone."""
    chunks: list[Chunk] = []
    current: list[Segment] = []
    offset = 0
    for key in keys:
        numel = math.prod(shapes[key])
        if current and offset + numel > limit:
            chunks.append(Chunk(tuple(current)))
            current, offset = [], 0
        current.append(Segment(key, offset, shapes[key]))
        offset += numel
    if current:
        chunks.append(Chunk(tuple(current)))
    return chunks


@dataclass(frozen=True)
class Piece:
    """Entries [start, stop) of one key (flattened), at column ``column`` of a block."""

    segment: Segment
    start: int
    stop: int
    column: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.segment.numel


@dataclass(frozen=True)
class Block:
    """Columns ``span`` of a chunk's stack and the pieces of keys they hold (see the module docstring)."""

    span: slice
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return self.span.stop - self.span.start


def cpu_block_columns(tasks: int) -> int:
    """Columns per CPU block for ``tasks`` task rows (:data:`CPU_BLOCK_NUMEL` entries in all)."""
    return max(1, CPU_BLOCK_NUMEL // max(1, tasks))


def plan_blocks(chunk: Chunk, columns: int) -> list[Block]:
    """``chunk`` cut into blocks of at most ``columns`` columns, each listing the key pieces it holds."""
    blocks = []
    for begin in range(0, chunk.numel, columns):
        end = min(begin + columns, chunk.numel)
        pieces = []
        for segment in chunk.segments:
            low, high = max(begin, segment.offset), min(end, segment.offset + segment.numel)
            if low < high:
                pieces.append(Piece(segment, low - segment.offset, high - segment.offset, low - begin))
        blocks.append(Block(slice(begin, end), tuple(pieces)))
    return blocks


class ChunkTables:
    """A plan's chunks described on the device, for kernels that work on a whole chunk at once.

    Built once per merge, with one small host-to-device copy per table (a copy per chunk would make the host
    wait for the device on CUDA). Segment s of the plan is the s-th key of the plan's chunks in order; chunk i
    owns segments ``segments(i)``.
    """

    def __init__(self, chunks: Sequence[Chunk], device: torch.device):
        self.chunks, self.device = list(chunks), device
        self.index = {chunk: i for i, chunk in enumerate(self.chunks)}
        self.bounds = [0]
        for chunk in self.chunks:
            self.bounds.append(self.bounds[-1] + len(chunk.segments))
        self.numels = devices.to_device([s.numel for c in self.chunks for s in c.segments], torch.int64, device)
        self.starts = devices.to_device([s.offset for c in self.chunks for s in c.segments], torch.int64, device)
        self._tables: dict[Hashable, torch.Tensor] = {}

    def segments(self, chunk: Chunk) -> slice:
        i = self.index[chunk]
        return slice(self.bounds[i], self.bounds[i + 1])

    def table(self, name: Hashable, build: Callable[[], list], dtype: torch.dtype) -> torch.Tensor:
        """A (…, segments) table of the plan: ``build()`` (nested host lists) on the device, made once."""
        if name not in self._tables:
            self._tables[name] = devices.to_device(build(), dtype, self.device)
        return self._tables[name]

    def segment_ids(self, chunk: Chunk, scratch: Scratch) -> torch.Tensor:
        """(entries,) int32: each entry's segment within ``chunk`` (0 … keys − 1)."""
        span = self.segments(chunk)
        ids = torch.arange(span.stop - span.start, dtype=torch.int32, device=self.device)
        if len(ids) == 1:
            return scratch.get("segment_ids", (chunk.numel,), torch.int32).zero_()
        return torch.repeat_interleave(ids, self.numels[span], output_size=chunk.numel)


def gather(sources: Sequence[DeltaSource], chunk: Chunk, device: torch.device, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (N, chunk entries) with each task's fp32 deltas for the chunk's keys; absent keys are 0.

    Nothing is checked here: see :class:`FiniteCheck`.
    """
    for row, source in zip(out, sources, strict=True):
        part = gather_row(source, chunk, device, row)
        if part is not row:
            row.copy_(part)
    return out


def gather_row(source: DeltaSource, chunk: Chunk, device: torch.device, row: torch.Tensor) -> torch.Tensor:
    """One task's deltas for the chunk's keys, flat: in ``row`` (fp32), or a tensor in the source's own dtype.

    On accelerators a task's keys are concatenated in one kernel (launches dominate there) and returned as
    they are stored (fp16 stays fp16: the caller converts while it computes). On the CPU each key is copied
    into ``row``, which converts fp16/bf16 without the temporary a mixed-dtype ``cat`` makes.
    """
    batched = devices.batched_kernels(device)
    if not batched:
        for segment in chunk.segments:
            if not source.fetch_into(segment.key, row[segment.span].view(segment.shape)):
                row[segment.span].zero_()
        return row
    fetched = [source.fetch(segment.key, device) for segment in chunk.segments]
    parts = [part for part in fetched if part is not None]
    if len(parts) == len(fetched) and all(part.dtype == parts[0].dtype for part in parts):
        flat = [part.reshape(-1) for part in parts]
        if parts[0].dtype == torch.float32:
            return torch.cat(flat, out=row)
        return torch.cat(flat)
    for segment, part in zip(chunk.segments, fetched, strict=True):
        if part is None:
            row[segment.span].zero_()
        else:
            row[segment.span].copy_(part.reshape(-1))
    return row


def gather_block(sources: Sequence[DeltaSource], block: Block, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (N, block columns, fp32) with each task's deltas for the block's key pieces (absent keys
    are 0). Blocks of a chunk must be gathered in order (sources keep a key's inputs from piece to piece)."""
    for row, source in zip(out, sources, strict=True):
        for piece in block.pieces:
            part = row[piece.column : piece.column + piece.stop - piece.start]
            if piece.whole:
                part = part.view(piece.segment.shape)
            if not source.fetch_into(piece.segment.key, part, piece.start):
                part.zero_()
    return out


class FiniteCheck:
    """Refuses NaN/Inf deltas, naming the task and key, without stalling an accelerator on every chunk.

    ``record(stack, chunk)`` queues the test of a gathered chunk (a finite sum proves every entry finite; on
    CUDA the verdict is copied to pinned host memory asynchronously); ``confirm(chunk)`` waits for that
    chunk's verdict only — the merge confirms chunk i after queueing chunk i+1, so the device never runs
    dry — and raises ValueError when it failed, after gathering the chunk again to find the culprit (the
    stack has been reused by then). The test costs one host read per chunk, none per key.
    """

    def __init__(self, sources: Sequence[DeltaSource], device: torch.device):
        self.sources, self.device = sources, device
        self._pending: dict[Chunk, object] = {}

    def record(self, stack: torch.Tensor, chunk: Chunk) -> None:
        """Queue the test of ``stack``: the gathered chunk, or anything every delta of it flows into
        (NaN/Inf survive multiplication and sums; a finite result proves finite inputs). On the CPU a chunk
        may be recorded block by block: its verdict is that of all its blocks."""
        finite = torch.isfinite(stack.sum())
        if self.device.type != "cuda":
            self._pending[chunk] = self._pending.get(chunk, True) and bool(finite)
            return
        verdict = torch.empty((), dtype=torch.bool, pin_memory=True)
        verdict.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending[chunk] = (verdict, event)

    def confirm(self, chunk: Chunk) -> None:
        pending = self._pending.pop(chunk)
        if isinstance(pending, tuple):
            verdict, event = pending
            event.synchronize()
            pending = bool(verdict)
        if not pending:
            self.raise_for(chunk)

    def raise_for(self, chunk: Chunk) -> None:
        """Gather ``chunk`` again and raise for its first non-finite task and key (a non-finite *sum* can
        also be an overflow of finite values, which passes)."""
        stack = gather(
            self.sources, chunk, self.device, torch.empty(len(self.sources), chunk.numel, device=self.device)
        )
        for index, row in enumerate(stack, start=1):
            for segment in chunk.segments:
                if not bool(torch.isfinite(row[segment.span]).all()):
                    raise ValueError(
                        f"task vector {index}: key '{segment.key}' has NaN/Inf values in its delta — "
                        "fix the source model, or extract the task vector with non-finite keys skipped"
                    )
