"""The merge methods, as data: each is a record choosing the stages of the one pipeline in :mod:`merging.merge`.

``per key: gather deltas → (DRM: into the joint SVD basis) → sparsify → elect sign → combine → (back) → scale``

Adding a method is one :class:`MergeMethod` entry in :data:`METHODS` (and one test). Parameters common to
every method are in :data:`COMMON_DEFAULTS`; every parameter is validated by :func:`resolve_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from .consensus import SIGN_RULES
from .drm import DIRECTIONS
from .key_weights import compile_key_weights
from .sparsify import RANK_RULES, RankRule

TOPK_SCOPES = ("global", "per_tensor")


class Sparsify(str, Enum):
    """Which entries of each task vector survive before the consensus step."""

    NONE = "none"
    MAGNITUDE = "magnitude"  # a threshold from the method's rank rule, keeping ``keep(params)`` of the entries
    RANDOM = "random"  # DARE: drop with probability p


class Combine(str, Enum):
    """How the surviving entries become one delta."""

    SUM = "sum"  # weighted sum; the disjoint mean when the ``sign`` parameter names an election rule
    STITCH = "stitch"  # Localize-and-Stitch: average over the tasks whose mask selected the entry


class Basis(str, Enum):
    """Where the sparsify and combine stages work."""

    RAW = "raw"  # the task vectors' own entries
    SVD = "svd"  # DRM: 2-D weights in their joint SVD basis (other parameters take the raw path)


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its stages, its own parameters with their defaults, and the paper it follows.

    * ``sparsify``: :class:`Sparsify` — a magnitude trim needs ``rank_rule`` (one of
      :data:`merging.sparsify.RANK_RULES`) and ``keep``;
    * ``combine``: :class:`Combine`;
    * ``basis``: :class:`Basis` — the SVD basis needs ``basis_keep``, the fraction its trim keeps;
    * ``weights_after_election``: apply per-task weights after the sign election (DRM's order) instead
      of before it (TIES, DARE-TIES);
    * ``reference``: the paper (arXiv id; design notes in ``docs/methods.md``).

    A record that cannot run (a stage without its rule, a rule the stage does not use) is refused when it is
    defined, so a misspelt or incomplete method never silently skips a stage.
    """

    name: str
    summary: str
    reference: str
    sparsify: Sparsify
    combine: Combine
    defaults: Mapping[str, Any]
    rank_rule: RankRule | None = None
    keep: Callable[[Mapping[str, Any]], float] | None = None
    basis: Basis = Basis.RAW
    basis_keep: Callable[[Mapping[str, Any]], float] | None = None
    weights_after_election: bool = False

    def __post_init__(self) -> None:
        for stage, kind in (("sparsify", Sparsify), ("combine", Combine), ("basis", Basis)):
            value = getattr(self, stage)
            if not isinstance(value, kind):
                known = ", ".join(member.value for member in kind)
                raise ValueError(
                    f"merge method '{self.name}': {stage} must be a {kind.__name__} ({known}), not {value!r}"
                )
        magnitude = self.sparsify is Sparsify.MAGNITUDE
        if magnitude != (self.rank_rule is not None) or magnitude != (self.keep is not None):
            raise ValueError(
                f"merge method '{self.name}': a magnitude sparsifier needs both rank_rule and keep, "
                "and no other sparsifier takes them"
            )
        if (self.basis is Basis.SVD) != (self.basis_keep is not None):
            raise ValueError(f"merge method '{self.name}': basis_keep goes with the SVD basis, and only with it")
        if self.combine is Combine.STITCH and self.sparsify is not Sparsify.MAGNITUDE:
            raise ValueError(f"merge method '{self.name}': stitching needs the magnitude masks")


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            name="weighted",
            summary="task arithmetic: λ·Σ wᵢτᵢ with free weights (DeMe's merge)",
            reference="Ilharco et al. 2023, arXiv 2212.04089; DeMe, arXiv 2410.06664",
            sparsify=Sparsify.NONE,
            combine=Combine.SUM,
            defaults={"sign": None},
        ),
        MergeMethod(
            name="ties",
            summary="TIES: trim to the top-k magnitudes, elect signs, disjoint mean, ×λ",
            reference="Yadav et al. 2023, arXiv 2306.01708 §3",
            sparsify=Sparsify.MAGNITUDE,
            combine=Combine.SUM,
            defaults={"k": 0.2, "topk_scope": "global", "sign": "mass"},
            rank_rule=RANK_RULES["ties"],
            keep=lambda params: params["k"],
        ),
        MergeMethod(
            name="dare",
            summary="DARE: drop entries with probability p, rescale by 1/(1−p); sum, or DARE-TIES with sign",
            reference="Yu et al. 2024, arXiv 2311.03099",
            sparsify=Sparsify.RANDOM,
            combine=Combine.SUM,
            defaults={"p": 0.9, "rescale": True, "seed": 0, "sign": None},
        ),
        MergeMethod(
            name="las",
            summary="Localize-and-Stitch (dataless): global top-k masks per task, overlaps averaged",
            reference="He et al. 2025, arXiv 2408.13656 (dataless localisation, stitching)",
            sparsify=Sparsify.MAGNITUDE,
            combine=Combine.STITCH,
            defaults={"k": 0.05},
            rank_rule=RANK_RULES["las"],
            keep=lambda params: params["k"],
        ),
        MergeMethod(
            name="drm",
            summary="Decom-Renorm-Merge: joint SVD per 2-D weight, renormalised joint trim, disjoint mean",
            reference="Chaichana et al. 2025, arXiv 2505.23117",
            sparsify=Sparsify.MAGNITUDE,
            combine=Combine.SUM,
            defaults={
                "direction": "vertical",
                "drop_rate": 0.8,
                "nonlinear_drop_rate": 0.0,
                "conv": False,
                "sign": "mass",
            },
            rank_rule=RANK_RULES["drm"],
            keep=lambda params: 1.0 - params["nonlinear_drop_rate"],
            basis=Basis.SVD,
            basis_keep=lambda params: 1.0 - params["drop_rate"],
            weights_after_election=True,
        ),
    )
}

