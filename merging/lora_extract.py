"""Task vector → LoRA: a low-rank approximation of each weight's delta, in ComfyUI's standard LoRA layout.

For every weight matrix Δ (m × n) of a task vector the best rank-r approximation in the Frobenius norm is the
projection onto its top-r left singular vectors, Q Qᵀ Δ (Eckart–Young). We store it as

    lora_up = Q · diag(√b)   (m × r)        lora_down = diag(1/√b) · QᵀΔ   (r × n)        alpha = r

where b are the row norms of QᵀΔ (the singular values when Q is exact), so up and down share the magnitude
(nothing overflows fp16 that Δ itself would not) and ComfyUI's loader scale alpha / rank is 1.

How Q is found (``backend``):

* ``"gram"`` (the default): eigenvectors of the smaller Gram matrix ΔΔᵀ (or ΔᵀΔ, then transposed). One
  matrix product and an eigendecomposition of min(m, n)²; on one CPU thread 2–21× faster than a full SVD on
  SDXL's larger shapes (2.4× on 1280², 21× on 1280 × 11520 convolutions) and exact for the components kept.
  Squaring the condition number only blurs components with σ² below fp32's resolution of σ_max², far under
  anything a LoRA keeps, and whatever Q is, Q Qᵀ Δ is the best approximation inside its span.
* ``"svd"``: ``torch.linalg.svd`` (reduced): the reference.
* ``"lowrank"``: ``torch.svd_lowrank`` (randomised, 4 power iterations, 10 extra columns): fixed rank only;
  cheaper for small ranks of large matrices, but it keeps slightly less energy than the optimum on slowly
  decaying spectra (measured in ``bench/bench_lora_extract.py``).

The retained energy of a key is ‖QᵀΔ‖² / ‖Δ‖² computed from the factors actually stored (before rounding to
the storage dtype), so the report is exact whatever the backend; the relative error of the key is
√(1 − retained).

Which keys get factors: ``….weight`` tensors with at least two dimensions. Convolutions are reshaped to
(out, in·k…) matrices; a k×k kernel becomes LoCon (``lora_down`` a k×k convolution, ``lora_up`` a 1×1) or
is stored as a full diff or left out (``conv``); 1×1 kernels are linear layers. Every other key (biases,
norm scales, raw parameters such as ``pos_embed``) is stored as a full ``.diff`` / ``.diff_b`` or dropped
(``other_keys``). Names follow :mod:`merging.task_vector_files`: ``<module>.lora_up.weight``,
``<module>.lora_down.weight``, ``<module>.alpha`` under ``diffusion_model.`` / ``text_encoders.``, which
ComfyUI's ``LoraLoaderModelOnly`` / ``LoraLoader`` map by name.

Keys are processed one at a time in fp32 on the chosen device and written to a spool file as they are
done; the final file (header first, which needs every rank) is assembled from it at the end, so memory
holds one key, never the model or the whole LoRA.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .device import best_device
from .file_identity import FileOrigin
from .io import DTYPE_NAMES, SafetensorsFile, new_partial_file, parse_dtype, remove_stale_partials
from .lora import lora_delta
from .task_vector_files import _parameter_key, saved_key
from .task_vectors import DeltaLeaf, TaskVector

FORMAT = "diffusion-merge/lora/1"
BACKENDS = ("auto", "gram", "svd", "lowrank")
CONV_MODES = ("locon", "diff", "skip")
OTHER_KEY_MODES = ("diff", "drop")
LOWRANK_OVERSAMPLE = 10
LOWRANK_ITERATIONS = 4
ENERGY_TOLERANCE = 1e-6
LOSSLESS_SHARE = 0.99999
"""Keys keeping at least this share of their energy are not listed among the least kept on the node."""
NEGLIGIBLE_SHARE = 1e-10
"""Components carrying less than this share of a key's energy are left out (they are rounding noise)."""

_WEIGHT = ".weight"


class LoraExtractionCancelled(RuntimeError):
    """Raised when the ``should_stop`` hook asks a running extraction to stop."""


