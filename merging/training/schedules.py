"""Timestep sampling and optimiser schedules for training range experts (pure maths, no ComfyUI).

**Normalised time.** Everything here works in u ∈ [0, 1], the fraction of the noise schedule:
u = 1 − ComfyUI's sampling percent, so u = 0 is the clean end (σ_min) and u = 1 pure noise (σ_max). For
discrete ε/v models u = t / 999 for training timestep t; for flow models σ = shift(u). Drawing u uniformly
is what ComfyUI's own trainer does (uniform in percent) and what DeMe does (uniform integer timesteps).

**Range experts** (DeMe, arXiv 2410.06664; docs/methods.md). A :class:`TimestepSampler` draws u from the expert's range
[a, b]; with probability p (one coin per batch) from the whole schedule [0, 1] instead. *Antithetic* pairs
are drawn as quantiles (v, 1 − v) of the active density; for the uniform density that is u' = a + b − u,
DeMe's mirrored timesteps.

**CLTS** (curriculum timestep schedule, arXiv 2404.07946 — our reconstruction, not the paper's formula): the
density moves during training from uniform towards a normal density around μ, truncated to the active range,

    ρ_k(u) = (1 − λ_k) · U[a, b](u) + λ_k · N_[a,b](u; μ, s²),
    λ_k = λ_max · clamp((τ_k − r₀) / (r₁ − r₀), 0, 1),   τ_k = k / (K − 1)

for optimiser step k of K, centre μ (0.3), spread s, weight λ_max and ramp [r₀, r₁] (fractions of training).

**MDLRC** (momentum decay with learning-rate compensation, arXiv 2404.07946 — reconstruction, ``docs/methods.md``):
Adam's β₁ decays with τ_k and the learning rate is scaled so that lr · (1 − β₁) — the weight of the newest gradient in
the momentum — stays at its initial value:

    rex:          β₁(τ) = max(floor, β₀(1 − τ) / ((1 − β₀) + β₀(1 − τ)))   (β₁/(1 − β₁) falls linearly to 0)
    linear:       β₁(τ) = β₀ + (floor − β₀) · τ
    exponential:  β₁(τ) = β₀ · (floor / β₀)^τ                              (floor > 0)
    lr(τ) = lr₀ · (1 − β₀) / (1 − β₁(τ))   with compensation, else lr₀.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sampling.schedules import TIMESTEP_SCALE, Boundary, SigmaScale, Unit

MIN_RANGE_WIDTH = 1e-6
MOMENTUM_SCHEDULES: tuple[str, ...] = ("rex", "linear", "exponential")
_BISECTION_STEPS = 60
_SCHEDULE_RTOL = 1e-6


def training_progress(step: int, total_steps: int) -> float:
    """τ of optimiser step ``step`` (0-based) of ``total_steps``: 0 at the first step, 1 at the last."""
    return 0.0 if total_steps <= 1 else min(max(step / (total_steps - 1), 0.0), 1.0)


# -- ranges ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    """A range [low, high] of normalised time (0 = clean, 1 = pure noise)."""

    low: float
    high: float

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"time range [{self.low}, {self.high}] must be finite")
        if self.low < 0 or self.high > 1:
            raise ValueError(f"time range [{self.low:g}, {self.high:g}] is outside the schedule [0, 1]")
        if self.high - self.low < MIN_RANGE_WIDTH:
            raise ValueError(f"time range [{self.low:g}, {self.high:g}] is empty")

    @property
    def width(self) -> float:
        return self.high - self.low


WHOLE_SCHEDULE = TimeRange(0.0, 1.0)


def resolve_time_range(
    range_min: float, range_max: float, unit: str, scale: SigmaScale, sigma_min: float, sigma_max: float
) -> TimeRange:
    """The normalised-time range of a user range given in σ, sampling percent or timestep (0…1000).

    Conversions use the model's own sampling (``scale``, shift included). Ranges reaching outside the
    schedule (σ above σ_max, timestep above 1000, percent above 1, anything negative) are refused.
    """
    unit = Unit(unit)
    for name, value in (("range_min", range_min), ("range_max", range_max)):
        Boundary(value, unit)  # finite, ≥ 0, percent ≤ 1
        _check_inside_schedule(name, value, unit, sigma_max)
    if range_min >= range_max:
        raise ValueError(f"range_min ({range_min:g}) must be below range_max ({range_max:g}) — the range is empty")
    if unit is Unit.SIGMA and range_max <= sigma_min:
        raise ValueError(
            f"the σ range [{range_min:g}, {range_max:g}] lies below this model's smallest σ ({sigma_min:.4g})"
        )
    ends = [_normalized_time(value, unit, scale) for value in (range_min, range_max)]
    low, high = min(ends), max(ends)
    if high - low < MIN_RANGE_WIDTH:
        raise ValueError(
            f"the range [{range_min:g}, {range_max:g}] ({unit.value}) is empty on this model's schedule "
            f"(normalised time {low:.6f}…{high:.6f})"
        )
    return TimeRange(low, high)


def _check_inside_schedule(name: str, value: float, unit: Unit, sigma_max: float) -> None:
    if unit is Unit.SIGMA and value > sigma_max * (1 + _SCHEDULE_RTOL):
        raise ValueError(
            f"{name} σ {value:g} is outside this model's schedule: its largest σ is {sigma_max:.4g}. "
            "Use a σ inside the schedule, or give the range in percent (0–1) or timestep (0–1000)."
        )
    if unit is Unit.TIMESTEP and value > TIMESTEP_SCALE * (1 + _SCHEDULE_RTOL):
        raise ValueError(f"{name} timestep {value:g} is outside the schedule: timesteps run from 0 to 1000")


def _normalized_time(value: float, unit: Unit, scale: SigmaScale) -> float:
    if unit is Unit.PERCENT:
        return 1.0 - value
    sigma = scale.to_sigma(Boundary(value, unit))
    return min(max(1.0 - scale.percent_from_sigma(sigma), 0.0), 1.0)


# -- CLTS: the curriculum density ---------------------------------------------------------------------


@dataclass(frozen=True)
class TimestepCurriculum:
    """CLTS, reconstructed: the sampling density ramps from uniform to a truncated normal around ``center``."""

    center: float = 0.3
    spread: float = 0.15
    max_weight: float = 0.8
    ramp_start: float = 0.0
    ramp_end: float = 0.5

    def __post_init__(self):
        if not 0 <= self.center <= 1:
            raise ValueError(f"curriculum centre μ = {self.center} must be a normalised time in [0, 1]")
        if not 0.01 <= self.spread <= 1:
            raise ValueError(f"curriculum spread s = {self.spread} must be in [0.01, 1] (normalised time)")
        if not 0 <= self.max_weight <= 1:
            raise ValueError(f"curriculum weight λ_max = {self.max_weight} must be in [0, 1]")
        if not 0 <= self.ramp_start <= self.ramp_end <= 1:
            raise ValueError(
                f"curriculum ramp {self.ramp_start}…{self.ramp_end} must satisfy 0 ≤ ramp_start ≤ ramp_end ≤ 1 "
                "(fractions of training)"
            )

    def weight(self, progress: float) -> float:
        """λ at training progress τ ∈ [0, 1]."""
        if progress < self.ramp_start:
            return 0.0
        if progress >= self.ramp_end:
            return self.max_weight
        return self.max_weight * (progress - self.ramp_start) / (self.ramp_end - self.ramp_start)


def _log_normal_mass(low: float, upper: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) − Φ(low)) for standardised bounds, stable far out in either tail."""
    low_t = torch.as_tensor(low, dtype=torch.float64)
    if low > 0:  # both bounds right of the mean: survival functions
        log_low, log_upper = torch.special.log_ndtr(-low_t), torch.special.log_ndtr(-upper)
        return log_low + torch.log(-torch.expm1(log_upper - log_low))
    if bool((upper < 0).all()):  # both left of the mean
        log_low, log_upper = torch.special.log_ndtr(low_t), torch.special.log_ndtr(upper)
        return log_upper + torch.log(-torch.expm1(log_low - log_upper))
    return torch.log(torch.special.ndtr(upper) - torch.special.ndtr(low_t))


