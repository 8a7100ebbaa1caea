"""SuperDiff maths on plain tensors: the SDE step, the Itô estimator (Thm. 1), κ for OR and AND, guards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_merge.merging.sampling import superdiff as sd

D = 16  # dimensions of the Gaussian toys


# -- a Gaussian toy with exact denoisers, sampled with the library's step ------------------------------


def gaussian_denoised(x, mean, sigma, kind, data_var=1.0):
    """E[x₀ | x] for x₀ ~ N(mean, data_var·I) and x = α x₀ + σ ε (independent of the library)."""
    a = 1.0 if kind == "ve" else 1.0 - sigma
    return mean + a * data_var / (a * a * data_var + sigma * sigma) * (x - a * mean)


def gaussian_log_density(x, mean, var):
    flat, mean = x.reshape(x.shape[0], -1), mean.reshape(1, -1)
    return -0.5 * ((flat - mean) ** 2).sum(1) / var - 0.5 * flat.shape[1] * math.log(2 * math.pi * var)


def run_toy(kind, sigmas, means, settings, samples=2000, seed=0, data_var=1.0):
    """Sample the toy with SuperDiff; returns (x_start, x_end, log-density trace (steps+1, B, N), κ trace)."""
    generator = torch.Generator().manual_seed(seed)
    a0 = sd.alpha(kind, float(sigmas[0]))
    x = torch.randn(samples, D, generator=generator) * math.sqrt(float(sigmas[0]) ** 2 + a0 * a0 * data_var)
    start = x.clone()
    log_density = torch.zeros(samples, len(means), dtype=torch.float64)
    bias = settings.bias_for(len(means))
    offsets = sd.and_step_offsets(bias, len(sigmas) - 1) if settings.mode == "AND" else None
    trace, kappas = [log_density], []
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        coefficients = sd.step_coefficients(kind, sigma, sigma_next)
        denoised = torch.stack([gaussian_denoised(x, m, sigma, kind, data_var) for m in means])
        scores = sd.score_from_denoised(x, denoised, sigma, kind)
        noise = torch.randn(x.shape, generator=generator)
        result = sd.superdiff_step(x, scores, scores, noise, log_density, coefficients, settings, bias, offsets)
        x, log_density = result.x, result.log_density
        trace.append(log_density)
        kappas.append(result.kappa)
    return start, x, torch.stack(trace), torch.stack(kappas)


def ve_sigmas(steps, high=14.6146, low=0.0292):
    return torch.cat([torch.exp(torch.linspace(math.log(high), math.log(low), steps)), torch.zeros(1)])


def estimator_error(kind, sigmas, start, end, log_density, means, data_var=1.0):
    """Estimated minus exact change of log q^i from the start to the end of the run, per sample and component."""
    a0, s0 = sd.alpha(kind, float(sigmas[0])), float(sigmas[0])
    exact = torch.stack(
        [
            gaussian_log_density(end, m, data_var) - gaussian_log_density(start, a0 * m, s0 * s0 + a0 * a0 * data_var)
            for m in means
        ],
        1,
    )
    return log_density[-1] - exact.double()


MEANS = [torch.full((D,), 1.0), torch.full((D,), -1.0)]  # 8 data std apart: well separated


# -- the SDE and the estimator ---------------------------------------------------------------------------


def test_step_coefficients_follow_prop_2():
    """a = d log α/dσ and g² = 2σ²(d log σ/dσ − a), checked against finite differences of α(σ)."""
    for kind, sigma in (("ve", 3.0), ("flow", 0.7), ("flow", 0.995)):
        c = sd.step_coefficients(kind, sigma, sigma * 0.9)
        h = 1e-6
        rate = (math.log(sd.alpha(kind, sigma + h)) - math.log(sd.alpha(kind, sigma - h))) / (2 * h)
        assert c.log_alpha_rate == pytest.approx(rate, rel=1e-5, abs=1e-9)
        assert c.g2 == pytest.approx(2 * sigma * sigma * (1 / sigma - rate), rel=1e-6)
        assert c.delta == pytest.approx(sigma * 0.1) and math.isfinite(c.noise_std)
    assert sd.step_coefficients("ve", 2.0, 1.0).g2 == pytest.approx(4.0)  # VE: g² = 2σ


def test_invalid_steps_are_refused():
    with pytest.raises(ValueError, match="reverse SDE"):
        sd.step_coefficients("ve", 1.0, 1.0, noise=False)
    with pytest.raises(ValueError, match="σ must decrease"):
        sd.step_coefficients("ve", 1.0, 2.0)
    with pytest.raises(ValueError, match="≥ 1"):
        sd.step_coefficients("flow", 1.0, 0.9)
    with pytest.raises(ValueError, match="parameterisation"):
        sd.step_coefficients("edm", 1.0, 0.5)


def test_an_ode_step_without_noise_is_refused_by_the_estimator():
    x = torch.zeros(2, D)
    scores = torch.zeros(1, 2, D)
    c = sd.step_coefficients("ve", 1.0, 0.5)
    with pytest.raises(ValueError, match="ODE"):
        sd.superdiff_step(x, scores, scores, None, torch.zeros(2, 1), c, sd.SuperDiffSettings(), (0.0,))


@pytest.mark.parametrize("kind", sd.KINDS)
def test_score_from_denoised_is_minus_epsilon_over_sigma(kind):
    g = torch.Generator().manual_seed(1)
    x0, eps, sigma = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g), 0.6
    x = sd.alpha(kind, sigma) * x0 + sigma * eps
    score = sd.score_from_denoised(x, x0, sigma, kind)
    assert torch.allclose(score, -eps / sigma, atol=1e-5)
    assert torch.allclose(sd.denoised_from_score(x, score, sigma, kind), x0, atol=1e-5)


def test_ve_update_is_the_authors_and_branch_form():
    """VE: Δlog q = −⟨dx, ε⟩/σ − |Δσ|·‖ε‖²/σ (Thm. 1; the reference AND branch), per component."""
    g = torch.Generator().manual_seed(2)
    sigma, sigma_next = 2.0, 1.7
    x = torch.randn(4, D, generator=g)
    eps = torch.randn(2, 4, D, generator=g)
    scores = -eps / sigma
    noise = torch.randn(4, D, generator=g)
    kappa = torch.tensor([[0.3, 0.7]] * 4, dtype=torch.float64)
    c = sd.step_coefficients("ve", sigma, sigma_next)
    system = sd.density_system(scores, scores, noise, c)
    dx = sd.reverse_sde_step(x, sd.mix(kappa, scores), noise, c) - x
    delta = sigma - sigma_next
    expected = torch.stack([-(dx * eps[i]).sum(1) / sigma - delta * (eps[i] ** 2).sum(1) / sigma for i in range(2)], 1)
    assert torch.allclose(system.increments(kappa), expected.double(), rtol=1e-5, atol=1e-4)
    assert math.sqrt(2 * sigma * delta) == pytest.approx(c.noise_std)  # the reference noise √(2|Δσ|σ)


def test_flow_update_is_thm_1_with_the_general_alpha_sigma_terms():
    """Flow: Δlog q^i = ⟨x'−x, s_i⟩ + Δ[D·a + ⟨a·x − g²/2·s_i, s_i⟩], computed directly from the step."""
    g = torch.Generator().manual_seed(3)
    c = sd.step_coefficients("flow", 0.8, 0.75)
    x = torch.randn(5, D, generator=g)
    scores, guided = torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g)
    noise = torch.randn(5, D, generator=g)
    kappa = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), -1)
    dx = (sd.reverse_sde_step(x, sd.mix(kappa, guided), noise, c) - x).double()
    s, xd = scores.double(), x.double()
    direct = torch.stack(
        [
            (dx * s[i]).sum(1)
            + c.delta * (D * c.log_alpha_rate + ((c.log_alpha_rate * xd - c.g2 / 2 * s[i]) * s[i]).sum(1))
            for i in range(3)
        ],
        1,
    )
    increments = sd.density_system(scores, guided, noise, c).increments(kappa)
    assert torch.allclose(increments, direct, rtol=1e-5, atol=1e-3)


