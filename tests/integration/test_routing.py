"""σ-range routing through real ComfyUI: routed MODEL and GUIDER against split sampling and reference loops."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
import types
import urllib.parse
from pathlib import Path

import comfy.model_management as mm
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.supported_models
import pytest
import torch
from comfy_extras import nodes_model_advanced

import nodes
from diffusion_merge.merging.sampling.schedules import Boundary
from diffusion_merge.nodes import common, routing, routing_runtime, routing_server, routing_weights
from diffusion_merge.nodes import task_vectors as tv_nodes

PACK_ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
SEED = 42
SD_LATENT = {"samples": torch.zeros(1, 4, 8, 8)}
FLUX_LATENT = {"samples": torch.zeros(1, 16, 8, 8)}


# -- helpers ------------------------------------------------------------------------------------------


def cond(seed: int, width: int = 64, **extra):
    return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed)), dict(extra)]]


POSITIVE, NEGATIVE, OTHER_POSITIVE = cond(1), cond(2), cond(3)


def flux_cond(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]


def expert(model, end, unit="sigma", cfg=0.0, experts=None, positive=None):
    return routing.RouteExpertNode.execute(model, end, unit, cfg, experts, positive).result[0]


def routed_model(experts, memory_mode="resident"):
    return routing.RoutedModelNode.execute(experts, memory_mode).result[0]


def two_experts(a, b, boundary, unit="sigma", memory_mode="resident"):
    return routed_model(expert(b, 0.0, experts=expert(a, boundary, unit)), memory_mode)


def sigmas_of(model, steps=STEPS, scheduler="normal"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


def ksample(
    model, sampler="euler", cfg=5.0, latent=SD_LATENT, positive=POSITIVE, negative=NEGATIVE, scheduler="normal"
):
    """The stock KSampler node's path: one sampler call over the whole schedule."""
    return nodes.common_ksampler(model, SEED, STEPS, cfg, sampler, scheduler, positive, negative, latent)[0]["samples"]


def split_sample(
    first,
    second,
    step,
    sampler="euler",
    cfgs=(5.0, 5.0),
    positives=(POSITIVE, POSITIVE),
    negative=NEGATIVE,
    latent=SD_LATENT,
    scheduler="normal",
):
    """The two-KSamplerAdvanced recipe: first until ``step`` with leftover noise, second from there, no new noise."""
    advanced = nodes.KSamplerAdvanced()
    common = (SEED, STEPS)
    high = advanced.sample(
        first, "enable", *common, cfgs[0], sampler, scheduler, positives[0], negative, latent, 0, step, "enable"
    )[0]
    low = advanced.sample(
        second, "disable", *common, cfgs[1], sampler, scheduler, positives[1], negative, high, step, 10000, "disable"
    )[0]
    return low["samples"]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


class Denoiser:
    """D(x, σ) of one MODEL with CFG, set up the way a sampler call sets it up, for hand-written loops."""

    def __init__(self, model, cfg, noise, latent, positive=POSITIVE, negative=NEGATIVE):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        conds = {name: [c.copy() for c in items] for name, items in guider.original_conds.items()}
        guider.inner_model, conds, _ = comfy.sampler_helpers.prepare_sampling(model, noise.shape, conds, {})
        model.pre_run()
        guider.conds = comfy.samplers.process_conds(guider.inner_model, noise, conds, "cpu", latent, None, SEED)
        self.guider = guider

    def __call__(self, x, sigma):
        timestep = sigma.reshape(1).expand(x.shape[0])
        return self.guider.predict_noise(x, timestep, {"transformer_options": {}}, SEED)


def dpmpp_2m_reference(denoise, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, in σ form) keeping ONE history over the whole schedule."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            correction = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                correction = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * correction
        old_denoised = denoised
    return x


@pytest.fixture
def sd_pair(tiny_sd15):
    """Two separately built tiny SD1.5 UNets (different modules, different weights)."""
    return tiny_sd15(0, "base"), tiny_sd15(1, "base")