# -- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankRule:
    """How many components each key keeps: a fixed ``rank``, or the smallest rank whose components hold at
    least ``energy`` of the key's squared Frobenius norm, at most ``max_rank``."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give either a rank or an energy fraction (not both, not neither)")
        if self.rank is not None:
            _positive_int("rank", self.rank)
        if self.energy is not None:
            value = self.energy
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"energy fraction must be a finite number in (0, 1], not {value!r}")
            if not 0.0 < value <= 1.0:
                raise ValueError(f"energy fraction must be in (0, 1] (e.g. 0.9 keeps 90 % of each key), not {value}")
        if self.max_rank is not None:
            _positive_int("max_rank", self.max_rank)

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        cap = f", max rank {self.max_rank}" if self.max_rank is not None else ""
        return f"energy {self.energy:g}{cap}"

    def as_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "energy": self.energy, "max_rank": self.max_rank}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number ≥ 1, not {value!r}")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, not {value!r}")


# -- one matrix ---------------------------------------------------------------------------------------


@dataclass
class Factors:
    """Δ ≈ up @ down (fp32), with the energy bookkeeping of that approximation."""

    up: torch.Tensor
    down: torch.Tensor
    retained: float  # ‖up @ down‖² as computed from QᵀΔ (exact for an orthonormal Q)
    total: float  # ‖Δ‖²

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def low_rank_factors(matrix: torch.Tensor, rule: RankRule, backend: str = "auto") -> Factors:
    """The rank-r factors of one 2-D fp32 matrix under ``rule`` (see the module docstring)."""
    _choice("backend", backend, BACKENDS)
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] > matrix.shape[1]:  # work on the wide orientation: the Gram matrix is the small one
        factors = low_rank_factors(matrix.T, rule, backend)
        return Factors(factors.down.T, factors.up.T, factors.retained, factors.total)
    matrix = matrix.float()
    total = squared_norm(matrix)
    if total == 0.0:
        empty = matrix.new_zeros
        return Factors(empty((matrix.shape[0], 0)), empty((0, matrix.shape[1])), 0.0, 0.0)
    basis = _dominant_basis(matrix, rule, "gram" if backend == "auto" else backend)
    coords = basis.T @ matrix  # r × n; rows are the components' coordinates
    energies = coords.double().square().sum(dim=1)
    keep = energies > NEGLIGIBLE_SHARE * total
    basis, coords, energies = basis[:, keep], coords[keep], energies[keep]
    scale = energies.sqrt().sqrt().to(matrix.dtype)  # √b per component
    up = basis * scale
    down = coords / scale.unsqueeze(1)
    return Factors(up, down, min(float(energies.sum()), total), total)  # ≤ total also when rounding says more


def squared_norm(tensor: torch.Tensor) -> float:
    """‖tensor‖²_F, accumulated in fp64 without an fp64 copy of the tensor."""
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2


def _dominant_basis(wide: torch.Tensor, rule: RankRule, backend: str) -> torch.Tensor:
    """Orthonormal columns spanning the top components of a wide (m ≤ n) matrix: m × r."""
    rows = wide.shape[0]
    if backend == "lowrank":
        if rule.rank is None:
            raise ValueError("backend 'lowrank' needs a fixed rank (it does not see the whole spectrum)")
        rank = min(rule.rank, rows)
        oversampled = min(rank + LOWRANK_OVERSAMPLE, rows)
        q, _, _ = torch.svd_lowrank(wide, q=oversampled, niter=LOWRANK_ITERATIONS)
        # Rotate the oversampled basis onto its own top components before cutting it to the rank.
        u, _, _ = torch.linalg.svd(q.T @ wide, full_matrices=False)
        return q @ u[:, :rank]
    if backend == "svd":
        vectors, values, _ = torch.linalg.svd(wide, full_matrices=False)
        energies = values.double().square()
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(wide @ wide.T)
        vectors, energies = eigenvectors.flip(1), eigenvalues.flip(0).double().clamp_min(0.0)
    return vectors[:, : _rank_for(energies, rule)]


def _rank_for(energies: torch.Tensor, rule: RankRule) -> int:
    """The rank ``rule`` asks for, given the energies (σ²) of every component, largest first."""
    available = energies.numel()
    if rule.rank is not None:
        return min(rule.rank, available)
    assert rule.energy is not None  # a rule has a rank or an energy (checked when it is made)
    if rule.energy >= 1.0:
        rank = available  # everything: no tolerance may cut the smallest components
    else:
        cumulative = energies.cumsum(0)
        # Within rounding of the target counts as reaching it (a fraction exactly at a boundary keeps that rank).
        target = rule.energy * float(cumulative[-1]) * (1.0 - ENERGY_TOLERANCE)
        needed = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=cumulative.dtype)).item()) + 1
        rank = min(needed, available)
    return min(rank, rule.max_rank) if rule.max_rank is not None else rank


# -- one key ------------------------------------------------------------------------------------------


@dataclass
class KeyResult:
    """What happened to one key: ``kind`` is lora, locon, diff, dropped or zero."""

    key: str
    shape: tuple[int, ...]
    kind: str
    rank: int = 0
    retained: float = 0.0  # squared Frobenius norm the file keeps of this key
    total: float = 0.0  # the key's squared Frobenius norm

    @property
    def energy(self) -> float:
        return self.retained / self.total if self.total else 1.0


def module_name(key: str) -> str:
    """``diffusion_model.x.weight`` → ``diffusion_model.x`` (the name the LoRA loader maps)."""
    return key[: -len(_WEIGHT)]


def key_kind(key: str, shape: tuple[int, ...], conv: str) -> str:
    """lora (a matrix), locon (a k×k convolution in LoCon form), diff (stored whole) or other."""
    if not key.endswith(_WEIGHT) or len(shape) < 2:
        return "other"
    if len(shape) == 2 or all(size == 1 for size in shape[2:]):
        return "lora"
    return {"locon": "locon", "diff": "diff", "skip": "dropped"}[conv]


def factor_tensors(key: str, delta: torch.Tensor, factors: Factors) -> dict[str, torch.Tensor]:
    """The LoRA tensors of one factored key, shaped as ComfyUI's loader expects (convolutions included)."""
    shape = tuple(delta.shape)
    rank = factors.rank
    down_shape = (rank, *shape[1:]) if len(shape) > 2 else (rank, shape[1])
    up_shape = (shape[0], rank, *([1] * (len(shape) - 2)))
    module = module_name(key)
    return {
        f"{module}.lora_up.weight": factors.up.reshape(up_shape),
        f"{module}.lora_down.weight": factors.down.reshape(down_shape),
        f"{module}.alpha": torch.tensor(float(rank)),
    }


