"""SuperDiff through real ComfyUI: exact-score Gaussian toys, tiny SD1.5 / Flux, batching, loading, errors, UI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy_extras import nodes_custom_sampler, nodes_model_advanced

from diffusion_merge.merging.sampling import superdiff as sd
from diffusion_merge.nodes import superdiff as sd_nodes
from diffusion_merge.nodes import superdiff_runtime as runtime

PACK_ROOT = Path(__file__).resolve().parents[2]
SEED = 42
TOY_DIMS = 16  # latent (B, 4, 2, 2)
TOY_DATA_VAR = 1.0
TOY_MEANS = (1.0, -1.0)  # component means (every coordinate): 8 data std apart


# -- a test-only model whose denoiser is exact for Gaussian data ------------------------------------------


def exact_gaussian_denoiser(executor, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):
    """APPLY_MODEL wrapper replacing the network: E[x₀ | x] for x₀ ~ N(μ, I), μ read from the conditioning."""
    flow = isinstance(executor.class_obj.model_sampling, comfy.model_sampling.CONST)
    sigma = t.reshape(-1, *([1] * (x.ndim - 1)))
    a = 1.0 - sigma if flow else torch.ones_like(sigma)
    mean = c_crossattn[:, 0, :].reshape(x.shape)
    return mean + a * TOY_DATA_VAR / (a * a * TOY_DATA_VAR + sigma * sigma) * (x - a * mean)


@pytest.fixture
def gaussian_toy(tiny_sd15):
    """Factory: ``gaussian_toy(flow=False, shift=3.0)`` → a MODEL with exact scores (VE, or flow with that shift)."""

    def make(flow=False, shift=3.0):
        model = tiny_sd15(0)
        model.add_object_patch("latent_format", comfy.latent_formats.LatentFormat())  # no latent scaling
        model.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.gaussian", exact_gaussian_denoiser
        )
        return nodes_model_advanced.ModelSamplingSD3().patch(model, shift)[0] if flow else model

    return make


def toy_prompt(mean: float):
    return [[torch.full((1, 1, TOY_DIMS), mean), {}]]


def log_gaussian(x, mean, var):
    flat = x.reshape(x.shape[0], -1).double()
    return -0.5 * ((flat - mean) ** 2).sum(1) / var - 0.5 * flat.shape[1] * math.log(2 * math.pi * var)


def sample_toy(model, settings, samples, steps, scheduler):
    """SuperDiff over the toy's two components; returns (start x, end x, trace, guider)."""
    components = tuple(runtime.Component(model, toy_prompt(m)) for m in TOY_MEANS)
    guider = runtime.SuperDiffGuider(components)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    latent = torch.zeros(samples, 4, 2, 2)
    starts = []
    callback = lambda i, denoised, x, total: starts.append(x.clone()) if not starts else None  # noqa: E731
    noise = comfy.sample.prepare_noise(latent, SEED)
    end = guider.sample(noise, latent, runtime.SuperDiffSampler(settings), sigmas, callback=callback, seed=SEED)
    return starts[0], end, guider.last_trace, guider


def estimator_errors(start, end, trace, flow):
    """Estimated minus exact change of log q^i over the run (from the σ the run started at), per sample."""
    sigma = float(trace.sigmas[0])
    a = 1.0 - sigma if flow else 1.0
    exact = torch.stack(
        [
            log_gaussian(end, m, TOY_DATA_VAR) - log_gaussian(start, a * m, sigma**2 + a * a * TOY_DATA_VAR)
            for m in TOY_MEANS
        ],
        1,
    )
    return trace.log_density[-1] - exact


def fraction_near_first(end):
    flat = end.reshape(end.shape[0], -1)
    return ((flat - TOY_MEANS[0]).norm(dim=1) < (flat - TOY_MEANS[1]).norm(dim=1)).float().mean().item()


OR_WEIGHT = 0.3
OR_SETTINGS = {"mode": "OR", "temperature": 1.0, "bias": (math.log(OR_WEIGHT), math.log(1 - OR_WEIGHT))}
TOY_CASES = {  # (flow, settings, steps, scheduler)
    "ve": (False, {}, 300, "normal"),
    # flow needs fine steps near σ = 1 for ABSOLUTE log-densities: SD3's shift 3 and a cap of 0.98
    "flow": (True, {"flow_sigma_max": 0.98}, 400, "simple"),
}


