"""The merge methods, as data: each is a record choosing the stages of the one pipeline in :mod:`merging.merge`.

``per key: gather deltas → (DRM: into the joint SVD basis) → sparsify → elect sign → combine → (back) → scale``

Adding a method is one :class:`MergeMethod` entry in :data:`METHODS` (and one test). Parameters common to
every method are in :data:`COMMON_DEFAULTS`; every parameter is validated by :func:`resolve_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .consensus import SIGN_RULES
from .drm import DIRECTIONS
from .key_weights import compile_key_weights

TOPK_SCOPES = ("global", "per_tensor")


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: which sparsifier, which combine, and its own parameters with their defaults.

    * ``sparsify``: "none", "magnitude" (threshold per ``rank_rule``, keeping ``keep(params)`` of the
      entries) or "random" (DARE);
    * ``combine``: "stitch" (LaS), else "sum" — which becomes the disjoint mean when the ``sign``
      parameter names an election rule (so DARE + ``sign="mass"`` is DARE-TIES);
    * ``basis``: "raw" entries, or "svd" (DRM: 2-D weights merged in their joint SVD basis with a trim
      keeping ``basis_keep(params)``; other parameters take the raw path);
    * ``weights_after_election``: apply per-task weights after the sign election (DRM's order) instead
      of before it (TIES, DARE-TIES).
    """

    name: str
    summary: str
    sparsify: str
    combine: str
    defaults: Mapping[str, Any]
    rank_rule: str | None = None
    keep: Callable[[Mapping[str, Any]], float] | None = None
    basis: str = "raw"
    basis_keep: Callable[[Mapping[str, Any]], float] | None = None
    weights_after_election: bool = False


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            name="weighted",
            summary="task arithmetic: λ·Σ wᵢτᵢ with free weights (DeMe's merge)",
            sparsify="none",
            combine="sum",
            defaults={"sign": None},
        ),
        MergeMethod(
            name="ties",
            summary="TIES: trim to the top-k magnitudes, elect signs, disjoint mean, ×λ",
            sparsify="magnitude",
            combine="sum",
            defaults={"k": 0.2, "topk_scope": "global", "sign": "mass"},
            rank_rule="ties",
            keep=lambda params: params["k"],
        ),
        MergeMethod(
            name="dare",
            summary="DARE: drop entries with probability p, rescale by 1/(1−p); sum, or DARE-TIES with sign",
            sparsify="random",
            combine="sum",
            defaults={"p": 0.9, "rescale": True, "seed": 0, "sign": None},
        ),
        MergeMethod(
            name="las",
            summary="Localize-and-Stitch (dataless): global top-k masks per task, overlaps averaged",
            sparsify="magnitude",
            combine="stitch",
            defaults={"k": 0.05},
            rank_rule="las",
            keep=lambda params: params["k"],
        ),
        MergeMethod(
            name="drm",
            summary="Decom-Renorm-Merge: joint SVD per 2-D weight, renormalised joint trim, disjoint mean",
            sparsify="magnitude",
            combine="sum",
            defaults={
                "direction": "vertical",
                "drop_rate": 0.8,
                "nonlinear_drop_rate": 0.0,
                "conv": False,
                "sign": "mass",
            },
            rank_rule="drm",
            keep=lambda params: 1.0 - params["nonlinear_drop_rate"],
            basis="svd",
            basis_keep=lambda params: 1.0 - params["drop_rate"],
            weights_after_election=True,
        ),
    )
}

COMMON_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"weights": None, "lam": 1.0, "key_weights": (), "block_weights": None}
)


@dataclass(frozen=True)
class MergeConfig:
    """A method with every parameter resolved and checked; what the pipeline runs."""

    method: MergeMethod
    params: Mapping[str, Any]
    weights: tuple[float, ...]
    key_rules: tuple = field(default=(), repr=False)

    @property
    def sign(self) -> str | None:
        return self.params.get("sign")

    @property
    def combine(self) -> str:
        if self.method.combine == "stitch":
            return "stitch"
        return "disjoint_mean" if self.sign else "sum"

    @property
    def keep(self) -> float | None:
        return self.method.keep(self.params) if self.method.keep else None

    @property
    def uniform_weights(self) -> bool:
        return all(w == 1.0 for w in self.weights)

    @property
    def output_scale(self) -> float:
        """λ, times DARE's rescale 1/(1 − p) (linear in every combine step, so applied once at the end)."""
        scale = self.params["lam"]
        if self.method.sparsify == "random" and self.params["rescale"]:
            scale /= 1.0 - self.params["p"]
        return scale

    def recipe(self) -> dict[str, Any]:
        """The method and its resolved parameters as plain JSON-able values (for file metadata)."""
        params = {name: _plain(value) for name, value in self.params.items()}
        return {"method": self.method.name, **params, "weights": list(self.weights)}


def resolve_merge(method: str, count: int, **params: Any) -> MergeConfig:
    """Check ``method`` and its parameters for a merge of ``count`` task vectors; fill in defaults.

    Raises ValueError naming the offending parameter: unknown names, values out of range, a weights list of
    the wrong length.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method '{method}' (known: {', '.join(METHODS)})")
    spec = METHODS[method]
    accepted = {**COMMON_DEFAULTS, **spec.defaults}
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"method '{method}' has no parameter(s) {', '.join(unknown)} (accepted: {', '.join(sorted(accepted))})"
        )
    resolved = {**accepted, **params}
    for name, value in resolved.items():
        if name in _CHECKS:
            _CHECKS[name](name, value)
    weights = _weights(resolved["weights"], count)
    rules = compile_key_weights(resolved["key_weights"], resolved["block_weights"])
    return MergeConfig(spec, MappingProxyType(resolved), weights, rules)


def _weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
        raise ValueError(f"weights must be a list of {count} numbers (one per task vector), not {weights!r}")
    for index, weight in enumerate(weights, start=1):
        _finite(f"weight {index}", weight)
    return tuple(float(w) for w in weights)


def _finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")


def _fraction(low_open: bool, high_open: bool):
    low, high = ("(" if low_open else "["), (")" if high_open else "]")

    def check(name: str, value: Any) -> None:
        _finite(name, value)
        if (value <= 0 if low_open else value < 0) or (value >= 1 if high_open else value > 1):
            raise ValueError(f"{name} must be in {low}0, 1{high}, not {value}")

    return check


def _choice(options: Sequence):
    def check(name: str, value: Any) -> None:
        if value not in options:
            raise ValueError(f"{name} must be one of {list(options)}, not {value!r}")

    return check


def _of_type(kind: type, label: str):
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"{name} must be {label}, not {value!r}")

    return check


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "lam": _finite,
    "k": _fraction(low_open=True, high_open=False),
    "p": _fraction(low_open=False, high_open=True),
    "drop_rate": _fraction(low_open=False, high_open=True),
    "nonlinear_drop_rate": _fraction(low_open=False, high_open=True),
    "rescale": _of_type(bool, "True or False"),
    "conv": _of_type(bool, "True or False"),
    "seed": _of_type(int, "an integer"),
    "sign": _choice((None, *SIGN_RULES)),
    "topk_scope": _choice(TOPK_SCOPES),
    "direction": _choice(DIRECTIONS),
}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