def test_density_system_is_every_inner_product_of_the_step_in_float64():
    """The one batched product gives A_ij = g²Δ⟨s_i, ŝ_j⟩ and b_i = √(g²Δ)⟨z, s_i⟩ + Δ(D·a − g²/2·‖s_i‖²)."""
    g = torch.Generator().manual_seed(11)
    c = sd.step_coefficients("flow", 0.6, 0.55)
    scores, guided = torch.randn(3, 4, 2, D, generator=g), torch.randn(3, 4, 2, D, generator=g)
    noise = torch.randn(4, 2, D, generator=g)
    s, t, z = scores.double().flatten(2), guided.double().flatten(2), noise.double().flatten(1)
    cross = torch.stack([torch.stack([(s[i] * t[j]).sum(-1) for j in range(3)], -1) for i in range(3)], 1)
    offset = torch.stack(
        [
            c.noise_std * (z * s[i]).sum(-1) + c.delta * (2 * D * c.log_alpha_rate - c.g2 / 2 * (s[i] ** 2).sum(-1))
            for i in range(3)
        ],
        -1,
    )
    system = sd.density_system(scores, guided, noise, c)
    assert torch.allclose(system.matrix, c.g2 * c.delta * cross, rtol=1e-12, atol=0)
    assert torch.allclose(system.offset, offset, rtol=1e-12, atol=1e-12)


