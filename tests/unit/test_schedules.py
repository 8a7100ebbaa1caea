"""σ-range maths for expert routing on plain numbers: units, conversions, tiling, coverage, step assignment."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_merge.merging.sampling.schedules import (
    SIGMA_TIE_RTOL,
    Boundary,
    ExpertRange,
    Unit,
    assign_steps,
    call_windows,
    check_coverage,
    discrete_scale,
    expert_index,
    expert_ranges,
    flow_scale,
    resolve_ends,
    step_spans,
)

PACK_ROOT = Path(__file__).resolve().parents[2]


def sd_sigma_table() -> torch.Tensor:
    """SD1.x/SDXL's σ table from its 'scaled linear' betas: σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), t = 0…999."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def shifted(shift: float):
    """A flow model's percent → σ with ComfyUI's time shift: σ = s·τ / (1 + (s − 1)·τ), τ = 1 − p."""
    return lambda percent: shift * (1 - percent) / (1 + (shift - 1) * (1 - percent))


@pytest.fixture
def sd_scale():
    return discrete_scale(sd_sigma_table())


# -- boundaries and units ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "match"),
    [(-0.1, "sigma", "≥ 0"), (float("nan"), "timestep", "finite"), (1.2, "percent", "outside 0…1")],
)
def test_bad_boundaries_are_refused(value, unit, match):
    with pytest.raises(ValueError, match=match):
        Boundary(value, unit)


def test_unknown_unit_is_refused():
    with pytest.raises(ValueError):
        Boundary(0.5, "steps")


def test_units_accept_their_names():
    assert Boundary(0.5, "percent").unit is Unit.PERCENT
    assert Boundary(875, "timestep").describe() == "timestep 875"


def test_discrete_scale_matches_the_table_at_integer_timesteps(sd_scale):
    table = sd_sigma_table()
    for timestep in (1, 250, 999):
        assert sd_scale.sigma_from_timestep(timestep) == pytest.approx(float(table[timestep]), rel=1e-12)
    assert float(table[0]) == pytest.approx(0.0292, abs=1e-4) and float(table[-1]) == pytest.approx(14.6146, abs=1e-4)


def test_discrete_scale_interpolates_log_sigma_between_timesteps(sd_scale):
    table = sd_sigma_table()
    expected = math.exp(0.5 * (math.log(table[100]) + math.log(table[101])))
    assert sd_scale.sigma_from_timestep(100.5) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("timestep", [0.0, 3.25, 499.5, 998.9])
def test_timestep_from_sigma_inverts_sigma_from_timestep(sd_scale, timestep):
    sigma = float(sd_sigma_table()[0]) if timestep == 0 else sd_scale.sigma_from_timestep(timestep)
    assert sd_scale.timestep_from_sigma(sigma) == pytest.approx(timestep, abs=1e-9)


def test_percent_follows_comfyuis_percent_to_sigma_convention(sd_scale):
    assert sd_scale.sigma_from_percent(0.5) == pytest.approx(sd_scale.sigma_from_timestep(499.5))
    assert sd_scale.sigma_from_percent(0.25) == pytest.approx(4.0861, abs=1e-3)  # ComfyUI's measured value
    assert sd_scale.sigma_from_percent(0.0) == math.inf
    assert sd_scale.to_sigma(Boundary(1.0, "percent")) == 0.0


def test_the_end_of_sampling_is_sigma_zero_in_every_unit(sd_scale):
    for boundary in (Boundary(0, "sigma"), Boundary(1, "percent"), Boundary(0, "timestep")):
        assert sd_scale.to_sigma(boundary) == 0.0


def test_flow_timesteps_are_a_thousand_times_sigma():
    scale = flow_scale(shifted(8.0))
    assert scale.to_sigma(Boundary(875, "timestep")) == pytest.approx(0.875)  # Wan 2.2's T2V boundary
    assert scale.timestep_from_sigma(0.9) == pytest.approx(900)
    assert scale.to_sigma(Boundary(0.5, "percent")) == pytest.approx(0.8889, abs=1e-4)  # shift 8


def test_percent_from_sigma_inverts_the_percent_rule():
    scale = flow_scale(shifted(3.0))
    for percent in (0.1, 0.5, 0.93):
        assert scale.percent_from_sigma(scale.sigma_from_percent(percent)) == pytest.approx(percent, abs=1e-9)


def test_the_same_sigma_in_three_units_routes_identically(sd_scale):
    sigmas = torch.tensor([14.61, 7.0, 3.2, 1.5, 0.7, 0.2, 0.0])
    sigma = sd_scale.sigma_from_percent(0.42)
    timestep = sd_scale.timestep_from_sigma(sigma)
    routings = [
        assign_steps(sigmas, resolve_ends([Boundary(value, unit), Boundary(0, "sigma")], sd_scale))
        for value, unit in ((sigma, "sigma"), (0.42, "percent"), (timestep, "timestep"))
    ]
    assert routings[0] == routings[1] == routings[2]
    assert routings[0] == [0, 0, 0, 1, 1, 1]


# -- tiling ---------------------------------------------------------------------------------------


