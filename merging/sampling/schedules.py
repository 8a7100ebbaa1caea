"""σ ranges for expert routing: units, conversions, tiling rules and step assignment (pure maths).

A routed model hands each network call to the expert whose noise range holds the call's σ. Users give
the boundaries in one of three units, all converted to σ with one model's sampling rules:

- ``sigma``: the noise level itself (what samplers pass to the model); higher = earlier in sampling.
- ``percent``: progress through sampling in ComfyUI's ``model_sampling.percent_to_sigma`` convention
  (0 = the start, 1 = the end; for ε/v models σ(p) = σ_table((1 − p) · 999)).
- ``timestep``: the training timestep on the 0…1000 scale; for ε/v models the (fractional) index into the
  1000-entry σ table, for flow models (CONST: SD3, Wan, Flux, …) 1000 · σ, which is the value Wan 2.2's
  ``boundary`` (875, 900) refers to.

The extreme value of each unit that means "the end of sampling" (σ 0, percent 1, timestep 0) maps to
σ = 0, as ComfyUI's ``percent_to_sigma(1)`` does.

**Tiling rule.** Experts are listed from high noise to low noise and each names only where it *stops*:
expert k runs for end_k < σ ≤ end_{k−1} (the first expert from the start of sampling). So the ranges can
never leave a gap; ends that do not strictly decrease would overlap and are refused. A σ exactly on a
boundary belongs to the *later* expert, which makes "stop at σ_k" equal to splitting the schedule at
step k (``SplitSigmas``, or two ``KSamplerAdvanced`` with leftover noise). The last expert must reach
every σ the sampler evaluates, which :func:`check_coverage` verifies against the actual schedule.

Nothing here imports ComfyUI; the nodes build a :class:`SigmaScale` from a model's sampling object.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

# A σ within this relative distance above a boundary counts as on it (float32 schedules vs float64 ends).
SIGMA_TIE_RTOL = 1e-5
TIMESTEP_SCALE = 1000.0
_BISECTION_STEPS = 60


class Unit(str, Enum):
    """The unit a boundary is given in."""

    SIGMA = "sigma"
    PERCENT = "percent"
    TIMESTEP = "timestep"


UNITS: tuple[str, ...] = tuple(unit.value for unit in Unit)


@dataclass(frozen=True)
class Boundary:
    """Where one expert stops, in a user-facing unit (converted to σ with a :class:`SigmaScale`)."""

    value: float
    unit: Unit

    def __post_init__(self):
        object.__setattr__(self, "unit", Unit(self.unit))
        if not math.isfinite(self.value) or self.value < 0:
            raise ValueError(f"boundary {self.value!r} ({self.unit.value}) must be a finite number ≥ 0")
        if self.unit is Unit.PERCENT and self.value > 1:
            raise ValueError(f"percent boundary {self.value} is outside 0…1 (0 = start of sampling, 1 = the end)")

    def describe(self) -> str:
        symbol = {Unit.SIGMA: "σ", Unit.PERCENT: "percent", Unit.TIMESTEP: "timestep"}[self.unit]
        return f"{symbol} {self.value:g}"


@dataclass(frozen=True)
class SigmaScale:
    """How one model's sampling maps percent and timestep to σ (and back, for display).

    ``sigma_max`` is the highest noise level the model samples from (where a full schedule starts); ``inf``
    when unknown.
    """

    sigma_from_percent: Callable[[float], float]
    sigma_from_timestep: Callable[[float], float]
    timestep_from_sigma: Callable[[float], float]
    sigma_max: float = math.inf

    def to_sigma(self, boundary: Boundary) -> float:
        """The σ a boundary stands for; the 'end of sampling' value of each unit gives 0."""
        if boundary.unit is Unit.SIGMA:
            return float(boundary.value)
        if boundary.unit is Unit.PERCENT:
            return 0.0 if boundary.value >= 1 else float(self.sigma_from_percent(boundary.value))
        return 0.0 if boundary.value <= 0 else float(self.sigma_from_timestep(boundary.value))

    def percent_from_sigma(self, sigma: float) -> float:
        """Inverse of ``sigma_from_percent`` by bisection (it is monotone decreasing)."""
        low, high = 0.0, 1.0
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if self.sigma_from_percent(middle) > sigma:
                low = middle
            else:
                high = middle
        return (low + high) / 2


def discrete_scale(sigma_table: Sequence[float] | torch.Tensor, sigma_from_percent=None) -> SigmaScale:
    """The scale of an ε/v model with a discrete σ table (ComfyUI's ``ModelSamplingDiscrete``).

    ``sigma_table[t]`` is σ at integer timestep t (increasing). Fractional timesteps interpolate log σ
    linearly, as ``ModelSamplingDiscrete.sigma`` does; percent p maps to the timestep (1 − p)·(N − 1)
    unless the model's own ``percent_to_sigma`` is given.
    """
    log_sigmas = torch.as_tensor(sigma_table, dtype=torch.float64).log().tolist()
    if any(b <= a for a, b in itertools.pairwise(log_sigmas)):
        raise ValueError("the σ table must be strictly increasing with the timestep")
    last = len(log_sigmas) - 1

    def sigma_at(timestep: float) -> float:
        position = min(max(float(timestep), 0.0), float(last))
        low = min(math.floor(position), last - 1)
        weight = position - low
        return math.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[low + 1])

    def timestep_at(sigma: float) -> float:
        if sigma <= 0:
            return 0.0
        log_sigma = math.log(sigma)
        if log_sigma <= log_sigmas[0]:
            return 0.0
        if log_sigma >= log_sigmas[-1]:
            return float(last)
        low = bisect.bisect_right(log_sigmas, log_sigma) - 1
        return low + (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])

    def percent_rule(percent: float) -> float:
        return math.inf if percent <= 0 else sigma_at((1 - percent) * last)

    return SigmaScale(sigma_from_percent or percent_rule, sigma_at, timestep_at, math.exp(log_sigmas[-1]))


def flow_scale(sigma_from_percent: Callable[[float], float]) -> SigmaScale:
    """The scale of a flow model (CONST: x = (1 − σ)·x₀ + σ·ε): timestep = 1000 · σ on the training scale."""
    return SigmaScale(
        sigma_from_percent,
        lambda timestep: float(timestep) / TIMESTEP_SCALE,
        lambda sigma: float(sigma) * TIMESTEP_SCALE,
    )


@dataclass(frozen=True)
class ExpertRange:
    """The σ interval one expert serves: ``sigma_low < σ ≤ sigma_high`` (``inf`` for the first)."""

    sigma_high: float
    sigma_low: float

    def contains(self, sigma: float) -> bool:
        return _above(sigma, self.sigma_low) and not _above(sigma, self.sigma_high)


def resolve_ends(boundaries: Sequence[Boundary], scale: SigmaScale) -> list[float]:
    """Each expert's end in σ, checked to tile (strictly decreasing); see the module docstring.

    Every range must be able to hold a step: the first expert must stop below the model's ``sigma_max`` (where
    sampling starts), each later one below the one before.
    """
    if not boundaries:
        raise ValueError("no experts: connect at least one expert")
    ends = [scale.to_sigma(boundary) for boundary in boundaries]
    if not _above(scale.sigma_max, ends[0]):
        after = ": expert 2 would run every step" if len(ends) > 1 else ""
        raise ValueError(
            f"expert 1 stops at {boundaries[0].describe()} (σ {ends[0]:.4g}), which is not below where sampling "
            f"starts (this model's highest σ is {scale.sigma_max:.4g}): its range would be empty{after}. Let it "
            "stop at a lower σ (a higher percent, a lower timestep)."
        )
    for index in range(1, len(ends)):
        if ends[index] >= ends[index - 1]:
            raise ValueError(
                f"expert {index + 1} stops at {boundaries[index].describe()} (σ {ends[index]:.4g}), which is not "
                f"later in sampling than where expert {index} stops ({boundaries[index - 1].describe()}, "
                f"σ {ends[index - 1]:.4g}): its range would be empty. Chain experts from high noise to low noise, "
                "each stopping at a lower σ (higher percent, lower timestep) than the one before."
            )
    return ends


def expert_ranges(ends_sigma: Sequence[float]) -> list[ExpertRange]:
    """The σ interval of each expert from the resolved ends."""
    highs = [math.inf, *ends_sigma[:-1]]
    return [ExpertRange(high, low) for high, low in zip(highs, ends_sigma, strict=True)]


def expert_index(sigma: float, ends_sigma: Sequence[float]) -> int | None:
    """The expert serving ``sigma`` (index into ``ends_sigma``), or None when no expert reaches it."""
    for index, end in enumerate(ends_sigma):
        if _above(sigma, end):
            return index
    return None


def _above(sigma: float, end: float) -> bool:
    """Whether ``sigma`` lies past a boundary ``end`` (a σ on the boundary, up to float noise, does not)."""
    return sigma > end * (1 + SIGMA_TIE_RTOL)


def evaluated_sigmas(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """The σ at which a sampler calls the model: every schedule entry but the last (the target)."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
    return values[:-1]


