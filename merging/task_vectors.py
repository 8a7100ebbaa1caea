"""Task vectors: τ = θ_finetuned − θ_base as a lazy, key-by-key object.

A :class:`TaskVector` is a linear combination Σ cᵢ·leafᵢ of *leaves*, each of which can produce the delta
of one key on demand (the difference of two weight mappings, deltas stored in a file, deltas computed from
a LoRA …). Scaling, adding, subtracting and negating only rearrange coefficients; nothing is computed until
a key is asked for, and then only that key, in fp32 on the chosen device.
"""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .buffers import Scratch
from .device import best_device
from .io import as_float32, read_tensor, shape_of
from .keys import check_shared_keys, normalise_key, normalised, select_keys, state_dict_fingerprint

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "skip")


class DeltaLeaf(ABC):
    """A source of per-key deltas: knows its keys and shapes without computing anything."""

    label: str = "delta"
    origin: dict | None = None
    """How to make this leaf again from files (see :mod:`merging.recipes`); None when it cannot be."""

    @abstractmethod
    def keys(self) -> Sequence[str]: ...

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    def __contains__(self, key: str) -> bool:
        return key in self.key_set

    @property
    def key_set(self) -> frozenset[str]:
        if not hasattr(self, "_key_set"):
            self._key_set = frozenset(self.keys())
        return self._key_set

    @abstractmethod
    def compute(self, key: str, device: torch.device) -> torch.Tensor:
        """The fp32 delta of ``key`` on ``device``, a tensor of its own that the caller may modify."""

    def describe(self) -> dict:
        return {"op": self.label}