class LoadSpy:
    """Records ``load_models_gpu`` calls and network forwards, in order, by expert name."""

    def __init__(self, monkeypatch, named):
        self.events: list[tuple[str, frozenset]] = []
        self.names = {id(model.model): name for name, model in named.items()}
        original = mm.load_models_gpu

        def spy(models, *args, **kwargs):
            loaded = frozenset(self.names.get(id(m.model), "?") for m in models if hasattr(m, "model"))
            self.events.append(("load", loaded))
            return original(models, *args, **kwargs)

        monkeypatch.setattr(mm, "load_models_gpu", spy)
        for name, model in named.items():
            model.model.diffusion_model.register_forward_pre_hook(self._forward_hook(name))

    def _forward_hook(self, name):
        def hook(module, args):
            if not self.events or self.events[-1] != ("forward", frozenset([name])):
                self.events.append(("forward", frozenset([name])))

        return hook

    def loads_after_first_forward(self) -> list[frozenset]:
        first = next(i for i, (kind, _) in enumerate(self.events) if kind == "forward")
        return [names for kind, names in self.events[first:] if kind == "load"]

    def forwards(self) -> list[str]:
        return [next(iter(names)) for kind, names in self.events if kind == "forward"]


def tiny_sdxl(seed: int, refiner: bool = False):
    """A tiny SDXL base (or refiner) UNet: the same latent space, a different model class and ``y``."""
    from diffusion_merge.nodes import demo_models

    config = dict(demo_models.SD15_TINY, model_channels=64, num_classes="sequential", use_linear_in_transformer=True)
    family = comfy.supported_models.SDXLRefiner if refiner else comfy.supported_models.SDXL
    model_config = family({**config, "adm_in_channels": 2560 if refiner else 2816})
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    demo_models.init_weights(base_model.diffusion_model, seed)
    return demo_models._patcher(base_model)


def v_prediction(model):
    return nodes_model_advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]


# -- equivalence with split sampling ----------------------------------------------------------------


def test_routed_euler_equals_two_ksampler_advanced_split(sd_pair):
    a, b = sd_pair
    boundary_step = 3
    boundary = float(sigmas_of(a)[boundary_step])  # a boundary on a schedule σ: that step is the next expert's
    routed = two_experts(a, b, boundary)
    assert max_diff(ksample(routed), split_sample(a, b, boundary_step)) <= 1e-4
    assert max_diff(ksample(routed), ksample(a)) > 1e-2 and max_diff(ksample(routed), ksample(b)) > 1e-2


def test_routed_model_reports_the_first_experts_model_sampling(sd_pair):
    a, b = sd_pair
    routed = two_experts(a, b, 1.0)
    assert routed.get_model_object("model_sampling") is a.get_model_object("model_sampling")
    assert routed.is_clone(a) and routed is not a


def test_all_experts_the_same_model_equals_the_plain_model_exactly(tiny_sd15):
    model = tiny_sd15(0, "base")
    chain = expert(model, 0.0, experts=expert(model, 0.5, "percent", experts=expert(model, 3.0)))
    assert torch.equal(ksample(routed_model(chain)), ksample(model))


def test_clone_experts_share_one_module_and_route_correctly(tiny_sd15):
    """base vs base + τ share their modules (is_clone): the second expert is swapped in at its boundary."""
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-b")
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    plain_before = ksample(base)
    experts = expert(base, float(sigmas_of(base)[2]))
    experts = routing.RouteTaskVectorExpertNode.execute(base, vector, 1.0, 0.0, "sigma", 0.0, experts).result[0]
    assert experts[1].model.is_clone(base)
    routed = routed_model(experts)
    patched = tv_nodes.TaskVectorApplyNode.execute(base, vector, 1.0).result[0]
    assert max_diff(ksample(routed), split_sample(base, patched, 2)) <= 1e-4
    assert max_diff(ksample(routed), plain_before) > 1e-3  # the naive router would give the base only
    assert torch.equal(ksample(base), plain_before)  # the shared module is re-patched for the base afterwards