# -- acceptance: Gaussian toys with exact scores ---------------------------------------------------------


@pytest.mark.parametrize("case", TOY_CASES)
def test_or_toy_draws_the_mixture_and_tracks_exact_log_densities(gaussian_toy, case):
    flow, extra, steps, scheduler = TOY_CASES[case]
    model = gaussian_toy(flow)
    start, end, trace, _ = sample_toy(model, sd.SuperDiffSettings(**OR_SETTINGS, **extra), 2000, steps, scheduler)
    assert trace.steps >= 200 and torch.isfinite(end).all()
    assert fraction_near_first(end) == pytest.approx(OR_WEIGHT, abs=0.03)
    errors = estimator_errors(start, end, trace, flow)
    assert errors.mean(0).abs().max().item() < 1.0  # within 1 nat of the exact log q, for both components
    assert torch.allclose(trace.kappa[0, 0], torch.tensor([OR_WEIGHT, 1 - OR_WEIGHT], dtype=torch.float64))


@pytest.mark.parametrize("case", TOY_CASES)
def test_and_toy_keeps_both_log_densities_equal_at_every_step(gaussian_toy, case):
    flow, extra, _, scheduler = TOY_CASES[case]
    _, end, trace, _ = sample_toy(gaussian_toy(flow), sd.SuperDiffSettings(mode="AND", **extra), 64, 200, scheduler)
    gap = (trace.log_density[..., 0] - trace.log_density[..., 1]).abs()
    assert gap.max().item() < 1e-6 * max(1.0, trace.log_density.abs().max().item())
    assert trace.kappa.abs().max() > 1.0  # unbounded by default, as in the reference
    assert torch.isfinite(end).all() and fraction_near_first(end) not in (0.0, 1.0)


@pytest.mark.parametrize("steps", [20, 200])
def test_flow_toy_starting_at_sigma_one_has_no_nan(gaussian_toy, steps):
    model = gaussian_toy(flow=True, shift=1.0)
    assert float(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)[0]) == 1.0
    for mode in sd.MODES:
        _, end, trace, _ = sample_toy(model, sd.SuperDiffSettings(mode=mode), 64, steps, "simple")
        assert torch.isfinite(end).all() and torch.isfinite(trace.log_density).all()
        assert torch.isfinite(trace.kappa).all() and float(trace.sigmas[0]) < sd.DEFAULT_FLOW_SIGMA_MAX


# -- tiny SD1.5 and tiny Flux -----------------------------------------------------------------------------


def cond(seed, width=64):
    return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed)), {}]]


def flux_cond(seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]


def chain(*components):
    result = None
    for model, positive, negative, cfg in components:
        result = sd_nodes.SuperDiffComponentNode.execute(model, positive, result, negative, cfg).result[0]
    return result


def all_in_one(components, mode="OR", latent=None, seed=SEED, steps=8, scheduler="normal", **settings):
    latent = latent or {"samples": torch.zeros(1, 4, 8, 8)}
    kwargs = dict(bias="", kappa_clamp=0.0, and_epsilon=0.0, flow_sigma_max=0.995) | settings
    out = sd_nodes.SuperDiffKSamplerNode.execute(components, latent, seed, steps, scheduler, 1.0, mode, 1.0, **kwargs)
    return out.result[0]["samples"], out.result[1], out.ui


def sd_components(tiny_sd15, count):
    a, b = tiny_sd15(0), tiny_sd15(1)
    negative = cond(9)
    parts = [(a, cond(1), negative, 5.0), (a, cond(2), negative, 5.0), (b, cond(3), negative, 3.0)]
    return chain(*parts[:count])


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("mode", sd.MODES)
def test_tiny_sd15_is_deterministic_and_finite(tiny_sd15, count, mode):
    components = sd_components(tiny_sd15, count)
    first, trace, ui = all_in_one(components, mode)
    second, _, _ = all_in_one(components, mode)
    other_seed, _, _ = all_in_one(components, mode, seed=SEED + 1)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert not torch.equal(first, other_seed)
    assert trace.kappa.shape == (8, 1, count) and trace.log_density.shape == (9, 1, count)
    assert ui["superdiff_trace"][0]["components"] == count