# -- the whole task vector ----------------------------------------------------------------------------


@dataclass
class LoraReport:
    """Per-key results and totals of one extraction (JSON-able with :meth:`summary`)."""

    path: Path
    rule: RankRule
    keys: list[KeyResult] = field(default_factory=list)
    seconds: float = 0.0
    parameters: int = 0  # tensor entries in the file

    def totals(self) -> dict[str, float]:
        total = sum(k.total for k in self.keys)
        retained = sum(k.retained for k in self.keys)
        factored = [k for k in self.keys if k.kind in ("lora", "locon")]
        factored_total = sum(k.total for k in factored)
        return {
            "energy": retained / total if total else 1.0,
            "factored_energy": sum(k.retained for k in factored) / factored_total if factored_total else 1.0,
            "relative_error": math.sqrt(max(0.0, 1.0 - retained / total)) if total else 0.0,
        }

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.keys:
            counts[result.kind] = counts.get(result.kind, 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        ranks = [k.rank for k in self.keys if k.kind in ("lora", "locon")]
        return {
            "file": self.path.name,
            "rule": self.rule.describe(),
            **self.totals(),
            "keys": self.counts(),
            "parameters": self.parameters,
            "rank_min": min(ranks, default=0),
            "rank_max": max(ranks, default=0),
            "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
            "seconds": round(self.seconds, 3),
            "per_key": {k.key: {"kind": k.kind, "rank": k.rank, "energy": round(k.energy, 6)} for k in self.keys},
        }


def extract_lora(
    vector: TaskVector,
    path: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    conv: str = "locon",
    other_keys: str = "diff",
    backend: str = "auto",
    dtype: str | torch.dtype = "fp16",
    device: torch.device | str | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool | None] | None = None,
    full_hash: bool = False,
) -> LoraReport:
    """Write a LoRA approximating ``vector`` to ``path`` (atomically) and return the per-key report.

    Give ``rank`` (the same rank for every key, capped by the matrix size) or ``energy`` (per key, the
    smallest rank keeping at least that fraction of the key's squared Frobenius norm; ``max_rank`` caps it).
    ``conv``: "locon" (k×k convolutions as LoCon), "diff" (stored whole) or "skip" (left out).
    ``other_keys``: "diff" (biases, norms … stored whole) or "drop". ``backend``: "auto" (= "gram"), "gram",
    "svd" or "lowrank". ``progress(done, total)`` is called after each key; ``should_stop()`` before each may
    raise or return True (raises :class:`LoraExtractionCancelled`). Bad arguments raise ValueError before
    anything is read; a key whose delta holds NaN/Inf raises ValueError naming it.
    """
    rule = RankRule(rank=rank, energy=energy, max_rank=max_rank)
    _choice("conv", conv, CONV_MODES)
    _choice("other_keys", other_keys, OTHER_KEY_MODES)
    _choice("backend", backend, BACKENDS)
    if backend == "lowrank" and rule.rank is None:
        raise ValueError("backend 'lowrank' needs a fixed rank (it does not see the whole spectrum)")
    target = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if target not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"LoRA dtype must be fp16, bf16 or fp32, not {target}")
    device = best_device() if device is None else torch.device(device)
    path = Path(path)
    report = LoraReport(path, rule)
    started = time.perf_counter()
    keys = vector.keys()
    with _SpooledSafetensors(path) as writer:
        for done, key in enumerate(keys, start=1):
            if should_stop is not None and should_stop():
                raise LoraExtractionCancelled("LoRA extraction cancelled")
            result, tensors = _extract_key(vector, key, rule, conv, other_keys, backend, device)
            report.keys.append(result)
            for name, tensor in tensors.items():
                writer.add(name, _stored(name, tensor, target))
            if progress is not None:
                progress(done, len(keys))
        report.seconds = time.perf_counter() - started
        report.parameters = writer.parameters
        writer.finish(_metadata(vector, report, conv, other_keys, backend, target, metadata, full_hash))
    return report