def assign_steps(sigmas: Sequence[float] | torch.Tensor, ends_sigma: Sequence[float]) -> list[int | None]:
    """The expert of each sampling step of a schedule (None where no expert reaches the step's σ)."""
    return [expert_index(sigma, ends_sigma) for sigma in evaluated_sigmas(sigmas)]


def call_windows(
    ends_sigma: Sequence[float], sigmas: Sequence[float] | torch.Tensor
) -> tuple[list[int | None], list[int | None]]:
    """The expert of a sampler's network calls known from its progress alone, without reading σ from the device.

    A sampler that reports each step (ComfyUI's sampler callback, step i, after that step's first call) makes
    every later call, until it reports step i + 1, at a σ between σ_{i+2} and σ_i of its schedule: Euler,
    ancestral and multistep samplers at σ_{i+1}, Heun's second evaluation at σ_{i+1}, midpoint samplers
    between σ_{i+1} and σ_i. For each count c = 0 … steps of reported steps this returns

    - ``window[c]``: the expert serving that whole window, or None when a boundary falls inside it;
    - ``point[c]``: the expert of σ_c, where the next call of a single-evaluation sampler lands.

    A final σ of 0 is never evaluated, so windows stop at the last σ before it. A sampler that breaks the
    pattern (restarts, adaptive steps) is caught by checking the calls' real σ afterwards.
    """
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
    last = len(values) - 2 if len(values) > 1 and values[-1] == 0 else len(values) - 1
    experts = [expert_index(sigma, ends_sigma) for sigma in values]
    window, point = [], []
    for count in range(len(values)):
        high, low = experts[min(max(count - 1, 0), last)], experts[min(count + 1, last)]
        window.append(high if high == low and high is not None else None)
        point.append(experts[min(count, last)])
    return window, point