def test_dpmpp_2m_routed_run_is_one_continuous_solve(sd_pair):
    a, b = sd_pair
    boundary_step = 3
    sigmas = sigmas_of(a)
    routed = two_experts(a, b, float(sigmas[boundary_step]))
    routed_out = ksample(routed, "dpmpp_2m")

    latent = SD_LATENT["samples"]
    noise = comfy.sample.prepare_noise(latent, SEED)
    high, low = Denoiser(a, 5.0, noise, latent), Denoiser(b, 5.0, noise, latent)
    boundary = sigmas[boundary_step]

    def denoise(x, sigma):
        return high(x, sigma) if sigma > boundary else low(x, sigma)

    sampling = a.get_model_object("model_sampling")
    x = sampling.noise_scaling(sigmas[0], noise, latent, max_denoise=True)
    reference = a.model.process_latent_out(
        sampling.inverse_noise_scaling(sigmas[-1], dpmpp_2m_reference(denoise, x, sigmas))
    )
    assert max_diff(routed_out, reference) <= 1e-4
    # the split recipe restarts the solver at the boundary (first-order step, history lost): measurably different
    assert max_diff(routed_out, split_sample(a, b, boundary_step, "dpmpp_2m")) > 1e-3


def test_boundaries_in_sigma_percent_and_timestep_route_identically(sd_pair):
    a, b = sd_pair
    scale = common.sigma_scale(a.get_model_object("model_sampling"))
    percent = 0.42
    sigma = scale.to_sigma(Boundary(percent, "percent"))
    timestep = scale.timestep_from_sigma(sigma)
    sigmas = sigmas_of(a).tolist()
    assert min(abs(math.log(sigma / s)) for s in sigmas[:-1]) > 0.05  # not on a schedule σ: a real test of units
    outputs = [
        ksample(two_experts(a, b, value, unit))
        for value, unit in ((sigma, "sigma"), (percent, "percent"), (timestep, "timestep"))
    ]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    switch = next(i for i, s in enumerate(sigmas) if s <= sigma)
    assert max_diff(outputs[0], split_sample(a, b, switch)) <= 1e-4


# -- memory modes -----------------------------------------------------------------------------------


def test_resident_mode_loads_every_expert_before_sampling_and_none_mid_run(sd_pair, monkeypatch):
    a, b = sd_pair
    routed = two_experts(a, b, float(sigmas_of(a)[3]), memory_mode="resident")
    spy = LoadSpy(monkeypatch, {"A": a, "B": b})
    ksample(routed)
    assert spy.forwards() == ["A", "B"]
    first_load = next(names for kind, names in spy.events if kind == "load")
    assert first_load == {"A", "B"}
    assert spy.loads_after_first_forward() == []


def test_sequential_mode_loads_each_expert_once_per_run(sd_pair, monkeypatch):
    a, b = sd_pair
    routed = two_experts(a, b, float(sigmas_of(a)[3]), memory_mode="sequential")
    for _ in range(2):  # every run: A before sampling, B once at the boundary, A unloaded for it
        spy = LoadSpy(monkeypatch, {"A": a, "B": b})
        ksample(routed)
        loads = [names for kind, names in spy.events if kind == "load"]
        assert loads == [{"A"}, {"B"}]
        assert spy.forwards() == ["A", "B"]
        assert not any(
            loaded.model is not None and loaded.model.model is a.model for loaded in mm.current_loaded_models
        )


def clone_chain(base, vector):
    """Experts base, base, base + τ, base + 2τ over a quarter of sampling each."""
    chain = expert(base, 0.5, "percent", experts=expert(base, 0.25, "percent"))
    for strength, end in ((1.0, 0.75), (2.0, 1.0)):
        chain = routing.RouteTaskVectorExpertNode.execute(base, vector, strength, end, "percent", 0.0, chain).result[0]
    return chain


def test_clone_experts_swap_once_per_boundary_in_sequential_mode(tiny_sd15, monkeypatch):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    routed = routed_model(clone_chain(base, vector), "sequential")
    spy = LoadSpy(monkeypatch, {"base": base})
    ksample(routed)  # experts: base, base, base+τ, base+2τ → two swaps, one per change of weights
    assert len(spy.loads_after_first_forward()) == 2


def test_resident_clone_experts_keep_their_weights_and_never_reload(tiny_sd15, monkeypatch):
    """Resident mode keeps each clone expert's weights as a second set: computed once, swapped by reference."""
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    chain = clone_chain(base, vector)
    expected = ksample(routed_model(chain, "sequential"))  # through ComfyUI's own swaps
    routed = routed_model(chain)
    sets = routing_runtime.router_of(routed).weight_sets
    plain_before = ksample(base)
    for _ in range(2):
        spy = LoadSpy(monkeypatch, {"base": base})
        assert torch.equal(ksample(routed), expected)
        assert spy.loads_after_first_forward() == []
        assert sets.computed_weights == 2 * len(chain[2].model.patches)  # each τ key once per expert, first run
    assert torch.equal(ksample(base), plain_before)  # the base's own weights are back in its modules