def _extract_key(vector, key, rule, conv, other_keys, backend, device) -> tuple[KeyResult, dict[str, torch.Tensor]]:
    shape = tuple(vector.shape(key))
    kind = key_kind(key, shape, conv)
    if kind == "other":
        kind = "diff" if other_keys == "diff" and _storable(key) else "dropped"
    if kind == "dropped":  # never computed: a dropped key costs nothing
        return KeyResult(key, shape, kind), {}
    delta = vector.delta(key, device)
    _check_finite(key, delta)
    total = squared_norm(delta)
    if total == 0.0:
        return KeyResult(key, shape, "zero"), {}
    if kind == "diff":
        return KeyResult(key, shape, "diff", 0, total, total), {saved_key(key): delta}
    factors = low_rank_factors(delta.reshape(shape[0], -1), rule, backend)
    result = KeyResult(key, shape, kind, factors.rank, factors.retained, factors.total)
    return result, factor_tensors(key, delta, factors)


def _storable(key: str) -> bool:
    try:
        saved_key(key)
    except ValueError:
        return False
    return True


def _check_finite(key: str, delta: torch.Tensor) -> None:
    if not bool(torch.isfinite(delta.sum())) and not bool(torch.isfinite(delta).all()):
        raise ValueError(f"key '{key}' has NaN/Inf values in its delta; a LoRA cannot approximate it")