class Difference(DeltaLeaf):
    """finetuned[key] − base[key] for two weight mappings of the same architecture."""

    label = "difference"

    def __init__(
        self,
        finetuned: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        keys: Sequence[str] | None = None,
        names: tuple[str, str] = ("finetuned", "base"),
    ):
        finetuned, base = normalised(finetuned, names[0]), normalised(base, names[1])
        self.finetuned, self.base, self.names = finetuned, base, names
        self._keys = list(finetuned.keys()) if keys is None else [normalise_key(key) for key in keys]
        self._shapes = _checked_shapes(finetuned, base, self._keys, names, whole=keys is None)
        self._buffers = (Scratch(), Scratch(), Scratch())
        self._inputs: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def keys(self) -> Sequence[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def compute(self, key: str, device: torch.device) -> torch.Tensor:
        finetuned_buffer, base_buffer, upcast_buffer = self._buffers
        delta = read_tensor(self.finetuned, key, finetuned_buffer).to(device=device, dtype=torch.float32, copy=True)
        base = read_tensor(self.base, key, base_buffer).to(device=device)
        return delta.sub_(as_float32(base, upcast_buffer))

    def compute_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """finetuned − base written into ``out`` (fp32) without a fresh fp32 tensor: the whole key (``out`` has
        its shape), or entries [start, start + out.numel()) of the flattened key.

        A range from ``start`` 0 reads both inputs; later ranges of the same key reuse them, so a key can be
        computed piece by piece in order (with no other key in between) while each piece is in the caches.
        """
        if start == 0 or self._inputs is None or self._inputs[0] != key:
            finetuned_buffer, base_buffer, _ = self._buffers
            # detached: a model's own weights may require grad, and copying them into a block would be recorded
            base = read_tensor(self.base, key, base_buffer).detach()
            self._inputs = (key, read_tensor(self.finetuned, key, finetuned_buffer).detach(), base)
        _, finetuned, base = self._inputs
        if out.numel() == finetuned.numel():
            finetuned, base = finetuned.view(out.shape), base.view(out.shape)
        else:
            finetuned = finetuned.reshape(-1)[start : start + out.numel()]
            base = base.reshape(-1)[start : start + out.numel()]
        out.copy_(finetuned)
        # fp16/bf16 bases are upcast into a reused buffer first (a mixed-dtype sub_ is ~7x slower on the CPU)
        out.sub_(as_float32(base.to(device=out.device), self._buffers[2]))

    def describe(self) -> dict:
        return {"op": self.label, "finetuned": self.names[0], "base": self.names[1]}


def _checked_shapes(finetuned, base, keys, names, whole) -> dict[str, tuple[int, ...]]:
    missing = [k for k in keys if k not in base]
    extra = [k for k in base if k not in finetuned] if whole else []
    for absent, has, lacks in ((missing, *names), (extra, *reversed(names))):
        if absent:
            raise ValueError(
                f"different architectures: {len(absent)} key(s) of {has} are missing from {lacks}, e.g. '{absent[0]}'"
            )
    shapes = {}
    for key in keys:
        ft_shape, base_shape = shape_of(finetuned, key), shape_of(base, key)
        if ft_shape != base_shape:
            raise ValueError(
                f"key '{key}' is {ft_shape} in {names[0]} but {base_shape} in {names[1]} — "
                "are both the same architecture?"
            )
        shapes[key] = ft_shape
    return shapes


class StoredDeltas(DeltaLeaf):
    """Deltas that already exist as tensors: an in-memory dict or a file mapping."""

    label = "stored"

    def __init__(self, deltas: Mapping[str, torch.Tensor], name: str = "deltas"):
        self.deltas, self.name = normalised(deltas, name), name
        self._keys = list(deltas.keys())

    def keys(self) -> Sequence[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self.deltas, key)

    def compute(self, key: str, device: torch.device) -> torch.Tensor:
        return self.deltas[key].to(device=device, dtype=torch.float32, copy=True)

    def describe(self) -> dict:
        return {"op": self.label, "source": self.name}


class ComputedDeltas(DeltaLeaf):
    """Deltas produced by a function, e.g. a LoRA's up·down products (``fn`` returns a new tensor each call)."""

    label = "computed"

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        fn: Callable[[str, torch.device], torch.Tensor],
        name: str,
    ):
        self._shapes, self.fn, self.name = dict(shapes), fn, name

    def keys(self) -> Sequence[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def compute(self, key: str, device: torch.device) -> torch.Tensor:
        return self.fn(key, device).to(device=device, dtype=torch.float32)

    def describe(self) -> dict:
        return {"op": self.label, "source": self.name}


@dataclass(frozen=True)
class TaskVector:
    """A lazy task vector Σ cᵢ·leafᵢ; see the module docstring.

    ``base_fingerprint`` identifies the base model the deltas belong to (see :mod:`merging.keys`).
    ``nonfinite`` says what to do with a key whose delta holds NaN/Inf: ``"error"`` raises naming the key,
    ``"skip"`` treats that key as unchanged and logs a warning.
    """

    terms: tuple[tuple[float, DeltaLeaf], ...]
    base_fingerprint: str | None = None
    nonfinite: str = "error"
    sources: tuple[str, ...] = ()
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, not '{self.nonfinite}'")
        shapes: dict[str, tuple[int, ...]] = {}
        for _, leaf in self.terms:
            for key in leaf.keys():
                shape = tuple(leaf.shape(key))
                if shapes.setdefault(key, shape) != shape:
                    raise ValueError(
                        f"key '{key}' is {shapes[key]} in one task vector but {shape} in another — "
                        "were both extracted from the same architecture?"
                    )
        object.__setattr__(self, "_shapes", shapes)

    # -- inspection ---------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    @property
    def recipe(self) -> dict:
        return {"sum": [{"coefficient": c, **leaf.describe()} for c, leaf in self.terms]}

    # -- values -------------------------------------------------------------------------------------

    def delta(self, key: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The fp32 delta of one key, computed now on ``device`` (the best available by default)."""
        device = torch.device(device) if device is not None else best_device()
        with torch.no_grad():
            return self._sum_of_terms(key, device)

    def delta_into(self, key: str, out: torch.Tensor) -> None:
        """Write the fp32 delta of one key into ``out`` (its shape, on its device).

        A plain difference (see :meth:`plain_difference`) is computed in place; its NaN/Inf check is left to
        the caller, which checks whole chunks (:func:`merging.chunks.gather`).
        """
        with torch.no_grad():
            plain = self.plain_difference(key)
            if plain is not None:
                plain.compute_into(key, out)
                return
            out.copy_(self._sum_of_terms(key, out.device))

    def plain_difference(self, key: str) -> Difference | None:
        """The leaf when this key's delta is one :class:`Difference` as it is (coefficient 1, non-finite values
        raising): then it can be computed in place, even a range of it at a time; else None."""
        terms = [(c, leaf) for c, leaf in self.terms if c != 0.0 and key in leaf]
        if len(terms) == 1 and terms[0][0] == 1.0 and isinstance(terms[0][1], Difference):
            return terms[0][1] if self.nonfinite == "error" else None
        return None

    def _sum_of_terms(self, key: str, device: torch.device) -> torch.Tensor:
        total = None
        for coefficient, leaf in self.terms:
            if coefficient == 0.0 or key not in leaf:
                continue
            part = leaf.compute(key, device)
            # A finite sum proves every entry finite; only a non-finite one (or a harmless overflow) needs the
            # elementwise check, which is ~30x slower on the CPU.
            if not bool(torch.isfinite(part.sum())) and not bool(torch.isfinite(part).all()):
                if self.nonfinite == "error":
                    raise ValueError(
                        f"key '{key}' has NaN/Inf values in its delta ({leaf.describe()}); "
                        "fix the source model or choose to skip non-finite keys"
                    )
                logger.warning("skipping key '%s': its delta has NaN/Inf values", key)
                return torch.zeros(self._shapes[key], dtype=torch.float32, device=device)
            if total is None:
                total = part if coefficient == 1.0 else part.mul_(coefficient)
            else:
                total.add_(part, alpha=coefficient)
        if total is None:
            return torch.zeros(self._shapes[key], dtype=torch.float32, device=device)
        return total

    def items(self, device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, fp32 delta) one key at a time."""
        for key in self._shapes:
            yield key, self.delta(key, device)

    def to_dict(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Materialise every key (small models and tests; large models should stream :meth:`items`)."""
        return {key: delta.to(device=device, dtype=dtype) for key, delta in self.items()}

    # -- algebra (lazy) -----------------------------------------------------------------------------

    def scale(self, factor: float) -> TaskVector:
        return self._with_terms(tuple((c * float(factor), leaf) for c, leaf in self.terms))

    def __mul__(self, factor: float) -> TaskVector:
        return self.scale(factor)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self.scale(-1.0)

    def __add__(self, other: TaskVector) -> TaskVector:
        """τ_a + τ_b; refused when their key sets barely meet (see :func:`merging.keys.check_shared_keys`),
        unless both were extracted from one base architecture (e.g. two key-filtered parts of one model)."""
        if not isinstance(other, TaskVector):
            return NotImplemented
        if not same_architecture(self.base_fingerprint, other.base_fingerprint):
            check_shared_keys(self.keys(), other.keys(), ("the first task vector", "the second task vector"))
        return self.join(other)

    def join(self, other: TaskVector) -> TaskVector:
        """τ_a + τ_b without the key check: for parts of one model (diffusion model, text encoder, projections)."""
        if self.base_fingerprint and other.base_fingerprint and self.base_fingerprint != other.base_fingerprint:
            logger.warning(
                "adding task vectors extracted from different base models (%s vs %s)",
                self.base_fingerprint,
                other.base_fingerprint,
            )
        return TaskVector(
            self.terms + other.terms,
            base_fingerprint=self.base_fingerprint or other.base_fingerprint,
            nonfinite=self.nonfinite,
            sources=self.sources + tuple(s for s in other.sources if s not in self.sources),
        )

    def __sub__(self, other: TaskVector) -> TaskVector:
        """τ_a − τ_b, refused like :meth:`__add__` when the key sets barely meet."""
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def select(self, pattern: str) -> TaskVector:
        """Only the keys whose names match a regular expression."""
        kept = set(select_keys(self.keys(), pattern))
        return self._with_terms(tuple((c, _Selected(leaf, kept, pattern)) for c, leaf in self.terms))

    def _with_terms(self, terms) -> TaskVector:
        return TaskVector(terms, self.base_fingerprint, self.nonfinite, self.sources)


def same_architecture(first: str | None, second: str | None) -> bool:
    """Whether two base fingerprints (``<architecture>-<weights>``) name the same architecture."""
    if not (first and second):
        return False
    return first.split("-")[0] == second.split("-")[0]


class _Selected(DeltaLeaf):
    def __init__(self, leaf: DeltaLeaf, kept: set[str], pattern: str | None = None):
        self.leaf, self.pattern = leaf, pattern
        self._keys = [k for k in leaf.keys() if k in kept]

    def keys(self) -> Sequence[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return self.leaf.shape(key)

    def compute(self, key: str, device: torch.device) -> torch.Tensor:
        return self.leaf.compute(key, device)

    def describe(self) -> dict:
        return {**self.leaf.describe(), "keys": len(self._keys)}


def extract_task_vector(
    finetuned: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    key_filter: str | None = None,
    nonfinite: str = "error",
    names: tuple[str, str] = ("finetuned", "base"),
) -> TaskVector:
    """The lazy task vector finetuned − base over two key→tensor mappings (dicts, files, model views).

    ``key_filter`` is a regular expression; only matching keys are kept. Shapes and key sets are checked
    now, values only when a key is read.
    """
    finetuned, base = normalised(finetuned, names[0]), normalised(base, names[1])
    keys = None
    if key_filter:
        keys = select_keys(finetuned.keys(), key_filter)
        if not keys:
            raise ValueError(f"key filter '{key_filter}' matches no key of {names[0]}")
    leaf = Difference(finetuned, base, keys, names)
    if not leaf.keys():
        raise ValueError(f"{names[0]} has no keys")
    return TaskVector(
        ((1.0, leaf),),
        base_fingerprint=state_dict_fingerprint(base, {k: shape_of(base, k) for k in base}),
        nonfinite=nonfinite,
        sources=names,
    )


def task_vector(
    finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], key_filter: str | None = None
) -> dict[str, torch.Tensor]:
    """finetuned − base for in-memory key→tensor mappings, as a dict of fp32 CPU tensors.

    Keys are named as everywhere in the library: a checkpoint state dict's ``model.diffusion_model.…`` keys come
    out as ``diffusion_model.…`` (what :func:`merging.task_vector_from_files` gives); other keys keep their names.
    """
    return extract_task_vector(finetuned, base, key_filter=key_filter).to_dict()


def apply_task_vector(
    weights: Mapping[str, torch.Tensor],
    vector: TaskVector | Mapping[str, torch.Tensor],
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """θ + strength·τ key by key, each result in the weight's own dtype; keys τ lacks are returned as-is.

    ``weights`` keep their own key names (a checkpoint's ``model.diffusion_model.…`` included); they are matched
    to τ's keys after normalisation. Refused when fewer than half of τ's keys name a weight.
    """
    if not isinstance(vector, TaskVector):
        vector = TaskVector(((1.0, StoredDeltas(vector, "task vector")),))
    names = {key: normalise_key(key) for key in weights.keys()}
    check_shared_keys(vector.keys(), names.values(), ("the task vector", "the weights"))
    merged = {}
    for key, weight in weights.items():
        if names[key] in vector:
            delta = vector.delta(names[key], weight.device)
            merged[key] = (weight.to(torch.float32) + strength * delta).to(weight.dtype)
        else:
            merged[key] = weight
    return merged


_BLOCK_INDEX = re.compile(r"^\d+$")


def coarse_block_of(key: str) -> str:
    """The block a key belongs to: its path up to and including the first numeric index."""
    parts = key.split(".")
    if parts and parts[0] in ("diffusion_model", "text_encoders"):
        parts = parts[1:]
    block = []
    for part in parts[:-1]:
        block.append(part)
        if _BLOCK_INDEX.match(part):
            break
    return ".".join(block) or parts[-1]


def summarize(vector: TaskVector, device: torch.device | str | None = None) -> dict:
    """Key count, parameter count, L2 norm, sparsity (share of exact zeros) and per-block L2 norms."""
    blocks: dict[str, float] = {}
    total_sq, zeros, params = 0.0, 0, 0
    for key, delta in vector.items(device):
        square = float(delta.double().square().sum())
        total_sq += square
        zeros += int((delta == 0).sum())
        params += delta.numel()
        name = coarse_block_of(key)
        blocks[name] = blocks.get(name, 0.0) + square
    return {
        "keys": len(vector),
        "parameters": params,
        "norm": math.sqrt(total_sq),
        "sparsity": zeros / params if params else 0.0,
        "block_norms": {name: math.sqrt(sq) for name, sq in blocks.items()},
    }