def coverage_problem(
    ends_sigma: Sequence[float],
    sigmas: Sequence[float] | torch.Tensor,
    boundaries: Sequence[Boundary] | None = None,
) -> str | None:
    """Why the experts do not cover a schedule (the steps below the last expert's end), or None when they do."""
    steps = assign_steps(sigmas, ends_sigma)
    uncovered = [i for i, expert in enumerate(steps) if expert is None]
    if not uncovered:
        return None
    values = evaluated_sigmas(sigmas)
    where = boundaries[-1].describe() + ", " if boundaries else ""
    shown = ", ".join(f"{values[i]:.4g}" for i in uncovered[:4]) + (" …" if len(uncovered) > 4 else "")
    return (
        f"the experts do not cover this schedule: the last expert stops at {where}σ {ends_sigma[-1]:.4g}, but "
        f"the sampler still evaluates σ {shown} (steps {uncovered[0] + 1}–{uncovered[-1] + 1} of {len(values)}). "
        "Let the last expert end at the end of sampling: σ 0, percent 1 or timestep 0."
    )


def check_coverage(
    ends_sigma: Sequence[float],
    sigmas: Sequence[float] | torch.Tensor,
    boundaries: Sequence[Boundary] | None = None,
) -> None:
    """Refuse a schedule that samples below where the last expert stops (see :func:`coverage_problem`)."""
    problem = coverage_problem(ends_sigma, sigmas, boundaries)
    if problem:
        raise ValueError(problem)


def step_spans(assignment: Sequence[int | None]) -> list[tuple[int | None, int, int]]:
    """Runs of consecutive steps with the same expert: (expert, first step, last step), 0-based."""
    spans: list[tuple[int | None, int, int]] = []
    for step, expert in enumerate(assignment):
        if spans and spans[-1][0] == expert:
            spans[-1] = (expert, spans[-1][1], step)
        else:
            spans.append((expert, step, step))
    return spans