def test_and_kappa_counts_singular_systems_on_the_device():
    g = torch.Generator().manual_seed(12)
    c = sd.step_coefficients("ve", 1.0, 0.9)
    one = torch.randn(1, 2, D, generator=g)
    system = sd.density_system(torch.cat([one, one]), torch.cat([one, one]), torch.randn(2, D, generator=g), c)
    _, invalid = sd.and_kappa(system)
    assert isinstance(invalid, torch.Tensor) and invalid.dim() == 0 and int(invalid) == 2  # read once per run


def test_ito_estimate_tracks_the_exact_log_density_of_a_gaussian():
    sigmas = ve_sigmas(256)
    start, end, log_density, _ = run_toy("ve", sigmas, MEANS[:1], sd.SuperDiffSettings())
    error = estimator_error("ve", sigmas, start, end, log_density, MEANS[:1])
    assert abs(error.mean().item()) < 1.0
    assert error.abs().median().item() < 1.5


def test_the_reference_or_sign_on_the_epsilon_term_is_badly_biased():
    """SuperDiff note 1 (docs/methods.md): +|Δσ|‖ε‖²/σ (the authors' OR branch) instead of Thm. 1's minus drifts
    by hundreds of nats."""
    sigmas = ve_sigmas(256)
    start, end, log_density, _ = run_toy("ve", sigmas, MEANS[:1], sd.SuperDiffSettings(), samples=500, seed=5)
    exact_error = estimator_error("ve", sigmas, start, end, log_density, MEANS[:1]).mean().item()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(500, D, generator=generator) * math.sqrt(float(sigmas[0]) ** 2 + 1.0)
    flipped = torch.zeros(500, dtype=torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        eps = (x - gaussian_denoised(x, MEANS[0], sigma, "ve")) / sigma
        noise = torch.randn(x.shape, generator=generator)
        dx = -2 * (sigma - sigma_next) * eps + math.sqrt(2 * sigma * (sigma - sigma_next)) * noise
        flipped += (-(dx * eps).sum(1) / sigma + (sigma - sigma_next) * (eps**2).sum(1) / sigma).double()
        x = x + dx
    assert abs(exact_error) < 1.0
    assert flipped.mean().item() - log_density[-1].mean().item() > 50.0


@pytest.mark.parametrize(("kind", "sigmas"), [("ve", ve_sigmas(200)), ("flow", torch.linspace(0.9, 0.0, 201))])
def test_or_with_temperature_1_and_log_weights_draws_the_mixture(kind, sigmas):
    weight = 0.3
    settings = sd.SuperDiffSettings(mode="OR", bias=(math.log(weight), math.log(1 - weight)))
    _, end, _, kappa = run_toy(kind, sigmas, MEANS, settings, samples=3000, seed=11)
    closer_to_first = ((end - MEANS[0]).norm(dim=1) < (end - MEANS[1]).norm(dim=1)).float().mean().item()
    assert closer_to_first == pytest.approx(weight, abs=0.03)
    assert torch.allclose(kappa[0], torch.tensor([weight, 1 - weight], dtype=torch.float64))  # κ₀ = softmax(bias)


@pytest.mark.parametrize("count", [2, 3])
def test_and_keeps_the_log_densities_equal_at_every_step(count):
    third = torch.zeros(D)
    third[:4] = 3.0  # not on the line through the other two means: collinear means make AND's system singular
    means = [MEANS[0], MEANS[1], third][:count]
    sigmas = ve_sigmas(100)
    _, end, log_density, kappa = run_toy("ve", sigmas, means, sd.SuperDiffSettings(mode="AND"), samples=200)
    spread = (log_density - log_density[..., :1]).abs().max().item()
    assert spread < 1e-6 * max(1.0, log_density.abs().max().item())
    assert torch.allclose(kappa.sum(-1), torch.ones_like(kappa[..., 0]))
    assert torch.isfinite(end).all()


def test_and_kappa_for_two_components_is_the_closed_form_root():
    """N = 2: the root of Δlog q¹ = Δlog q² from the affine map, κ₁ = (b₂ − b₁ + A₂₂ − A₁₂)/(A₁₁ − A₁₂ − A₂₁ + A₂₂)."""
    g = torch.Generator().manual_seed(4)
    c = sd.step_coefficients("ve", 3.0, 2.8)
    scores, guided = torch.randn(2, 6, D, generator=g), torch.randn(2, 6, D, generator=g)
    system = sd.density_system(scores, guided, torch.randn(6, D, generator=g), c)
    kappa, invalid = sd.and_kappa(system)
    A, b = system.matrix, system.offset
    closed = (b[:, 1] - b[:, 0] + A[:, 1, 1] - A[:, 0, 1]) / (A[:, 0, 0] - A[:, 0, 1] - A[:, 1, 0] + A[:, 1, 1])
    assert invalid == 0
    assert torch.allclose(kappa[:, 0], closed) and torch.allclose(kappa.sum(1), torch.ones(6, dtype=torch.float64))


def test_and_kappa_solves_the_bordered_system_for_three_components():
    g = torch.Generator().manual_seed(12)
    c = sd.step_coefficients("flow", 0.6, 0.55)
    scores, guided = torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g)
    system = sd.density_system(scores, guided, torch.randn(5, D, generator=g), c)
    offsets = (0.1, -0.2, 0.0)
    kappa, invalid = sd.and_kappa(system, offsets)
    full, rhs = sd.and_system(system, offsets)
    increments = system.increments(kappa) - torch.tensor(offsets, dtype=torch.float64)
    solution = torch.cat([kappa, increments[:, :1]], 1)
    assert invalid == 0
    assert torch.allclose(torch.einsum("bij,bj->bi", full, solution), rhs, atol=1e-8)
    assert torch.allclose(increments, increments[:, :1].expand(-1, 3), atol=1e-8)