def _truncated_normal_cdf(times: torch.Tensor, time_range: TimeRange, mean: float, std: float) -> torch.Tensor:
    alpha, beta = (time_range.low - mean) / std, (time_range.high - mean) / std
    x = ((times - mean) / std).clamp(alpha, beta)
    total = _log_normal_mass(alpha, torch.tensor([beta], dtype=torch.float64))
    return torch.exp(_log_normal_mass(alpha, x) - total).clamp(0.0, 1.0)


def _truncated_normal_density(times: torch.Tensor, time_range: TimeRange, mean: float, std: float) -> torch.Tensor:
    alpha, beta = (time_range.low - mean) / std, (time_range.high - mean) / std
    total = _log_normal_mass(alpha, torch.tensor([beta], dtype=torch.float64))
    x = (times - mean) / std
    log_density = -0.5 * x**2 - 0.5 * math.log(2 * math.pi) - math.log(std) - total
    inside = (times >= time_range.low) & (times <= time_range.high)
    return torch.where(inside, torch.exp(log_density), torch.zeros_like(times))


def range_cdf(
    times: torch.Tensor, time_range: TimeRange, weight: float = 0.0, curriculum: TimestepCurriculum | None = None
) -> torch.Tensor:
    """CDF of the (1 − λ)·uniform + λ·truncated-normal density on ``time_range`` (float64)."""
    times = torch.as_tensor(times, dtype=torch.float64)
    uniform = ((times - time_range.low) / time_range.width).clamp(0.0, 1.0)
    if curriculum is None or weight <= 0:
        return uniform
    normal = _truncated_normal_cdf(times, time_range, curriculum.center, curriculum.spread)
    return (1 - weight) * uniform + weight * normal