@pytest.mark.parametrize("mode", sd.MODES)
def test_cfg_of_all_components_at_once_equals_comfyuis_cfg_function_per_component(tiny_sd15, mode):
    """Plain CFG is computed for every component together; a post-CFG function forces ComfyUI's own path."""
    components = sd_components(tiny_sd15, 3)  # two models, scales 5 and 3, one shared negative
    together, _, _ = all_in_one(components, mode)
    identity = {id(c.model): c.model.clone() for c in components}  # one clone per model: the same batches
    for model in identity.values():
        model.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    per_component = tuple(runtime.Component(identity[id(c.model)], c.positive, c.negative, c.cfg) for c in components)
    one_by_one, _, _ = all_in_one(per_component, mode)
    assert torch.equal(together, one_by_one)


@pytest.mark.parametrize("count", [2, 3])
def test_tiny_flux_is_deterministic_and_finite_from_sigma_one(tiny_flux, count):
    a, b = tiny_flux(0), tiny_flux(1)
    parts = [(a, flux_cond(1), None, 1.0), (b, flux_cond(2), None, 1.0), (a, flux_cond(3), None, 1.0)]
    components = chain(*parts[:count])
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    for mode in sd.MODES:
        first, trace, _ = all_in_one(components, mode, latent=latent, scheduler="simple")
        second, _, _ = all_in_one(components, mode, latent=latent, scheduler="simple")
        assert torch.isfinite(first).all() and torch.equal(first, second)
        assert float(trace.sigmas[0]) < sd.DEFAULT_FLOW_SIGMA_MAX and trace.kappa.shape[-1] == count


def test_each_component_keeps_its_own_prompt_when_models_interleave(tiny_sd15):
    a, b = tiny_sd15(0), tiny_sd15(1)
    negative = cond(9)
    prompts = [cond(i) for i in range(1, 5)]
    models = [a, b, a, b]
    guider = runtime.SuperDiffGuider(chain(*[(m, p, negative, 5.0) for m, p in zip(models, prompts, strict=True)]))
    positive_names = [positive for positive, _ in guider.names]
    assert len(set(positive_names)) == 4 and len({negative for _, negative in guider.names}) == 2  # one per model
    for name, prompt in zip(positive_names, prompts, strict=True):
        assert torch.equal(guider.original_conds[name][0]["cross_attn"], prompt[0][0])
    assert [group.members for group in guider.groups] == [[0, 2], [1, 3]]


# -- ComfyUI plumbing: batching, loading, callbacks, the modular path ---------------------------------------


class CallSpy:
    """Counts calc_cond_batch calls (and their conds) and network forwards (and their batch sizes)."""

    def __init__(self, monkeypatch, *models):
        self.batches, self.forwards = [], []
        original = comfy.samplers.calc_cond_batch

        def spy(model, conds, *args, **kwargs):
            self.batches.append(len(conds))
            return original(model, conds, *args, **kwargs)

        monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy)
        for name, model in enumerate(models):
            model.model.diffusion_model.register_forward_pre_hook(
                lambda module, args, name=name: self.forwards.append((name, args[0].shape[0]))
            )


def test_all_evaluations_of_one_model_in_a_step_are_one_batched_call(tiny_sd15, monkeypatch):
    model = tiny_sd15(0)
    negative = cond(9)
    components = chain(*[(model, cond(i), negative, 5.0) for i in (1, 2, 3)])  # 3 prompts + 1 shared negative
    spy = CallSpy(monkeypatch, model)
    all_in_one(components, steps=5)
    assert spy.batches == [4] * 5  # one call per step with the 4 distinct conditionings
    assert spy.forwards == [(0, 4)] * 5  # …and one network forward of batch 4