def test_resident_clone_experts_fall_back_to_comfyui_swaps_without_room(tiny_sd15, monkeypatch):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    chain = clone_chain(base, vector)
    expected = ksample(routed_model(chain, "sequential"))
    routed = routed_model(chain)

    class NoFreeMemory:  # ComfyUI's memory management as seen by the weight sets, with nothing free
        def __getattr__(self, name):
            return getattr(mm, name)

        @staticmethod
        def get_free_memory(*args, **kwargs):
            return 0

    monkeypatch.setattr(routing_weights, "mm", NoFreeMemory())
    spy = LoadSpy(monkeypatch, {"base": base})
    assert torch.equal(ksample(routed), expected)
    assert len(spy.loads_after_first_forward()) == 2
    assert routing_runtime.router_of(routed).weight_sets.computed_weights == 0


def test_resident_weight_sets_are_dropped_when_comfyui_unloads_the_model(tiny_sd15, monkeypatch):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    routed = routed_model(clone_chain(base, vector))
    sets = routing_runtime.router_of(routed).weight_sets
    first = ksample(routed)
    computed = sets.computed_weights
    mm.unload_all_models()
    assert torch.equal(ksample(routed), first)
    assert sets.computed_weights == 2 * computed  # made again for the reloaded modules


# -- model families ---------------------------------------------------------------------------------


def test_v_prediction_experts_route_like_the_split(sd_pair):
    a, b = (v_prediction(m) for m in sd_pair)
    routed = two_experts(a, b, float(sigmas_of(a)[2]))
    assert max_diff(ksample(routed), split_sample(a, b, 2)) <= 1e-4


def test_flow_experts_route_like_the_split(tiny_flux):
    a, b = tiny_flux(0, "base"), tiny_flux(1, "base")
    routed = two_experts(a, b, float(sigmas_of(a, scheduler="simple")[3]))
    kw = dict(cfg=1.0, latent=FLUX_LATENT, positive=flux_cond(1), negative=flux_cond(2), scheduler="simple")
    routed_out = ksample(routed, **kw)
    flux = dict(latent=FLUX_LATENT, positives=(flux_cond(1),) * 2, negative=flux_cond(2), scheduler="simple")
    split = split_sample(a, b, 3, cfgs=(1.0, 1.0), **flux)
    assert max_diff(routed_out, split) <= 1e-4
    assert max_diff(routed_out, ksample(a, **kw)) > 1e-3


def test_sdxl_base_to_refiner_encodes_the_refiners_own_conditioning(comfyui):
    base, refiner = tiny_sdxl(0), tiny_sdxl(1, refiner=True)
    g = torch.Generator().manual_seed
    positive = [[torch.randn(1, 77, 64, generator=g(1)), {"pooled_output": torch.randn(1, 1280, generator=g(2))}]]
    negative = [[torch.randn(1, 77, 64, generator=g(3)), {"pooled_output": torch.randn(1, 1280, generator=g(4))}]]
    routed = two_experts(base, refiner, 0.8, "percent")
    boundary = common.sigma_scale(base.get_model_object("model_sampling")).to_sigma(Boundary(0.8, "percent"))
    switch = next(i for i, sigma in enumerate(sigmas_of(base).tolist()) if sigma <= boundary)
    out = ksample(routed, positive=positive, negative=negative)
    split = split_sample(base, refiner, switch, positives=(positive, positive), negative=negative)
    assert max_diff(out, split) <= 1e-4


# -- shift nodes before and after routing ----------------------------------------------------------


def flux_shift(model, max_shift=1.5):
    return nodes_model_advanced.ModelSamplingFlux().patch(model, max_shift, 0.5, 256, 256)[0]


def sd3_shift(model, shift=8.0):
    return nodes_model_advanced.ModelSamplingSD3().patch(model, shift)[0]


SHIFTS = {
    # (make the experts' native sampling, the shift node) — SD3/Wan-style experts are DiscreteFlow-native
    "ModelSamplingFlux": (lambda model: model, flux_shift),
    "ModelSamplingSD3": (lambda model: sd3_shift(model, 1.0), sd3_shift),
}


