"""Wan 2.2 A14B's recipe on the tiny built-in Wan experts: the routed MODEL equals the two-KSamplerAdvanced chain.

The recipe of ComfyUI's Wan 2.2 template (and of WanMoeKSampler): each expert behind its own ModelSamplingSD3
(shift 8), euler / simple / 20 steps / cfg 3.5, the high-noise expert for σ above 0.875. Chained, that is a
KSamplerAdvanced with the high-noise expert for steps 0..k (noise added, leftover noise returned) and one with the
low-noise expert for k..20 (no new noise), k being the first step whose σ is at most 0.875.
"""

from __future__ import annotations

import comfy.samplers
import pytest
import torch
from comfy_extras import nodes_model_advanced

import nodes
from diffusion_merge.merging.sampling.schedules import assign_steps
from diffusion_merge.nodes import demo_models, routing
from diffusion_merge.nodes.demo_wan import DemoWanLoaderNode

STEPS, CFG, SHIFT, BOUNDARY, SEED = 20, 3.5, 8.0, 0.875, 42
LATENT = {"samples": torch.zeros(1, 16, 2, 8, 8)}  # 5 frames of 64×64 in Wan's latent space


@pytest.fixture(scope="module")
def wan(comfyui):
    """(high-noise expert, low-noise expert, positive, negative), each expert shifted by 8 as in the recipe."""
    shift = nodes_model_advanced.ModelSamplingSD3()
    high, clip, _ = DemoWanLoaderNode.execute("high_noise", 0).result
    low = DemoWanLoaderNode.execute("low_noise", 0).result[0]
    encode = nodes.CLIPTextEncode()
    positive = encode.encode(clip, "a red fox running through snow")[0]
    negative = encode.encode(clip, "blurry")[0]
    return shift.patch(high, SHIFT)[0], shift.patch(low, SHIFT)[0], positive, negative


def routed(high, low, memory_mode="resident"):
    first = routing.RouteExpertNode.execute(high, BOUNDARY, "sigma", 0.0, None).result[0]
    both = routing.RouteExpertNode.execute(low, 0.0, "sigma", 0.0, first).result[0]
    return routing.RoutedModelNode.execute(both, memory_mode).result[0]


def ksample(model, positive, negative, sampler="euler"):
    return nodes.common_ksampler(model, SEED, STEPS, CFG, sampler, "simple", positive, negative, LATENT)[0]["samples"]


def chained(high, low, positive, negative, switch, sampler="euler"):
    """WanMoeKSampler's way: two KSamplerAdvanced calls split at step ``switch``."""
    advanced = nodes.KSamplerAdvanced()
    common = (SEED, STEPS, CFG, sampler, "simple", positive, negative)
    first = advanced.sample(high, "enable", *common, LATENT, 0, switch, "enable")[0]
    return advanced.sample(low, "disable", *common, first, switch, 10000, "disable")[0]["samples"]


def switch_step(model) -> int:
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return next(step for step, sigma in enumerate(sigmas.tolist()) if sigma <= BOUNDARY)


def test_the_boundary_splits_twenty_simple_steps_after_step_eleven(wan):
    high = wan[0]
    sigmas = comfy.samplers.calculate_sigmas(high.get_model_object("model_sampling"), "simple", STEPS)
    assert switch_step(high) == 11  # what the template's note says: steps 1–11 high, 12–20 low
    assert assign_steps(sigmas, [BOUNDARY, 0.0]) == [0] * 11 + [1] * 9


@pytest.mark.parametrize("memory_mode", ["resident", "sequential"])
def test_routed_equals_the_two_ksampler_chain_for_euler(wan, memory_mode):
    high, low, positive, negative = wan
    one_call = ksample(routed(high, low, memory_mode), positive, negative)
    two_calls = chained(high, low, positive, negative, switch_step(high))
    assert one_call.shape == LATENT["samples"].shape and torch.isfinite(one_call).all()
    torch.testing.assert_close(one_call, two_calls, rtol=1e-5, atol=1e-5)
    # a real comparison: each expert alone gives something else
    for alone in (ksample(high, positive, negative), ksample(low, positive, negative)):
        assert (alone - one_call).abs().max() > 1e-2


def test_a_multistep_sampler_keeps_its_history_across_the_switch(wan):
    """dpmpp_2m restarts its history in the chain; the routed model does not, so the two differ a little."""
    high, low, positive, negative = wan
    one_call = ksample(routed(high, low), positive, negative, "dpmpp_2m")
    two_calls = chained(high, low, positive, negative, switch_step(high), "dpmpp_2m")
    assert (one_call - two_calls).abs().max() > 1e-4


def test_demo_wan_loader_builds_two_distinct_deterministic_experts(comfyui):
    high_a = DemoWanLoaderNode.execute("high_noise", 0).result[0].model.diffusion_model.state_dict()
    high_b = demo_models.build_wan(0, "high_noise").model.diffusion_model.state_dict()
    low = demo_models.build_wan(0, "low_noise").model.diffusion_model.state_dict()
    assert all(torch.equal(high_a[key], high_b[key]) for key in high_a)
    assert any(not torch.equal(high_a[key], low[key]) for key in high_a if "weight" in key)
    assert high_a["patch_embedding.weight"].shape[:2] == (demo_models.WAN_TINY["dim"], 16)
    with pytest.raises(ValueError, match="unknown Wan expert 'mid_noise'"):
        demo_models.build_wan(0, "mid_noise")


def test_the_demo_video_vae_decodes_frames(comfyui):
    _, _, vae = DemoWanLoaderNode.execute("low_noise", 3).result
    frames = nodes.VAEDecode().decode(vae, {"samples": torch.randn(2, 16, 3, 4, 4)})[0]
    assert frames.shape == (6, 32, 32, 3) and frames.min() >= 0 and frames.max() <= 1