def test_every_model_is_loaded_before_sampling_and_pre_run(tiny_sd15, monkeypatch):
    a, b = tiny_sd15(0), tiny_sd15(1)
    components = chain((a, cond(1), None, 1.0), (b, cond(2), None, 1.0))
    loads, pre_runs = [], []
    original = mm.load_models_gpu

    def load(models, *args, **kwargs):
        loads.append(list(models))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", load)
    b.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, "test", pre_runs.append)
    spy = CallSpy(monkeypatch, a, b)
    all_in_one(components, steps=4)
    assert len(loads) == 1 and {id(m.model) for m in loads[0]} == {id(a.model), id(b.model)}
    assert pre_runs == [b]
    assert spy.batches == [1, 1] * 4 and [name for name, _ in spy.forwards] == [0, 1] * 4


def test_callback_reports_every_step_and_cancel_stops_the_run(tiny_sd15):
    components = sd_components(tiny_sd15, 2)
    guider = runtime.SuperDiffGuider(components)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", 6)
    latent = torch.zeros(1, 4, 8, 8)
    calls = []
    sampler = runtime.SuperDiffSampler(sd.SuperDiffSettings())
    guider.sample(latent.clone(), latent, sampler, sigmas, callback=lambda *a: calls.append(a), seed=SEED)
    assert [c[0] for c in calls] == list(range(6)) and all(c[3] == 6 and torch.isfinite(c[1]).all() for c in calls)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            guider.sample(latent.clone(), latent, sampler, sigmas, seed=SEED)
    finally:
        mm.interrupt_current_processing(False)


def test_sampler_custom_advanced_path_equals_the_all_in_one_and_finds_its_trace(tiny_sd15):
    components = sd_components(tiny_sd15, 2)
    guider = sd_nodes.SuperDiffGuiderNode.execute(components).result[0]
    sampler = sd_nodes.SuperDiffSamplerNode.execute("AND", 1.0, "0.5, 0", 0.0, 0.0, 0.995).result[0]
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", 8)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    noise = nodes_custom_sampler.Noise_RandomNoise(SEED)
    output, _ = nodes_custom_sampler.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    expected, expected_trace, _ = all_in_one(components, "AND", bias="0.5, 0")
    assert torch.equal(output["samples"], expected)
    result = sd_nodes.SuperDiffTraceNode.execute(guider, output)
    assert torch.equal(result.result[0].kappa, expected_trace.kappa)
    assert result.ui["superdiff_trace"][0]["mode"] == "AND"
    with pytest.raises(ValueError, match="not sampled with this SuperDiff guider"):
        sd_nodes.SuperDiffTraceNode.execute(guider, {"samples": output["samples"] + 1})


# -- bad input --------------------------------------------------------------------------------------------


def test_an_ode_sampler_with_the_superdiff_guider_is_refused_before_any_network_call(tiny_sd15, monkeypatch):
    model = tiny_sd15(0)
    guider = runtime.SuperDiffGuider(chain((model, cond(1), None, 1.0), (model, cond(2), None, 1.0)))
    spy = CallSpy(monkeypatch, model)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"needs the SuperDiff Sampler.*'euler'.*reverse SDE"):
        guider.sample(latent, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=SEED)
    assert spy.forwards == []


def test_the_superdiff_sampler_with_another_guider_is_refused(tiny_sd15):
    model = tiny_sd15(0)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond(1), cond(2))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="needs the SuperDiff Guider"):
        guider.sample(latent, latent, runtime.SuperDiffSampler(sd.SuperDiffSettings()), sigmas, seed=SEED)


def test_components_of_different_latent_formats_are_refused(tiny_sd15, tiny_flux):
    with pytest.raises(ValueError, match="latent format"):
        sd_nodes.SuperDiffGuiderNode.execute(
            chain((tiny_sd15(0), cond(1), None, 1.0), (tiny_flux(0), flux_cond(2), None, 1.0))
        )


@pytest.mark.parametrize("components", [None, ()])
def test_empty_components_are_refused(components):
    with pytest.raises(ValueError, match="no components"):
        sd_nodes.SuperDiffGuiderNode.execute(components)