@pytest.mark.parametrize("node", SHIFTS)
def test_shift_before_routing_equals_shift_after_routing(tiny_flux, node):
    """For flow models a shift only changes the schedule; percent ends follow the routed model's shift."""
    native, shift = SHIFTS[node]
    a, b = native(tiny_flux(0, "base")), native(tiny_flux(1, "base"))
    kw = dict(cfg=1.0, latent=FLUX_LATENT, positive=flux_cond(1), negative=flux_cond(2), scheduler="simple")
    before = two_experts(shift(a), shift(b), 0.5, "percent")
    after = shift(two_experts(a, b, 0.5, "percent"))
    assert torch.equal(ksample(before, **kw), ksample(after, **kw))
    shifted_sigma = shift(a).get_model_object("model_sampling").percent_to_sigma(0.5)
    assert torch.equal(ksample(after, **kw), ksample(shift(two_experts(a, b, shifted_sigma)), **kw))
    unshifted_sigma = a.get_model_object("model_sampling").percent_to_sigma(0.5)
    assert abs(shifted_sigma - unshifted_sigma) > 0.01


def test_prediction_type_changed_after_routing_is_refused(sd_pair):
    a, b = sd_pair
    routed = v_prediction(two_experts(a, b, 1.0))
    with pytest.raises(ValueError, match="before routing"):
        ksample(routed)


# -- the routed guider ------------------------------------------------------------------------------


def guider_sample(guider, sampler="euler"):
    latent = SD_LATENT["samples"]
    sigmas = sigmas_of(guider.model_patcher)
    noise = comfy.sample.prepare_noise(latent, SEED)
    return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=SEED)


def test_routed_guider_per_expert_cfg_and_prompt_equal_split_sampling(sd_pair):
    a, b = sd_pair
    boundary_step = 2
    chain = expert(a, float(sigmas_of(a)[boundary_step]), cfg=7.5, positive=OTHER_POSITIVE)
    chain = expert(b, 0.0, cfg=2.5, experts=chain)
    guider = routing.RoutedGuiderNode.execute(chain, POSITIVE, NEGATIVE, 5.0).result[0]
    split = split_sample(a, b, boundary_step, cfgs=(7.5, 2.5), positives=(OTHER_POSITIVE, POSITIVE))
    assert max_diff(guider_sample(guider), split) <= 1e-4


def test_routed_guider_default_cfg_applies_to_experts_without_their_own(sd_pair):
    a, b = sd_pair
    chain = expert(b, 0.0, experts=expert(a, float(sigmas_of(a)[3])))
    guider = routing.RoutedGuiderNode.execute(chain, POSITIVE, NEGATIVE, 4.0).result[0]
    assert max_diff(guider_sample(guider), split_sample(a, b, 3, cfgs=(4.0, 4.0))) <= 1e-4


# -- bad input --------------------------------------------------------------------------------------


def test_zero_experts_is_refused():
    with pytest.raises(ValueError, match="no experts"):
        routing.RoutedModelNode.execute((), "resident")


def test_different_latent_formats_are_refused(tiny_sd15, tiny_flux):
    with pytest.raises(ValueError, match="latent format"):
        two_experts(tiny_sd15(0), tiny_flux(0), 1.0)


def test_different_prediction_types_are_refused(sd_pair):
    a, b = sd_pair
    with pytest.raises(ValueError, match="prediction"):
        two_experts(a, v_prediction(b), 1.0)


def test_a_routed_model_as_an_expert_is_refused(sd_pair):
    a, b = sd_pair
    with pytest.raises(ValueError, match="itself a routed model"):
        two_experts(two_experts(a, b, 1.0), b, 2.0)


def test_overlapping_ranges_are_refused_when_routing(sd_pair):
    a, b = sd_pair
    chain = expert(b, 0.3, "percent", experts=expert(a, 0.6, "percent"))
    with pytest.raises(ValueError, match=r"expert 2 stops at percent 0\.3"):
        routed_model(chain)