COMMON_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"weights": None, "lam": 1.0, "key_weights": (), "block_weights": None}
)


class CombineStep(str, Enum):
    """The combine step a resolved merge runs."""

    SUM = "sum"
    DISJOINT_MEAN = "disjoint_mean"
    STITCH = "stitch"


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
    def consensus(self) -> CombineStep:
        """The combine step as run: stitching, a weighted sum, or (with a sign rule) the disjoint mean."""
        if self.method.combine is Combine.STITCH:
            return CombineStep.STITCH
        return CombineStep.DISJOINT_MEAN if self.sign else CombineStep.SUM

    @property
    def keep(self) -> float | None:
        return self.method.keep(self.params) if self.method.keep else None

    @property
    def trim_keep(self) -> float:
        """The fraction a magnitude trim keeps (only for methods that trim by magnitude)."""
        if self.method.keep is None:
            raise ValueError(f"merge method '{self.method.name}' has no magnitude trim")
        return self.method.keep(self.params)

    @property
    def basis_keep(self) -> float:
        """The fraction the SVD basis trim keeps (only for methods that merge in the SVD basis)."""
        if self.method.basis_keep is None:
            raise ValueError(f"merge method '{self.method.name}' has no SVD basis")
        return self.method.basis_keep(self.params)

    @property
    def election(self) -> str:
        """The sign election rule (only for a disjoint mean)."""
        if self.sign is None:
            raise ValueError(f"merge method '{self.method.name}' elects no sign here")
        return self.sign

    @property
    def uniform_weights(self) -> bool:
        return all(w == 1.0 for w in self.weights)

    @property
    def output_scale(self) -> float:
        """λ, times DARE's rescale 1/(1 − p) (linear in every combine step, so applied once at the end)."""
        scale = self.params["lam"]
        if self.method.sparsify is Sparsify.RANDOM and self.params["rescale"]:
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