def range_density(
    times: torch.Tensor, time_range: TimeRange, weight: float = 0.0, curriculum: TimestepCurriculum | None = None
) -> torch.Tensor:
    """Density of the same mixture (0 outside the range)."""
    times = torch.as_tensor(times, dtype=torch.float64)
    inside = (times >= time_range.low) & (times <= time_range.high)
    uniform = torch.where(inside, torch.full_like(times, 1 / time_range.width), torch.zeros_like(times))
    if curriculum is None or weight <= 0:
        return uniform
    normal = _truncated_normal_density(times, time_range, curriculum.center, curriculum.spread)
    return (1 - weight) * uniform + weight * normal


def range_quantile(
    levels: torch.Tensor, time_range: TimeRange, weight: float = 0.0, curriculum: TimestepCurriculum | None = None
) -> torch.Tensor:
    """Inverse of :func:`range_cdf` at ``levels`` ∈ [0, 1] (closed form when uniform, else bisection)."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    if curriculum is None or weight <= 0:
        return time_range.low + levels * time_range.width
    low = torch.full_like(levels, time_range.low)
    high = torch.full_like(levels, time_range.high)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        below = range_cdf(middle, time_range, weight, curriculum) < levels
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return (low + high) / 2


# -- drawing timesteps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimestepDraw:
    """The normalised times of one batch, and how they were drawn."""

    normalized_times: torch.Tensor  # (batch,) float64
    used_global: bool
    curriculum_weight: float


@dataclass(frozen=True)
class TimestepSampler:
    """DeMe's range sampling (own range, probabilistic global draw, antithetic pairs) with an optional CLTS."""

    expert_range: TimeRange = WHOLE_SCHEDULE
    global_probability: float = 0.0
    antithetic: bool = False
    curriculum: TimestepCurriculum | None = None

    def __post_init__(self):
        p = self.global_probability
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p <= 1):
            raise ValueError(f"global_probability p = {p} must be a probability in [0, 1]")

    def curriculum_weight(self, progress: float) -> float:
        return self.curriculum.weight(progress) if self.curriculum is not None else 0.0

    def draw(self, batch: int, progress: float, generator: torch.Generator) -> TimestepDraw:
        """One batch: a coin for the global draw, then ``batch`` times (antithetic quantile pairs if asked)."""
        if batch < 1:
            raise ValueError(f"batch size {batch} must be at least 1")
        used_global = torch.rand((), generator=generator, dtype=torch.float64).item() < self.global_probability
        time_range = WHOLE_SCHEDULE if used_global else self.expert_range
        count = (batch + 1) // 2 if self.antithetic else batch
        levels = torch.rand(count, generator=generator, dtype=torch.float64)
        if self.antithetic:
            levels = torch.cat([levels, 1 - levels])[:batch]
        weight = self.curriculum_weight(progress)
        return TimestepDraw(range_quantile(levels, time_range, weight, self.curriculum), used_global, weight)

    def density(self, times: torch.Tensor, progress: float) -> torch.Tensor:
        """The marginal density of one drawn time at ``progress`` (antithetic pairs keep the marginal)."""
        weight = self.curriculum_weight(progress)
        own = range_density(times, self.expert_range, weight, self.curriculum)
        whole = range_density(times, WHOLE_SCHEDULE, weight, self.curriculum)
        return (1 - self.global_probability) * own + self.global_probability * whole

    def cdf(self, times: torch.Tensor, progress: float) -> torch.Tensor:
        """The marginal CDF of one drawn time at ``progress``."""
        weight = self.curriculum_weight(progress)
        own = range_cdf(times, self.expert_range, weight, self.curriculum)
        whole = range_cdf(times, WHOLE_SCHEDULE, weight, self.curriculum)
        return (1 - self.global_probability) * own + self.global_probability * whole


