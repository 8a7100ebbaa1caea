"""Timestep sampling (ranges, global draw, antithetic pairs, CLTS) and MDLRC on plain numbers."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_merge.merging.sampling.schedules import discrete_scale, flow_scale
from diffusion_merge.merging.training.schedules import (
    WHOLE_SCHEDULE,
    MomentumDecay,
    TimeRange,
    TimestepCurriculum,
    TimestepSampler,
    range_cdf,
    range_density,
    range_quantile,
    resolve_time_range,
    training_progress,
)

DRAWS = 4000


def sd_sigma_table() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov–Smirnov distance between the empirical CDF of ``samples`` and ``cdf``."""
    values = torch.sort(samples.double()).values
    n = len(values)
    model = cdf(values)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - model
    below = model - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def ks_bound(n: int) -> float:
    return 1.95 / math.sqrt(n)  # the 0.1 % critical value of the KS statistic


def draw_many(sampler: TimestepSampler, batch: int, progress: float = 0.0, batches: int = DRAWS, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    draws = [sampler.draw(batch, progress, generator) for _ in range(batches)]
    times = torch.stack([d.normalized_times for d in draws])
    return times, torch.tensor([d.used_global for d in draws])


def reference_truncated_normal_cdf(u: torch.Tensor, low: float, high: float, mean: float, std: float):
    """Straight from the definition with erf (fine where the mass is not in a far tail)."""

    def phi(x):
        return 0.5 * (1 + torch.erf((x - mean) / (std * math.sqrt(2))))

    return (phi(u.clamp(low, high)) - phi(torch.tensor(low))) / (phi(torch.tensor(high)) - phi(torch.tensor(low)))


# -- ranges, global draws, antithetic pairs --------------------------------------------------------


def test_range_draws_are_uniform_inside_the_range():
    expert = TimeRange(0.25, 0.5)
    times, used_global = draw_many(TimestepSampler(expert), batch=1)
    assert not used_global.any()
    assert times.min() >= 0.25 and times.max() <= 0.5
    assert ks_distance(times.flatten(), lambda u: range_cdf(u, expert)) < ks_bound(DRAWS)


def test_antithetic_pairs_mirror_inside_the_range():
    expert = TimeRange(0.75, 1.0)
    generator = torch.Generator().manual_seed(3)
    draw = TimestepSampler(expert, antithetic=True).draw(6, 0.0, generator)
    first, mirrored = draw.normalized_times[:3], draw.normalized_times[3:]
    torch.testing.assert_close(first + mirrored, torch.full((3,), 1.75, dtype=torch.float64))
    odd = TimestepSampler(expert, antithetic=True).draw(5, 0.0, generator).normalized_times
    assert odd[0] + odd[3] == pytest.approx(1.75) and odd[1] + odd[4] == pytest.approx(1.75)


def test_antithetic_pairs_under_a_curriculum_are_mirrored_quantiles():
    expert = TimeRange(0.0, 0.6)
    curriculum = TimestepCurriculum(center=0.3, spread=0.1, max_weight=0.7, ramp_end=0.0)
    sampler = TimestepSampler(expert, antithetic=True, curriculum=curriculum)
    times = sampler.draw(8, 1.0, torch.Generator().manual_seed(5)).normalized_times
    levels = range_cdf(times, expert, 0.7, curriculum)
    torch.testing.assert_close(levels[:4] + levels[4:], torch.ones(4, dtype=torch.float64))


def test_global_probability_draws_whole_batches_from_the_whole_schedule():
    expert = TimeRange(0.75, 1.0)
    times, used_global = draw_many(TimestepSampler(expert, global_probability=0.3), batch=4)
    fraction = used_global.double().mean().item()
    assert abs(fraction - 0.3) < 4 * math.sqrt(0.3 * 0.7 / DRAWS)
    own, whole = times[~used_global].flatten(), times[used_global].flatten()
    assert own.min() >= 0.75 and own.max() <= 1.0
    assert whole.min() < 0.1 and ks_distance(whole, lambda u: u.clamp(0, 1)) < ks_bound(len(whole))
    marginal = TimestepSampler(expert, global_probability=0.3)
    assert ks_distance(times.flatten(), lambda u: marginal.cdf(u, 0.0)) < ks_bound(len(whole)) * 1.5


@pytest.mark.parametrize(("p", "expected"), [(0.0, False), (1.0, True)])
def test_global_probability_extremes(p, expected):
    _, used_global = draw_many(TimestepSampler(TimeRange(0.2, 0.4), global_probability=p), batch=2, batches=200)
    assert bool(used_global.all()) is expected and bool(used_global.any()) is expected


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_global_probability_outside_zero_one_is_refused(p):
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        TimestepSampler(WHOLE_SCHEDULE, global_probability=p)


def test_same_generator_seed_gives_the_same_draws():
    sampler = TimestepSampler(TimeRange(0.1, 0.9), 0.5, True, TimestepCurriculum())
    first, _ = draw_many(sampler, 3, 0.7, batches=20, seed=11)
    second, _ = draw_many(sampler, 3, 0.7, batches=20, seed=11)
    assert torch.equal(first, second)


# -- CLTS ------------------------------------------------------------------------------------------


def test_curriculum_weight_ramps_linearly():
    curriculum = TimestepCurriculum(max_weight=0.8, ramp_start=0.2, ramp_end=0.6)
    weights = [curriculum.weight(p) for p in (0.0, 0.2, 0.4, 0.6, 1.0)]
    assert weights == pytest.approx([0.0, 0.0, 0.4, 0.8, 0.8])
    assert TimestepCurriculum(ramp_start=0.5, ramp_end=0.5).weight(0.5) == 0.8


def test_curriculum_cdf_matches_the_definition_and_integrates_its_density():
    curriculum = TimestepCurriculum(center=0.3, spread=0.2)
    expert = TimeRange(0.1, 0.8)
    u = torch.linspace(0.1, 0.8, 701, dtype=torch.float64)
    normal = reference_truncated_normal_cdf(u, 0.1, 0.8, 0.3, 0.2)
    torch.testing.assert_close(range_cdf(u, expert, 1.0, curriculum), normal)
    mixture = range_cdf(u, expert, 0.6, curriculum)
    torch.testing.assert_close(mixture, 0.4 * (u - 0.1) / 0.7 + 0.6 * normal)
    integral = torch.cumulative_trapezoid(range_density(u, expert, 0.6, curriculum), u)
    torch.testing.assert_close(integral, mixture[1:], atol=2e-5, rtol=0)


def test_curriculum_draws_follow_its_density_and_move_towards_the_centre():
    curriculum = TimestepCurriculum(center=0.3, spread=0.15, max_weight=1.0, ramp_end=1.0)
    sampler = TimestepSampler(WHOLE_SCHEDULE, curriculum=curriculum)
    start, _ = draw_many(sampler, 200, progress=0.0, batches=DRAWS // 200)  # large batches: one bisection each
    end, _ = draw_many(sampler, 200, progress=1.0, batches=DRAWS // 200)
    assert ks_distance(start.flatten(), lambda u: u) < ks_bound(DRAWS)  # uniform before the ramp
    assert ks_distance(end.flatten(), lambda u: range_cdf(u, WHOLE_SCHEDULE, 1.0, curriculum)) < ks_bound(DRAWS)
    assert abs(end.mean().item() - 0.3) < 0.02 and abs(start.mean().item() - 0.5) < 0.02


def test_curriculum_far_from_the_range_stays_finite():
    curriculum = TimestepCurriculum(center=0.0, spread=0.01, max_weight=1.0, ramp_end=0.0)
    expert = TimeRange(0.75, 1.0)
    quantiles = range_quantile(torch.tensor([0.0, 0.5, 1.0]), expert, 1.0, curriculum)
    assert torch.isfinite(quantiles).all() and quantiles.min() >= 0.75 and quantiles.max() <= 1.0
    assert torch.isfinite(range_density(torch.tensor([0.75, 0.9]), expert, 1.0, curriculum)).all()
    assert torch.isfinite(range_cdf(torch.tensor([0.8]), TimeRange(0.0, 0.2), 1.0, TimestepCurriculum(1.0, 0.01))).all()


@pytest.mark.parametrize(
    "kwargs", [{"center": 1.2}, {"spread": 0.0}, {"max_weight": 1.5}, {"ramp_start": 0.7, "ramp_end": 0.3}]
)
def test_bad_curricula_are_refused(kwargs):
    with pytest.raises(ValueError, match="curriculum"):
        TimestepCurriculum(**kwargs)


# -- ranges in user units --------------------------------------------------------------------------


def test_timestep_and_percent_ranges_convert_with_the_model_schedule():
    table = sd_sigma_table()
    scale = discrete_scale(table)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    deme = resolve_time_range(750, 1000, "timestep", scale, sigma_min, sigma_max)
    assert deme.low == pytest.approx(750 / 999, abs=1e-6) and deme.high == pytest.approx(1.0)
    percent = resolve_time_range(0.0, 0.25, "percent", scale, sigma_min, sigma_max)
    assert (percent.low, percent.high) == (0.75, 1.0)
    sigma = resolve_time_range(1.0, float(table[-1]), "sigma", scale, sigma_min, sigma_max)
    assert scale.sigma_from_timestep(sigma.low * 999) == pytest.approx(1.0, rel=1e-4)


def test_flow_ranges_honour_the_shift():
    shift = 3.0
    scale = flow_scale(lambda p: shift * (1 - p) / (1 + (shift - 1) * (1 - p)))
    half = resolve_time_range(0.0, 0.5, "sigma", scale, 0.001, 1.0)
    # σ = 0.5 at shift 3 is unshifted time t = 0.25: σ = 3t / (1 + 2t)
    assert half.high == pytest.approx(0.25, abs=1e-6) and half.low == 0.0


@pytest.mark.parametrize(
    ("low", "high", "unit", "match"),
    [
        (0, 1200, "timestep", "outside the schedule"),
        (0, 50.0, "sigma", "outside this model's schedule"),
        (0.2, 1.3, "percent", "outside 0…1"),
        (-5, 100, "timestep", "≥ 0"),
        (500, 500, "timestep", "empty"),
        (0.0, 0.01, "sigma", "below this model's smallest σ"),
    ],
)
def test_ranges_outside_the_schedule_are_refused(low, high, unit, match):
    table = sd_sigma_table()
    with pytest.raises(ValueError, match=match):
        resolve_time_range(low, high, unit, discrete_scale(table), float(table[0]), float(table[-1]))


# -- MDLRC -----------------------------------------------------------------------------------------


def test_progress_runs_from_zero_to_one():
    assert [training_progress(k, 5) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert training_progress(0, 1) == 0.0


def test_rex_schedule_keeps_lr_times_one_minus_beta_constant():
    decay = MomentumDecay("rex", beta1_start=0.9, beta1_floor=0.0)
    for tau in (0.0, 0.3, 0.7, 1.0):
        beta = decay.beta1(tau)
        assert beta / (1 - beta) == pytest.approx(9.0 * (1 - tau), abs=1e-12)  # β/(1 − β) falls linearly
        lr = decay.learning_rate(2e-4, tau)
        assert lr * (1 - beta) == pytest.approx(2e-4 * 0.1, rel=1e-12)
        assert lr == pytest.approx(2e-4 * (1 - 0.9 * tau), rel=1e-12)  # the closed form lr₀·(1 − β₀τ), docs/methods.md


def test_linear_exponential_and_floor():
    assert MomentumDecay("linear", 0.9, 0.5).beta1(0.5) == pytest.approx(0.7)
    exponential = MomentumDecay("exponential", 0.9, 0.4)
    assert exponential.beta1(0.0) == pytest.approx(0.9) and exponential.beta1(1.0) == pytest.approx(0.4)
    assert exponential.beta1(0.5) == pytest.approx(0.9 * (0.4 / 0.9) ** 0.5)
    assert MomentumDecay("rex", 0.9, 0.6).beta1(0.95) == 0.6
    assert MomentumDecay("linear", 0.9, 0.5, compensate_lr=False).learning_rate(1e-3, 1.0) == 1e-3


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("cosine",), "unknown"),
        (("rex", 0.5, 0.7), "floor"),
        (("rex", 1.0), "< 1"),
        (("exponential", 0.9, 0.0), "above 0"),
    ],
)
def test_bad_momentum_schedules_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        MomentumDecay(*args)