def test_and_needs_the_noise_drawn_before_kappa():
    """κ solved with one noise draw but a step taken with another breaks the equal increments."""
    g = torch.Generator().manual_seed(8)
    c = sd.step_coefficients("ve", 2.0, 1.9)
    scores = torch.randn(2, 4, D, generator=g)
    drawn, other = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    kappa, _ = sd.and_kappa(sd.density_system(scores, scores, drawn, c))
    same = sd.density_system(scores, scores, drawn, c).increments(kappa)
    redrawn = sd.density_system(scores, scores, other, c).increments(kappa)
    assert torch.allclose(same[:, 0], same[:, 1])
    assert (redrawn[:, 0] - redrawn[:, 1]).abs().min() > 1e-3


def test_and_bias_offsets_the_final_log_densities():
    bias = (1.5, 0.0)
    sigmas = ve_sigmas(60)
    settings = sd.SuperDiffSettings(mode="AND", bias=bias)
    _, _, log_density, _ = run_toy("ve", sigmas, MEANS, settings, samples=50)
    gap = log_density[-1, :, 0] - log_density[-1, :, 1]
    assert torch.allclose(gap, torch.full_like(gap, 1.5), atol=1e-6)


# -- κ for OR, guards, numerics -----------------------------------------------------------------------


def test_or_kappa_is_the_papers_softmax_not_the_reference_codes():
    log_density = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    bias = (0.5, 0.0)
    paper = torch.softmax(3.0 * log_density + torch.tensor(bias, dtype=torch.float64), -1)
    code = torch.softmax(3.0 * (log_density + torch.tensor(bias, dtype=torch.float64)), -1)
    assert torch.allclose(sd.or_kappa(log_density, 3.0, bias), paper)
    assert not torch.allclose(paper, code)
    assert torch.allclose(sd.or_kappa(log_density, 1.0, bias), torch.softmax(log_density + 0.5 * torch.eye(2)[0], -1))
    assert torch.allclose(sd.or_kappa(log_density, 0.0, bias)[0], torch.softmax(torch.tensor(bias).double(), -1))