def _stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = tensor.detach().to(device="cpu", dtype=dtype if not name.endswith(".alpha") else torch.float32)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"'{name}' overflows {dtype} (values beyond its range); save as bf16 or fp32 instead")
    return stored.contiguous()


def _metadata(vector, report, conv, other_keys, backend, dtype, extra, full_hash) -> dict[str, str]:
    from .recipes import RECIPE_METADATA_KEY, recipe_of  # recipes imports this module

    totals = report.totals()
    raw_keys = [k.key for k in report.keys if k.kind == "diff" and not k.key.endswith((".weight", ".bias"))]
    per_key = {k.key: [k.kind, k.rank, round(k.energy, 6)] for k in report.keys}
    settings = {**report.rule.as_json(), "conv": conv, "other_keys": other_keys, "backend": backend}
    result = {"kind": "lora", **settings, "dtype": str(dtype).removeprefix("torch.")}
    return {
        "dm_format": FORMAT,
        "dm_base_fingerprint": vector.base_fingerprint or "",
        "dm_sources": json.dumps(list(vector.sources)),
        "dm_recipe": json.dumps(vector.recipe),
        "dm_raw_keys": json.dumps(raw_keys),
        "dm_lora_settings": json.dumps(settings),
        "dm_lora_energy": f"{totals['energy']:.6f}",
        "dm_lora_factored_energy": f"{totals['factored_energy']:.6f}",
        "dm_lora_keys": json.dumps(per_key, separators=(",", ":")),
        RECIPE_METADATA_KEY: json.dumps(recipe_of(vector, result, full_hash=full_hash)),
        **(extra or {}),
    }


def format_report(report: LoraReport, worst: int = 10) -> str:
    """A few lines for a node: totals, key counts, ranks and the keys that kept the least energy."""
    summary = report.summary()
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(summary["keys"].items()))
    lines = [
        f"{summary['file']}: {summary['rule']}",
        f"energy kept: {100 * summary['energy']:.2f}% of ‖τ‖² (low-rank keys {100 * summary['factored_energy']:.2f}%)"
        f", relative error {summary['relative_error']:.4f}",
        f"keys: {counts}",
        f"ranks {summary['rank_min']}–{summary['rank_max']} (mean {summary['rank_mean']:.1f}), "
        f"{summary['parameters']:,} parameters",
    ]
    factored = [k for k in report.keys if k.kind in ("lora", "locon")]
    lossy = sorted((k for k in factored if k.energy < LOSSLESS_SHARE), key=lambda k: k.energy)[:worst]
    if lossy:
        lines.append("least energy kept:")
        lines += [f"  {k.key}: {100 * k.energy:.1f}% at rank {k.rank}" for k in lossy]
    elif factored:
        lines.append(f"every low-rank key kept ≥ {100 * LOSSLESS_SHARE:g}% of its energy")
    return "\n".join(lines)


# -- reading a LoRA back as a task vector --------------------------------------------------------------

_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))
_UNSUPPORTED = ("lora_mid", "hada_", "lokr_", "dora_scale", ".lora.up", "_lora.up", "reshape_weight")