# -- MDLRC: momentum decay with learning-rate compensation --------------------------------------------


@dataclass(frozen=True)
class MomentumDecay:
    """β₁ and learning-rate schedule of MDLRC (see the module docstring for the formulas)."""

    schedule: str = "rex"
    beta1_start: float = 0.9
    beta1_floor: float = 0.0
    compensate_lr: bool = True

    def __post_init__(self):
        if self.schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"momentum schedule '{self.schedule}' is unknown; choose one of {MOMENTUM_SCHEDULES}")
        if not 0 <= self.beta1_floor <= self.beta1_start < 1:
            raise ValueError(f"momentum decay needs 0 ≤ floor ({self.beta1_floor}) ≤ β₁ start ({self.beta1_start}) < 1")
        if self.schedule == "exponential" and self.beta1_floor <= 0:
            raise ValueError("the exponential momentum schedule needs a floor above 0 (β₁ = β₀·(floor/β₀)^τ)")

    def beta1(self, progress: float) -> float:
        """β₁ at training progress τ ∈ [0, 1]."""
        tau = min(max(progress, 0.0), 1.0)
        start, floor = self.beta1_start, self.beta1_floor
        if self.schedule == "linear":
            return start + (floor - start) * tau
        if self.schedule == "exponential":
            return start * (floor / start) ** tau
        remaining = start * (1 - tau)
        return max(floor, remaining / ((1 - start) + remaining))

    def learning_rate(self, base_lr: float, progress: float) -> float:
        """The learning rate at τ: lr₀·(1 − β₀)/(1 − β₁(τ)) with compensation (lr·(1 − β₁) constant), else lr₀."""
        if not self.compensate_lr:
            return base_lr
        return base_lr * (1 - self.beta1_start) / (1 - self.beta1(progress))
