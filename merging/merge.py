"""Merging task vectors: the public entry points and the one pipeline every method runs through.

::

    from merging import merge_task_vectors, iter_merged
    merged = merge_task_vectors([tau_a, tau_b, tau_c], "ties", k=0.2, lam=1.0)        # dict of fp32 CPU deltas
    for key, delta in iter_merged([tau_a, tau_b], "drm", direction="auto"):            # streaming, on the GPU
        ...

Per chunk of keys (see :mod:`merging.chunks`): gather the N deltas in fp32 on the device → sparsify
(:mod:`merging.sparsify`; DRM first moves 2-D weights into their joint SVD basis, :mod:`merging.drm`) →
elect signs and combine (:mod:`merging.consensus`) → multiply by λ and the per-key weights. Global
magnitude trims (TIES' whole-model top-k, LaS masks, DRM's optional non-linear trim) first stream the
model once or twice to find each task's exact threshold (:mod:`merging.topk`); nothing is ever
concatenated beyond one chunk. Which stages a method uses is data, in :mod:`merging.methods`.

On accelerators the host never waits for the device inside a merge except where a decision must reach
Python (once per merge for a global trim, once per weight for DRM's ``eigh``): every chunk is queued, and its
NaN/Inf verdict is read one chunk later (:class:`merging.chunks.FiniteCheck`). ``tests/unit/test_merge_syncs.py``
counts host reads and kernel launches per merge on the CPU so that per-key ones cannot come back.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from . import consensus, drm, sparsify
from . import device as devices
from .blocks import check_blocks_exist
from .chunks import (
    CHUNK_NUMEL,
    Block,
    Chunk,
    ChunkTables,
    FiniteCheck,
    Scratch,
    as_sources,
    cpu_block_columns,
    gather,
    gather_block,
    gather_row,
    plan_blocks,
    plan_chunks,
    union_shapes,
)
from .device import best_device
from .key_weights import key_multiplier
from .methods import Basis, CombineStep, MergeConfig, Sparsify, resolve_merge
from .task_vectors import StoredDeltas, TaskVector
from .topk import NonFiniteMagnitudes, kth_largest_magnitude

logger = logging.getLogger(__name__)

TaskVectors = Sequence[Mapping[str, torch.Tensor] | TaskVector]
Progress = Callable[[int, int], None]


class MergeCancelled(RuntimeError):
    """Raised when the ``should_stop`` hook asks a running merge to stop."""


def merge_task_vectors(task_vectors: TaskVectors, method: str, **params: Any) -> dict[str, torch.Tensor]:
    """Merge task vectors into one delta per key: a dict of fp32 CPU tensors.

    ``task_vectors`` is a sequence of key→tensor mappings (dicts, lazy file mappings) or
    :class:`~merging.TaskVector` objects; a key absent from some of them counts as a zero delta there.
    ``method`` is one of "weighted", "ties", "dare", "las", "drm"; parameters and conventions are in
    the README (sections "Methods and parameters", "Conventions"). Add the result to the base weights to
    get the merged model (:func:`merging.apply_task_vector`). Accepts ``device=`` and ``chunk_numel=`` like
    :func:`iter_merged`.
    """
    return {key: delta.to("cpu", copy=True) for key, delta in iter_merged(task_vectors, method, **params)}


def iter_merged(
    task_vectors: TaskVectors,
    method: str,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool | None] | None = None,
    chunk_numel: int = CHUNK_NUMEL,
    **params: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the merge: yield (key, merged fp32 delta on ``device``) one key at a time.

    Work runs on ``device`` (default :func:`merging.device.best_device`). Keys are processed in chunks of
    about ``chunk_numel`` entries per task, so memory holds one chunk and never the whole model; yielded
    tensors are views of a buffer that the next chunk reuses (clone one to keep it). ``progress(done, total)``
    is called after each chunk, counting keys over every pass (global trims read the model up to twice
    before the merge pass). ``should_stop()`` is called before each chunk: it may raise (ComfyUI's
    ``throw_exception_if_processing_interrupted``) or return True, which raises :class:`MergeCancelled`.

    Everything is validated before this returns (raises ValueError: unknown method or parameter, values
    out of range, empty set, shape mismatches, a ``block_weights`` name that matches no key); NaN/Inf deltas
    raise ValueError when their chunk is read.
    """
    sources = as_sources(task_vectors)
    config = resolve_merge(method, len(sources), **params)
    shapes = union_shapes(sources)
    check_blocks_exist(config.params["block_weights"] or {}, shapes)
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel must be positive, not {chunk_numel}")
    run = _MergeRun(config, sources, shapes, _device(device), progress, should_stop, chunk_numel)
    return run.merged()