def test_cfg_without_a_negative_and_a_wrong_bias_count_are_refused(tiny_sd15):
    model = tiny_sd15(0)
    with pytest.raises(ValueError, match="cfg 5 but no negative"):
        sd_nodes.SuperDiffGuiderNode.execute(chain((model, cond(1), None, 5.0)))
    with pytest.raises(ValueError, match="bias has 3 value"):
        all_in_one(sd_components(tiny_sd15, 2), bias="0, 1, 2")


def test_a_failed_superdiff_prompt_leaves_the_executor_serving(run_prompt):
    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    def prompt(sampler):
        def text(words):
            return node("CLIPTextEncode", text=words, clip=["1", 1])

        return {
            "1": node("DM_DemoCheckpointLoader", variant="base", seed=0),
            "2": text("a flamingo"),
            "3": text("a candy cane"),
            "4": text(""),
            "5": node("DM_SuperDiffComponent", model=["1", 0], positive=["2", 0], negative=["4", 0], cfg=7.5),
            "6": node(
                "DM_SuperDiffComponent",
                model=["1", 0],
                positive=["3", 0],
                negative=["4", 0],
                components=["5", 0],
                cfg=7.5,
            ),
            "7": node("DM_SuperDiffGuider", components=["6", 0]),
            "8": sampler,
            "9": node("RandomNoise", noise_seed=1),
            "10": node("BasicScheduler", model=["1", 0], scheduler="normal", steps=5, denoise=1.0),
            "11": node("EmptyLatentImage", width=64, height=64, batch_size=1),
            "12": node(
                "SamplerCustomAdvanced",
                noise=["9", 0],
                guider=["7", 0],
                sampler=["8", 0],
                sigmas=["10", 0],
                latent_image=["11", 0],
            ),
            "13": node("DM_SuperDiffTrace", guider=["7", 0], latent=["12", 0]),
        }

    with pytest.raises(AssertionError, match="needs the SuperDiff Sampler"):
        run_prompt(prompt(node("KSamplerSelect", sampler_name="euler")))
    outputs = run_prompt(prompt(node("DM_SuperDiffSampler", mode="AND", temperature=1.0, bias="")))
    plot = outputs["13"]["superdiff_trace"][0]
    assert plot["mode"] == "AND" and plot["steps"] == 5 and len(plot["kappa"][0]) == 5


# -- the node's plot (plain Node.js with stand-ins for the frontend) ------------------------------------------

JS_HARNESS = r"""
await import("./extensions/pack/js/superdiff.js");
const calls = [];
const record = (k) => () => calls.push(k);
const ctx = new Proxy({}, { get: (t, k) => (k in t ? t[k] : record(k)), set: (t, k, v) => ((t[k] = v), true) });
class KSampler {}
Object.assign(KSampler.prototype, {
  computeSize() { return [300, 200]; },
  setSize(size) { this.size = size; },
  setDirtyCanvas() {},
});
globalThis.extension.beforeRegisterNodeDef(KSampler, { name: "DM_SuperDiffKSampler" });
const node = Object.assign(new KSampler(), { size: [300, 200], widgets: [{ name: "seed", value: 1 }], flags: {} });
const before = JSON.stringify(node.widgets);
node.onDrawForeground(ctx);
const idle = calls.length;
node.onExecuted({ superdiff_trace: [PLOT] });
node.onDrawForeground(ctx);
console.log(JSON.stringify({ idle, drawn: calls.length - idle, widgets: JSON.stringify(node.widgets) === before,
  height: node.size[1], strokes: calls.filter((c) => c === "stroke").length }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_trace_plot_is_drawn_without_touching_the_widgets(run_web_extension):
    trace = sd.SuperDiffTrace(
        mode="OR",
        kind="ve",
        temperature=1.0,
        bias=(0.0, 0.0),
        sigmas=torch.linspace(14.6, 0, 11, dtype=torch.float64),
        kappa=torch.rand(10, 2, 2, dtype=torch.float64),
        log_density=torch.randn(11, 2, 2, dtype=torch.float64),
    )
    result = run_web_extension("superdiff.js", JS_HARNESS.replace("PLOT", json.dumps(trace.plot_data())))
    assert result["idle"] == 0 and result["drawn"] > 0 and result["strokes"] >= 4
    assert result["widgets"] and result["height"] > 200