def test_or_kappa_is_stable_for_latent_sized_log_densities():
    log_density = torch.tensor([[-81234.5, -81236.5, -1.2e5]], dtype=torch.float64)
    kappa = sd.or_kappa(log_density, 1.0, (0.0, 0.0, 0.0))
    assert torch.isfinite(kappa).all()
    assert kappa[0, 0] / kappa[0, 1] == pytest.approx(math.exp(2.0))


def test_kappa_clamp_is_off_by_default_and_keeps_the_sum():
    kappa = torch.tensor([[35.0, -34.0], [0.2, 0.8], [3.0, -1.5], [0.5, 0.5]], dtype=torch.float64)
    assert torch.equal(sd.clamp_kappa(kappa, 0.0), kappa)
    clamped = sd.clamp_kappa(kappa, 1.0)
    assert torch.allclose(clamped[0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.equal(clamped[1], kappa[1]) and torch.equal(clamped[3], kappa[3])
    three = torch.tensor([[3.0, -1.5, -0.5]], dtype=torch.float64)
    limited = sd.clamp_kappa(three, 2.0)
    assert limited.max() <= 2.0 + 1e-12 and limited.min() >= -1.0 - 1e-12
    assert limited.sum().item() == pytest.approx(1.0)


def test_identical_components_fall_back_to_equal_weights_and_epsilon_keeps_kappa_finite():
    g = torch.Generator().manual_seed(6)
    c = sd.step_coefficients("ve", 1.0, 0.9)
    one = torch.randn(1, 3, D, generator=g)
    scores = torch.cat([one, one])
    system = sd.density_system(scores, scores, torch.randn(3, D, generator=g), c)
    kappa, invalid = sd.and_kappa(system)
    assert invalid == 3 and torch.allclose(kappa, torch.full_like(kappa, 0.5))
    nearly = torch.cat([one, one + 1e-4 * torch.randn(1, 3, D, generator=g)])
    near_system = sd.density_system(nearly, nearly, torch.randn(3, D, generator=g), c)
    raw, _ = sd.and_kappa(near_system)
    guarded, _ = sd.and_kappa(near_system, epsilon=0.01)
    assert raw.abs().max() > 10  # unbounded by default, as in the reference
    assert guarded.abs().max() < 1.0 and torch.allclose(guarded.sum(1), torch.ones(3, dtype=torch.float64))


def test_per_sample_scalars_use_float64_on_the_cpu():
    c = sd.step_coefficients("ve", 1.0, 0.9)
    scores = torch.randn(2, 3, D)
    system = sd.density_system(scores, scores, torch.randn(3, D), c)
    assert system.matrix.dtype == torch.float64 and system.offset.dtype == torch.float64


# -- schedules, settings, traces ----------------------------------------------------------------------


def test_flow_schedules_start_below_the_cap_and_ve_schedules_where_they_are():
    flow = torch.tensor([1.0, 0.999, 0.99, 0.5, 0.0])
    assert sd.start_schedule(flow, "flow", 0.995) == 2
    assert sd.start_schedule(torch.tensor([0.9, 0.5, 0.0]), "flow") == 0
    assert sd.start_schedule(torch.tensor([14.6, 1.0, 0.0]), "ve") == 0
    with pytest.raises(ValueError, match="no step below"):
        sd.start_schedule(torch.tensor([1.0, 0.0]), "flow")


def test_restart_flow_rescales_the_same_noise():
    g = torch.Generator().manual_seed(9)
    noise, latent = torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
    at_one = 1.0 * noise + 0.0 * latent
    assert torch.allclose(sd.restart_flow(at_one, latent, 1.0, 0.9), 0.9 * noise + 0.1 * latent, atol=1e-6)
    assert torch.allclose(sd.restart_flow(noise, None, 1.0, 0.9), 0.9 * noise)


def test_settings_and_bias_are_validated():
    assert sd.parse_bias("0, -1.2 3") == (0.0, -1.2, 3.0) and sd.parse_bias("  ") == ()
    with pytest.raises(ValueError, match="expected numbers"):
        sd.parse_bias("0, one")
    with pytest.raises(ValueError, match="2 components"):
        sd.SuperDiffSettings(bias=(0.0, 1.0, 2.0)).bias_for(2)
    assert sd.SuperDiffSettings().bias_for(3) == (0.0, 0.0, 0.0)
    for bad in ({"mode": "XOR"}, {"temperature": -1.0}, {"kappa_clamp": 0.5}, {"flow_sigma_max": 1.0}):
        with pytest.raises(ValueError):
            sd.SuperDiffSettings(**bad)


def test_noise_stream_is_seeded_and_differs_from_the_initial_noise():
    like = torch.zeros(2, D)
    first = sd.draw_noise(sd.noise_generator(42), like)
    assert torch.equal(first, sd.draw_noise(sd.noise_generator(42), like))
    assert not torch.equal(first, torch.randn(like.shape, generator=torch.Generator().manual_seed(42)))


def test_trace_plot_data_is_small_json():
    steps, batch, count = 300, 6, 3
    trace = sd.SuperDiffTrace(
        mode="AND",
        kind="ve",
        temperature=1.0,
        bias=(0.0,) * count,
        sigmas=torch.linspace(10, 0, steps + 1, dtype=torch.float64),
        kappa=torch.rand(steps, batch, count, dtype=torch.float64),
        log_density=torch.randn(steps + 1, batch, count, dtype=torch.float64) * 1e4,
    )
    data = json.loads(json.dumps(trace.plot_data(max_points=64)))
    assert len(data["kappa"]) == 4 and len(data["kappa"][0]) == 64 and len(data["kappa"][0][0]) == count
    assert data["density_steps"][0] == 0 and data["density_steps"][-1] == steps
    assert "3 components" in str(trace)
    a = torch.randn(1, 4, 8, 8)
    assert sd.latent_fingerprint(a) == sd.latent_fingerprint(a.clone()) != sd.latent_fingerprint(a + 1e-3)