def _device(device: torch.device | str | None) -> torch.device:
    return best_device() if device is None else torch.device(device)


class _MergeRun:
    """One merge in progress: the configured stages applied chunk by chunk."""

    def __init__(self, config: MergeConfig, sources, shapes, device, progress, should_stop, chunk_numel):
        self.config, self.sources, self.shapes, self.device = config, sources, shapes, device
        self.progress, self.should_stop = progress, should_stop
        self.chunk_numel = chunk_numel
        self.block_columns = cpu_block_columns(len(sources))
        self.scratch = Scratch(device)
        self.finite = FiniteCheck(sources, device)
        self.tables: ChunkTables | None = None
        self.weights = None if config.uniform_weights else torch.tensor(config.weights, device=device)
        self.linear = {
            key: config.method.basis is Basis.SVD and drm.is_linear(key, shape, config.params["conv"])
            for key, shape in shapes.items()
        }
        self.raw_keys = [key for key in shapes if not self.linear[key]]
        self.global_trim = self._needs_global_trim()
        self.done = 0
        self.total = len(shapes) + (2 * len(self.raw_keys) if self.global_trim else 0)

    # -- passes ---------------------------------------------------------------------------------------

    def merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        started = time.perf_counter()
        thresholds = self._global_thresholds() if self.global_trim else None
        chunks = plan_chunks(self.shapes, list(self.shapes), self.chunk_numel)
        self.tables = ChunkTables(chunks, self.device) if self._needs_tables() else None
        # On a device that runs ahead, chunk i is yielded (after its NaN/Inf verdict) once chunk i+1 is queued,
        # so the host never waits for a chunk the device has just started; each needs its own output buffer.
        lag = 1 if devices.runs_ahead(self.device) else 0
        pending: list[tuple[Chunk, torch.Tensor]] = []
        for index, chunk in enumerate(chunks):
            out = self.scratch.get(
                f"out{index % (lag + 1)}", (chunk.numel,)
            )  # yielded views: valid until the next chunk
            if self._sums_rows():
                self._weighted_sum_of_rows(chunk, out)
            elif self.config.method.basis is Basis.SVD:
                self._merge_per_key(self._gather(chunk, check=True), out, chunk, thresholds)
            elif self._in_blocks(for_merge=True):
                self._check_stop()
                for block in plan_blocks(chunk, self.block_columns):
                    stack = self._gather_block(chunk, block, check=True)
                    self._merge_raw(stack, out[block.span], chunk, thresholds)
            else:
                self._merge_raw(self._gather(chunk, check=True), out, chunk, thresholds)
            self._scale(out, chunk)
            pending.append((chunk, out))
            if len(pending) > lag:
                yield from self._release(*pending.pop(0))
        while pending:
            yield from self._release(*pending.pop(0))
        logger.info(
            "%s merge of %d task vectors, %d keys: %.2f s on %s",
            self.config.method.name,
            len(self.sources),
            len(self.shapes),
            time.perf_counter() - started,
            self.device,
        )

    def _release(self, chunk: Chunk, out: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        self.finite.confirm(chunk)
        self._advance(len(chunk.segments))
        for segment in chunk.segments:
            yield segment.key, out[segment.span].view(segment.shape)

    def _global_thresholds(self) -> torch.Tensor:
        """Each task's exact threshold over all raw keys (TIES / LaS / DRM non-linear trims)."""
        chunks = plan_chunks(self.shapes, self.raw_keys, self.chunk_numel)
        entries = sum(math.prod(self.shapes[key]) for key in self.raw_keys)
        rank = self._rule.rank(self.config.trim_keep, entries)

        passes = itertools.count()

        def stacks() -> Iterator[torch.Tensor]:
            # The histograms do not depend on order. The first pass walks the keys backwards, so the merge
            # pass, which walks them forwards, starts on what this pass left in the page cache: inputs larger
            # than RAM are otherwise read from disk in full by every pass.
            # NaN/inf are not checked here: they land in the histogram's top bins.
            for chunk in reversed(chunks) if next(passes) == 0 else chunks:
                if self._in_blocks(for_merge=False):
                    self._check_stop()
                    for block in plan_blocks(chunk, self.block_columns):
                        yield self._gather_block(chunk, block, check=False)
                else:
                    yield self._gather(chunk, check=False)
                self._advance(len(chunk.segments))

        try:
            thresholds = kth_largest_magnitude(stacks, [rank] * len(self.sources), self.device)
        except NonFiniteMagnitudes:
            for chunk in chunks:
                self.finite.raise_for(chunk)
            raise
        self.done = 2 * len(self.raw_keys)
        self._report()
        return thresholds

    # -- stages ---------------------------------------------------------------------------------------

    def _merge_raw(self, stack: torch.Tensor, out: torch.Tensor, chunk: Chunk, thresholds) -> None:
        """Sparsify → elect → combine on raw entries (every method but DRM's 2-D weights)."""
        config, weights = self.config, self.weights
        mask = self.scratch.get("work", tuple(stack.shape))
        self._sparsify(stack, chunk, thresholds, mask)
        if config.consensus is CombineStep.STITCH:
            consensus.stitch(stack, mask, weights, out, self.scratch)
        elif config.consensus is CombineStep.SUM:
            consensus.weighted_sum(stack, weights, out)
        elif config.consensus is not CombineStep.DISJOINT_MEAN:
            raise ValueError(f"merge method '{config.method.name}': unknown combine step {config.consensus!r}")
        elif config.method.weights_after_election:
            consensus.disjoint_mean(stack, config.election, out, self.scratch, weights_after_election=weights)
        else:
            consensus.scale_rows_(stack, weights)
            consensus.disjoint_mean(stack, config.election, out, self.scratch)

    def _weighted_sum_of_rows(self, chunk: Chunk, out: torch.Tensor) -> None:
        """Σ wᵢτᵢ straight from each task's concatenated keys, in their stored dtype (accelerators).

        Skips the fp32 stack: one pass per task (out += wᵢ·rowᵢ, converted inside the add) instead of a
        conversion, a scaling and a reduction over the stack. The NaN/Inf test reads the result, into which
        every delta flows.
        """
        self._check_stop()
        out.zero_()
        stack = self.scratch.get("stack", (len(self.sources), chunk.numel))
        for task, (source, row) in enumerate(zip(self.sources, stack, strict=True)):
            part = gather_row(source, chunk, self.device, row)
            out.add_(part, alpha=self.config.weights[task])
        self.finite.record(out, chunk)

    def _sums_rows(self) -> bool:
        method = self.config.method
        return (
            method.sparsify is Sparsify.NONE
            and self.config.consensus is CombineStep.SUM
            and devices.batched_kernels(self.device)
        )

    def _sparsify(self, stack: torch.Tensor, chunk: Chunk, thresholds, mask: torch.Tensor) -> None:
        config = self.config
        if config.method.sparsify is Sparsify.RANDOM:
            sparsify.drop_random_(stack, chunk, config.params["p"], config.params["seed"], self.scratch, self.tables)
        elif config.method.sparsify is Sparsify.MAGNITUDE:
            if thresholds is not None:
                sparsify.apply_threshold_(stack, thresholds, self._rule.strict, mask)
            elif config.params.get("topk_scope") == "per_tensor":
                tables = self.tables if devices.batched_kernels(self.device) else None
                sparsify.trim_per_tensor_(stack, chunk, config.trim_keep, self._rule, mask, tables, self.scratch)
            # else: no threshold needed — the trim keeps every entry (sparsify.trim_is_identity)
        elif config.method.sparsify is not Sparsify.NONE:
            raise ValueError(f"merge method '{config.method.name}': unknown sparsify stage {config.method.sparsify!r}")

    def _merge_per_key(self, stack: torch.Tensor, out: torch.Tensor, chunk: Chunk, thresholds) -> None:
        """DRM: 2-D weights through the joint SVD basis, every other key through the raw path."""
        params = self.config.params
        for segment in chunk.segments:
            deltas, merged = stack[:, segment.span], out[segment.span]
            if not self.linear[segment.key]:
                self._merge_raw(deltas, merged, Chunk.of(segment), thresholds)
                continue
            rows = segment.shape[0]
            cols = segment.numel // rows
            result = drm.merge_matrix(
                deltas.view(len(self.sources), rows, cols),
                keep=self.config.basis_keep,
                sign=self.config.sign,
                weights=self.weights,
                horizontal=drm.transposes(params["direction"], rows, cols),
                scratch=self.scratch,
            )
            merged.view(rows, cols).copy_(result)

    def _scale(self, out: torch.Tensor, chunk: Chunk) -> None:
        """Multiply by λ (and DARE's rescale) and each key's ``key_weights`` / ``block_weights`` factor."""
        scale = self.config.output_scale
        factors = [scale * key_multiplier(segment.key, self.config.key_rules) for segment in chunk.segments]
        if len(set(factors)) == 1:
            if factors[0] != 1.0:
                out.mul_(factors[0])
            return
        for segment, factor in zip(chunk.segments, factors, strict=True):
            if factor != 1.0:
                out[segment.span].mul_(factor)

    # -- helpers --------------------------------------------------------------------------------------

    @property
    def _rule(self) -> sparsify.RankRule:
        rule = self.config.method.rank_rule
        if rule is None:
            raise ValueError(f"merge method '{self.config.method.name}' has no rank rule for a magnitude trim")
        return rule

    def _in_blocks(self, for_merge: bool) -> bool:
        """Whether to work in cache-sized blocks (CPU): the threshold passes always, the merge pass when every
        stage treats each entry on its own (no per-key trim, no DARE counters, no SVD basis)."""
        if devices.batched_kernels(self.device):
            return False
        if not for_merge:
            return True
        method = self.config.method
        per_tensor = self.config.params.get("topk_scope") == "per_tensor"
        return method.basis is Basis.RAW and method.sparsify is not Sparsify.RANDOM and not per_tensor

    def _needs_tables(self) -> bool:
        """Whether a stage works on whole chunks from device tables (DARE; per-key trims on accelerators)."""
        per_tensor = self.config.params.get("topk_scope") == "per_tensor"
        return self.config.method.sparsify is Sparsify.RANDOM or (per_tensor and devices.batched_kernels(self.device))

    def _needs_global_trim(self) -> bool:
        config = self.config
        if config.method.sparsify is not Sparsify.MAGNITUDE or not self.raw_keys:
            return False
        if config.params.get("topk_scope") == "per_tensor":
            return False
        entries = sum(math.prod(self.shapes[key]) for key in self.raw_keys)
        return entries > 0 and not sparsify.trim_is_identity(self._rule, config.trim_keep, entries)

    def _check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise MergeCancelled(f"{self.config.method.name} merge cancelled")

    def _gather(self, chunk: Chunk, check: bool) -> torch.Tensor:
        self._check_stop()
        stack = self.scratch.get("stack", (len(self.sources), chunk.numel))
        gather(self.sources, chunk, self.device, stack)
        if check:
            self.finite.record(stack, chunk)
        return stack

    def _gather_block(self, chunk: Chunk, block: Block, check: bool) -> torch.Tensor:
        stack = gather_block(self.sources, block, self.scratch.get("stack", (len(self.sources), block.numel)))
        if check:
            self.finite.record(stack, chunk)
        return stack

    def _advance(self, keys: int) -> None:
        self.done += keys
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


class MergedDeltas(StoredDeltas):
    """A merge's result held in memory, remembering how it was made (for metadata and recipes)."""

    label = "merge"

    def __init__(self, deltas: dict[str, torch.Tensor], recipe: dict[str, Any], inputs: list[dict]):
        super().__init__(deltas, name=recipe["method"])
        self.merge_recipe, self.inputs = recipe, inputs

    def describe(self) -> dict:
        return {"op": self.label, **self.merge_recipe, "inputs": self.inputs}


def merge_to_task_vector(
    task_vectors: Sequence[TaskVector],
    method: str,
    *,
    storage_dtype: torch.dtype = torch.float32,
    storage_device: torch.device | str = "cpu",
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool | None] | None = None,
    **params: Any,
) -> TaskVector:
    """Run a merge once and keep each merged delta (in ``storage_dtype``) as a :class:`TaskVector`.

    The result remembers the method, its resolved parameters and the recipes of its inputs; its base
    fingerprint is the inputs' when they agree.
    """
    config = resolve_merge(method, len(task_vectors), **params)
    merged = iter_merged(task_vectors, method, device=device, progress=progress, should_stop=should_stop, **params)
    deltas = {key: delta.to(device=storage_device, dtype=storage_dtype, copy=True) for key, delta in merged}
    fingerprints = {tv.base_fingerprint for tv in task_vectors} - {None}
    leaf = MergedDeltas(deltas, config.recipe(), [tv.recipe for tv in task_vectors])
    leaf.origin = merge_origin(config.recipe(), task_vectors, storage_dtype)
    sources = tuple(dict.fromkeys(source for tv in task_vectors for source in tv.sources))
    fingerprint = fingerprints.pop() if len(fingerprints) == 1 else None
    return TaskVector(((1.0, leaf),), base_fingerprint=fingerprint, sources=sources)


def merge_origin(recipe: dict[str, Any], task_vectors: Sequence[TaskVector], storage_dtype: torch.dtype) -> dict:
    """The recipe origin of a merge (see :mod:`merging.recipes`): method, every resolved parameter, inputs."""
    params = {name: value for name, value in recipe.items() if name != "method"}
    return {
        "op": "merge",
        "method": recipe["method"],
        "params": params,
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "inputs": list(task_vectors),
    }