@pytest.mark.parametrize(("end", "unit"), [(1000.0, "timestep"), (20.0, "sigma")])
def test_a_first_expert_with_an_empty_range_is_refused_when_routing(sd_pair, end, unit):
    """Before, the first expert was skipped silently and the output equalled the second expert alone."""
    a, b = sd_pair
    with pytest.raises(ValueError, match=r"expert 1 stops at .* range would be empty"):
        routed_model(expert(b, 0.0, experts=expert(a, end, unit)))


def test_percent_outside_zero_to_one_is_refused(sd_pair):
    with pytest.raises(ValueError, match="outside 0…1"):
        expert(sd_pair[0], 1.5, "percent")


def test_ranges_not_covering_the_schedule_fail_before_any_network_call(sd_pair, monkeypatch):
    a, b = sd_pair
    routed = routed_model(expert(b, 1.0, experts=expert(a, 3.0)))
    spy = LoadSpy(monkeypatch, {"A": a, "B": b})
    with pytest.raises(ValueError, match="do not cover this schedule"):
        ksample(routed)
    assert spy.forwards() == []


def test_a_failed_routing_prompt_leaves_the_executor_serving(run_prompt):
    def prompt(last_end):
        return {
            "1": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "base", "seed": 0}},
            "2": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "finetune-a", "seed": 0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "5": {
                "class_type": "DM_RouteExpert",
                "inputs": {"model": ["1", 0], "end": 0.5, "unit": "percent", "cfg": 0.0},
            },
            "6": {
                "class_type": "DM_RouteExpert",
                "inputs": {"model": ["2", 0], "experts": ["5", 0], "end": last_end, "unit": "percent", "cfg": 0.0},
            },
            "7": {"class_type": "DM_RoutedModel", "inputs": {"experts": ["6", 0], "memory_mode": "resident"}},
            "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "9": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["7", 0],
                    "seed": 1,
                    "steps": 4,
                    "cfg": 5.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "positive": ["3", 0],
                    "negative": ["4", 0],
                    "latent_image": ["8", 0],
                    "denoise": 1.0,
                },
            },
            "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/routed"}},
        }

    with pytest.raises(AssertionError, match="do not cover this schedule"):
        run_prompt(prompt(0.6))
    outputs = run_prompt(prompt(1.0))
    assert outputs["10"]["latents"]


# -- the editor's σ preview -------------------------------------------------------------------------


def preview(**query):
    request = types.SimpleNamespace(query={k: str(v) for k, v in query.items()})
    response = asyncio.run(routing_server.sigmas_route(request))
    return response.status, json.loads(response.body)


def test_preview_route_shows_which_step_each_expert_serves(comfyui):
    status, body = preview(scheduler="simple", steps=10, model="flow", shift=3.0, ends="0.875,0", units="sigma,sigma")
    assert status == 200 and len(body["sigmas"]) == 11
    switch = next(i for i, s in enumerate(body["sigmas"]) if s <= 0.875)
    assert body["step_experts"] == [0] * switch + [1] * (10 - switch)
    assert body["spans"][0] == {"expert": 0, "first": 0, "last": switch - 1}


def test_preview_route_reports_bad_experts_and_refuses_bad_parameters(comfyui):
    status, body = preview(scheduler="normal", steps=8, model="sd", ends="0.6,0.3", units="percent,percent")
    assert status == 200 and "expert 2" in body["error"] and len(body["sigmas"]) == 9
    assert preview(scheduler="nope", steps=8)[0] == 400
    assert preview(scheduler="normal", steps=0)[0] == 400


def test_preview_route_uses_the_sampling_a_routing_node_last_ran_with(sd_pair):
    a, b = sd_pair
    routed = routing_runtime.build_routed_model(
        (routing_runtime.Expert(a, Boundary(1.0, "sigma")), routing_runtime.Expert(b, Boundary(0.0, "sigma"))),
        node_id="77",
    )[0]
    zero_snr = nodes_model_advanced.ModelSamplingDiscrete().patch(routed, "eps", True)[0]  # after routing
    ksample(zero_snr)
    status, body = preview(scheduler="normal", steps=STEPS, model="auto", node="77", ends="1,0", units="sigma,sigma")
    assert status == 200 and body["source"].startswith("this node's model")
    assert body["sigmas"] == pytest.approx(sigmas_of(zero_snr).tolist(), rel=1e-6)
    assert body["sigmas"][0] > 100  # the zero-terminal-SNR schedule the run used, not the plain one