def test_ends_must_strictly_decrease_in_sigma(sd_scale):
    ends = resolve_ends([Boundary(0.25, "percent"), Boundary(1.0, "sigma"), Boundary(0, "timestep")], sd_scale)
    assert ends[0] > ends[1] > ends[2] == 0.0
    with pytest.raises(ValueError, match=r"expert 2 stops at percent 0.2 .*expert 1 stops \(percent 0.5"):
        resolve_ends([Boundary(0.5, "percent"), Boundary(0.2, "percent")], sd_scale)


@pytest.mark.parametrize(("value", "unit"), [(1000, "timestep"), (999, "timestep"), (20.0, "sigma"), (0.0, "percent")])
def test_a_first_expert_stopping_where_sampling_starts_is_refused(sd_scale, value, unit):
    """Its range (σ above its end) would hold no step, and the second expert would run alone."""
    with pytest.raises(ValueError, match=r"expert 1 stops at .*range would be empty: expert 2 would run every step"):
        resolve_ends([Boundary(value, unit), Boundary(0, "sigma")], sd_scale)
    assert resolve_ends([Boundary(998, "timestep"), Boundary(0, "sigma")], sd_scale)[0] < sd_scale.sigma_max


def test_a_flow_model_first_expert_at_timestep_1000_is_refused():
    scale = flow_scale(shifted(3.0))
    scale = type(scale)(scale.sigma_from_percent, scale.sigma_from_timestep, scale.timestep_from_sigma, 1.0)
    with pytest.raises(ValueError, match=r"expert 1 stops at timestep 1000 \(σ 1\)"):
        resolve_ends([Boundary(1000, "timestep"), Boundary(0, "sigma")], scale)
    assert resolve_ends([Boundary(875, "timestep"), Boundary(0, "sigma")], scale) == [0.875, 0.0]


def test_an_empty_range_is_an_overlap(sd_scale):
    with pytest.raises(ValueError, match="range would be empty"):
        resolve_ends([Boundary(2.0, "sigma"), Boundary(2.0, "sigma")], sd_scale)


def test_no_experts_is_refused(sd_scale):
    with pytest.raises(ValueError, match="no experts"):
        resolve_ends([], sd_scale)


def test_ranges_tile_from_the_start_to_the_last_end():
    ranges = expert_ranges([5.0, 1.0, 0.0])
    assert ranges == [ExpertRange(math.inf, 5.0), ExpertRange(5.0, 1.0), ExpertRange(1.0, 0.0)]
    assert ranges[0].contains(100.0) and not ranges[0].contains(5.0) and ranges[1].contains(5.0)


def test_a_sigma_on_a_boundary_belongs_to_the_next_expert():
    ends = [0.875, 0.0]
    assert expert_index(0.8751, ends) == 0
    assert expert_index(0.875, ends) == 1
    assert expert_index(0.875 * (1 + SIGMA_TIE_RTOL / 2), ends) == 1  # float32 noise on the boundary
    assert expert_index(0.0, ends) is None


def test_a_boundary_on_step_k_splits_like_split_sigmas_at_k():
    sigmas = [14.6, 5.1, 2.3, 1.16, 0.57, 0.03, 0.0]
    assert assign_steps(sigmas, [sigmas[3], 0.0]) == [0, 0, 0, 1, 1, 1]


# -- coverage -------------------------------------------------------------------------------------


def test_experts_ending_above_the_schedule_are_refused_with_the_steps():
    sigmas = torch.tensor([14.6, 5.1, 2.3, 1.16, 0.57, 0.03, 0.0])
    with pytest.raises(ValueError, match=r"σ 0.57, 0.03 \(steps 5–6 of 6\).*σ 0, percent 1 or timestep 0"):
        check_coverage([3.0, 1.0], sigmas, [Boundary(3.0, "sigma"), Boundary(1.0, "sigma")])


def test_a_partial_schedule_needs_only_its_own_range():
    check_coverage([3.0, 1.0], torch.tensor([14.6, 5.1, 2.3, 1.16]))  # stops with leftover noise at σ 1.16
    check_coverage([3.0, 0.0], [14.6, 0.57, 0.0])


def test_step_spans_group_consecutive_steps():
    assert step_spans([0, 0, 1, 1, 1, None]) == [(0, 0, 1), (1, 2, 4), (None, 5, 5)]


def test_call_windows_name_an_expert_only_where_no_boundary_falls_between_reported_steps():
    sigmas = [8.0, 4.0, 2.0, 1.0, 0.5, 0.0]
    window, point = call_windows([2.0, 0.0], sigmas)  # expert 1 above σ 2, expert 2 from σ 2 down
    # after c reported steps the calls lie in [σ_{c+1}, σ_{c-1}] (the final σ 0 is never evaluated)
    assert window == [0, None, None, 1, 1, 1]
    assert point == [0, 0, 1, 1, 1, 1]  # a step exactly on the boundary is the next expert's
    assert call_windows([0.0], sigmas) == ([0] * 6, [0] * 6)  # one expert: never a boundary


def test_call_windows_of_a_schedule_ending_above_zero_include_its_last_sigma():
    window, _ = call_windows([3.0, 0.0], torch.tensor([8.0, 4.0, 2.0]))
    assert window == [0, None, None]  # σ 2 is evaluated (by Heun, say) and is expert 2's


def test_the_library_imports_without_comfyui():
    env = {**os.environ, "PYTHONPATH": str(PACK_ROOT)}
    code = "import sys, merging.sampling.schedules; assert not any(m.split('.')[0] == 'comfy' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=PACK_ROOT, env=env, check=True)