class LoraFileDeltas(DeltaLeaf):
    """The deltas of a plain LoRA / LoCon file in ComfyUI's key names (``diffusion_model.…``,
    ``text_encoders.…``): (alpha / rank) · up @ down per module, ``.diff`` / ``.diff_b`` stored whole."""

    label = "lora_file"

    def __init__(self, path: str | os.PathLike):
        self.file = SafetensorsFile(path)
        self.name = Path(path).name
        self._modules: dict[str, tuple[str, str, str | None]] = {}
        self._stored: dict[str, str] = {}
        raw_keys = set(json.loads(self.file.metadata.get("dm_raw_keys", "[]")))
        for stored in self.file.keys():
            if any(marker in stored for marker in _UNSUPPORTED):
                raise ValueError(
                    f"'{self.name}': key '{stored}' is not a plain LoRA/LoCon factor; load it with "
                    "'Task Vector from LoRA' (ComfyUI's own adapters) instead"
                )
            pair = next(((up, down) for up, down in _PAIRS if stored.endswith(up)), None)
            if pair is not None:
                module = stored[: -len(pair[0])]
                if module + pair[1] not in self.file:
                    raise ValueError(f"'{self.name}': '{stored}' has no matching '{module + pair[1]}'")
                alpha = module + ".alpha"
                self._modules[module + _WEIGHT] = (stored, module + pair[1], alpha if alpha in self.file else None)
            elif stored.endswith((".diff", ".diff_b")):
                self._stored[_parameter_key(stored, raw_keys, self.name)] = stored
            elif not stored.endswith((".alpha", ".lora_down.weight", ".lora_A.weight")):
                raise ValueError(f"'{self.name}': key '{stored}' is neither a LoRA factor nor a diff")
        if not self._modules and not self._stored:
            raise ValueError(f"'{self.name}' holds no LoRA factors")
        self._shapes = {key: self._shape(key) for key in [*self._modules, *self._stored]}

    def _shape(self, key: str) -> tuple[int, ...]:
        if key in self._stored:
            return self.file.shape_of(self._stored[key])
        up, down, _ = self._modules[key]
        return (self.file.shape_of(up)[0], *self.file.shape_of(down)[1:])

    def keys(self):
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def compute(self, key: str, device: torch.device) -> torch.Tensor:
        if key in self._stored:
            return self.file[self._stored[key]].to(device=device, dtype=torch.float32)
        up, down, alpha = self._modules[key]
        alpha_value = self.file[alpha].float().item() if alpha is not None else None
        return lora_delta(self.file[up], self.file[down], alpha_value, self._shapes[key], device)

    def describe(self) -> dict:
        return {"op": self.label, "source": self.name}


def load_lora(path: str | os.PathLike, nonfinite: str = "error") -> TaskVector:
    """A plain LoRA / LoCon file in ComfyUI's key names (what :func:`extract_lora` writes) as a lazy task
    vector: each key's delta is what the stock LoRA loader adds at strength 1."""
    leaf = LoraFileDeltas(path)
    leaf.origin = {"op": "lora_file", "file": FileOrigin.of(path)}
    metadata = leaf.file.metadata
    sources = tuple(json.loads(metadata.get("dm_sources", "[]"))) or (leaf.name,)
    fingerprint = metadata.get("dm_base_fingerprint") or None
    return TaskVector(((1.0, leaf),), base_fingerprint=fingerprint, nonfinite=nonfinite, sources=sources)


# -- writing without knowing the shapes in advance -----------------------------------------------------


class _SpooledSafetensors:
    """A safetensors writer for tensors whose shapes are known only once computed.

    Tensor bytes go to a spool file beside the target as they come; :meth:`finish` writes the header and
    copies the spool after it into a temporary file that replaces the target only when complete. Nothing is
    left behind on error.
    """

    def __init__(self, path: Path):
        self.path = path
        self.entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        self.parameters = 0
        self._offset = 0
        remove_stale_partials(path.parent)
        descriptor, self._spool_path = new_partial_file(path)  # locked while open (see merging.io)
        self._spool = os.fdopen(descriptor, "w+b")

    def __enter__(self) -> _SpooledSafetensors:
        return self

    def __exit__(self, *exc) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self._spool.write(data)
        self.entries.append((name, tensor.dtype, tuple(tensor.shape), self._offset, self._offset + len(data)))
        self._offset += len(data)
        self.parameters += tensor.numel()

    def finish(self, metadata: Mapping[str, str]) -> Path:
        header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        for name, dtype, shape, begin, end in self.entries:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._spool.flush()
        self._spool.seek(0)
        descriptor, temporary = new_partial_file(self.path)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(struct.pack("<Q", len(raw)))
                handle.write(raw)
                shutil.copyfileobj(self._spool, handle, 16 << 20)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return self.path