def test_routes_register_only_with_a_running_server(monkeypatch):
    monkeypatch.setattr(routing_server, "_registered", False)
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace()))
    assert routing_server.register_routes() is False
    registered = {}

    class Routes:
        def get(self, path):
            return lambda handler: registered.setdefault(path, handler)

    instance = types.SimpleNamespace(routes=Routes())
    monkeypatch.setitem(
        sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))
    )
    assert routing_server.register_routes() is True
    assert registered == {routing_server.ROUTE: routing_server.sigmas_route}


# -- the editor widget (plain Node.js with stand-ins for the frontend) ----------------------------------

JS_HARNESS = r"""
globalThis.fetched = [];
globalThis.window = {};
await import("./extensions/pack/js/routing.js");
const noop = () => {};
const ctx = new Proxy({}, { get: (t, k) => (k in t ? t[k] : noop), set: (t, k, v) => ((t[k] = v), true) });
function node(id, type, widgets, inputs = [], outputs = []) {
  const n = { id, type, widgets, inputs, outputs, size: [200, 80], properties: {} };
  n.findInputSlot = (name) => n.inputs.findIndex((i) => i.name === name);
  n.getInputNode = (slot) => n.inputs[slot]?.source ?? null;
  n.getOutputNodes = (slot) => n.outputs[slot]?.targets ?? [];
  return n;
}
const w = (name, value) => ({ name, value });
const high = node(1, "DM_RouteExpert", [w("end", 0.875), w("unit", "sigma"), w("cfg", 0)],
                  [{ name: "model", link: 1 }]);
const low = node(2, "DM_RouteExpert", [w("end", 0), w("unit", "sigma"), w("cfg", 0)],
                 [{ name: "model", link: 2 }, { name: "experts", link: 3, source: high }]);
const sampler = node(3, "KSampler", [w("seed", 1), w("steps", 30), w("cfg", 5), w("scheduler", "karras")]);
class RoutedModel {}
Object.assign(RoutedModel.prototype, {
  onNodeCreated() { this.widgets = [w("memory_mode", "resident")]; },
  computeSize() { return [200, 160]; },
  setSize(size) { this.size = size; },
  setDirtyCanvas: noop,
  addCustomWidget(widget) { this.widgets.push(widget); return widget; },
});
globalThis.extension.beforeRegisterNodeDef(RoutedModel, { name: "DM_RoutedModel" });
const routed = Object.assign(new RoutedModel(), node(5, "DM_RoutedModel", [],
  [{ name: "experts", link: 4, source: low }], [{ name: "MODEL", targets: [sampler] }]));
delete routed.widgets;
routed.onNodeCreated();
const saved = [];
for (const [i, widget] of routed.widgets.entries()) if (widget.serialize !== false) saved[i] = widget.value;
const prompt = routed.widgets.filter((widget) => widget.options?.serialize !== false).map((widget) => widget.name);
const preview = routed.widgets.at(-1);
preview.draw(ctx, routed, 320, 40);
await new Promise((resolve) => setTimeout(resolve, 400));
preview.draw(ctx, routed, 320, 40);
console.log(JSON.stringify({ saved, prompt, fetched: globalThis.fetched, state: routed.dmPreview.data }));
"""

JS_API = """export const api = { async fetchApi(url) { globalThis.fetched.push(url);
  return { ok: true, json: async () => ({ sigmas: [14.6, 1.0, 0], step_experts: [0, 1], ends_sigma: [0.875, 0],
    spans: [{ expert: 0, first: 0, last: 0 }, { expert: 1, first: 1, last: 1 }],
    scheduler: "karras", steps: 2 }) }; } };
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_preview_widget_is_not_serialised_and_asks_the_route(run_web_extension):
    """The widget stays out of widgets_values and API prompts, and queries the route with the chain's ends."""
    result = run_web_extension("routing.js", JS_HARNESS, api=JS_API)
    assert result["saved"] == ["resident"] and result["prompt"] == ["memory_mode"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(result["fetched"][0]).query)
    assert query["ends"] == ["0.875,0"] and query["units"] == ["sigma,sigma"]
    assert query["steps"] == ["30"] and query["scheduler"] == ["karras"] and query["node"] == ["5"]
    assert result["state"]["step_experts"] == [0, 1]
