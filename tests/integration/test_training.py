"""The range-expert trainer through real ComfyUI on tiny models (CPU): σ draws, losses, schedules, the LoRA
it outputs (stock loaders, determinism), channel projections and their task vectors, and bad input."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from diffusion_merge.merging.channel_projection import companion_path
from diffusion_merge.merging.training.schedules import MomentumDecay, TimeRange, range_cdf, training_progress
from diffusion_merge.nodes import compat, training
from diffusion_merge.nodes import merge as merge_nodes
from diffusion_merge.nodes import task_vectors as tv_nodes

BASE_SETTINGS = dict(
    steps=4,
    batch_size=2,
    learning_rate=1e-3,
    training_dtype="fp32",
    lora_dtype="fp32",
    gradient_checkpointing=False,
    seed=0,
)


@pytest.fixture
def dataset():
    generator = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(3, 4, 8, 8, generator=generator) * 0.5}
    return latents, [[torch.randn(1, 77, 64, generator=generator), {}]]


def train(model, dataset, **settings):
    """Run the trainer node as ComfyUI does (inference mode); returns its outputs by name."""
    latents, positive = dataset
    with torch.inference_mode():
        output = training.TrainRangeExpertLoRANode.execute(model, latents, positive, **(BASE_SETTINGS | settings))
    names = ("model", "lora", "loss", "sigma_histogram", "projection", "steps")
    return dict(zip(names, output.result, strict=True))


def max_diff(a, b):
    return (a - b).abs().max().item()


def ks_distance(samples, cdf) -> float:
    values = torch.sort(torch.as_tensor(samples, dtype=torch.float64)).values
    n = len(values)
    model = cdf(values)
    steps = torch.arange(0, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(steps[1:] - model, model - steps[:-1]).max())


# -- σ draws -----------------------------------------------------------------------------------------


def test_drawn_sigmas_follow_the_range_the_global_probability_and_mirror_in_pairs(tiny_sd15, dataset):
    model = tiny_sd15(0)
    steps, batch = 60, 4
    out = train(
        model, dataset, steps=steps, batch_size=batch, range_min=750, range_max=1000, global_probability=0.3,
        antithetic=True, learning_rate=1e-6,
    )  # fmt: skip
    log = out["loss"]
    low, high = log["range_normalized_time"]
    assert low == pytest.approx(750 / 999, abs=1e-6) and high == pytest.approx(1.0)
    times = torch.tensor(log["normalized_time"], dtype=torch.float64).view(steps, batch)
    used_global = torch.tensor(log["global_draw"])
    own, whole = times[~used_global], times[used_global]
    assert own.min() >= low and own.max() <= high
    torch.testing.assert_close(own[:, :2] + own[:, 2:], torch.full_like(own[:, :2], low + high))
    torch.testing.assert_close(whole[:, :2] + whole[:, 2:], torch.ones_like(whole[:, :2]))
    assert abs(used_global.double().mean().item() - 0.3) < 4 * math.sqrt(0.21 / steps)
    assert whole.min() < low  # global batches reach below the range
    independent = own[:, :2].flatten()
    assert ks_distance(independent, lambda u: range_cdf(u, TimeRange(low, high))) < 1.95 / math.sqrt(len(independent))

    sampling = model.get_model_object("model_sampling")
    expected = [min(max(sampling.percent_to_sigma(1 - u), 0.0), 1e9) for u in log["normalized_time"]]
    torch.testing.assert_close(torch.tensor(log["sigma"]), torch.tensor(expected, dtype=torch.float32))
    assert log["range_sigma"][1] == pytest.approx(float(sampling.sigma_max))
    assert log["range_sigma"][0] == pytest.approx(float(sampling.sigma(torch.tensor(750.0))), rel=1e-3)
    assert out["sigma_histogram"].shape[0] == 1 and out["sigma_histogram"].shape[-1] == 3


def test_curriculum_moves_the_draws_towards_its_centre(tiny_sd15, dataset):
    (curriculum,) = training.TimestepCurriculumNode.execute(0.3, 0.1, 1.0, 0.0, 0.5).result
    steps, batch = 41, 4
    out = train(tiny_sd15(0), dataset, steps=steps, batch_size=batch, learning_rate=1e-6, curriculum=curriculum)
    log = out["loss"]
    weights = log["curriculum_weight"]
    expected = [curriculum.weight(training_progress(k, steps)) for k in range(steps)]
    assert weights == pytest.approx(expected) and weights[0] == 0.0 and weights[-1] == 1.0
    times = torch.tensor(log["normalized_time"], dtype=torch.float64).view(steps, batch)
    late = times[steps // 2 :].flatten()  # λ = 1 from the middle of training on
    whole = TimeRange(0.0, 1.0)
    assert ks_distance(late, lambda u: range_cdf(u, whole, 1.0, curriculum)) < 1.95 / math.sqrt(len(late))
    assert abs(late.mean().item() - 0.3) < 0.05


# -- losses ------------------------------------------------------------------------------------------


def test_consistency_loss_is_zero_at_start_and_the_range_loss_falls(tiny_sd15, dataset):
    out = train(
        tiny_sd15(0), dataset, steps=30, range_min=0, range_max=500, consistency_weight=1.0, loss_space="eps/v",
        learning_rate=1e-2, channel_projection=True, antithetic=True,
    )  # fmt: skip
    log = out["loss"]
    assert log["consistency_loss"][0] == 0.0  # LoRA up/down product and projections start as the identity
    assert max(log["consistency_loss"][1:]) > 0
    before, after = log["eval_range_loss"]
    assert after < 0.75 * before, (before, after)
    assert log["loss"][0] == pytest.approx(log["range_loss"][0] + log["consistency_loss"][0])


def test_eps_loss_is_the_x0_loss_divided_by_sigma_squared(tiny_sd15, dataset):
    common = dict(steps=1, batch_size=1, learning_rate=1e-9, range_min=100, range_max=600)
    x0 = train(tiny_sd15(0), dataset, **common)["loss"]
    eps = train(tiny_sd15(0), dataset, loss_space="eps/v", **common)["loss"]
    assert eps["sigma"] == x0["sigma"]
    assert eps["range_loss"][0] == pytest.approx(x0["range_loss"][0] / x0["sigma"][0] ** 2, rel=1e-4)


# -- MDLRC -------------------------------------------------------------------------------------------


def test_momentum_decay_logs_the_documented_beta1_and_lr(tiny_sd15, dataset):
    (decay,) = training.MomentumDecayNode.execute("rex", 0.9, 0.2, True).result
    steps, lr = 6, 2e-3
    log = train(tiny_sd15(0), dataset, steps=steps, learning_rate=lr, momentum_decay=decay)["loss"]
    reference = MomentumDecay("rex", 0.9, 0.2, True)
    progress = [training_progress(k, steps) for k in range(steps)]
    assert log["beta1"] == pytest.approx([reference.beta1(t) for t in progress])
    assert log["lr"] == pytest.approx([reference.learning_rate(lr, t) for t in progress])
    assert [b / (1 - b) for b in log["beta1"][:4]] == pytest.approx([9 * (1 - t) for t in progress[:4]])
    assert [r * (1 - b) for r, b in zip(log["lr"], log["beta1"], strict=True)] == pytest.approx([lr * 0.1] * steps)
    plain = train(tiny_sd15(0), dataset, steps=3, learning_rate=lr)["loss"]
    assert plain["beta1"] == [0.9] * 3 and plain["lr"] == pytest.approx([lr] * 3)


# -- the LoRA ----------------------------------------------------------------------------------------


def test_trained_lora_loads_with_stock_nodes_and_samples_like_the_trainer_model(
    tiny_sd15, dataset, sample, comfyui, caplog
):
    from comfy_extras.nodes_train import SaveLoRA

    import nodes

    base = tiny_sd15(0)
    before = sample(base)
    out = train(base, dataset, steps=4, learning_rate=1e-2, lora_dtype="bf16", range_min=0, range_max=300)
    assert torch.equal(sample(base), before)  # the input MODEL is untouched
    assert "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight" in out["lora"]
    assert any(key.endswith(".diff_b") for key in out["lora"])
    compat.run_node(SaveLoRA, lora=out["lora"], prefix="loras/stock_check", steps=out["steps"])
    saved = next((comfyui / "output" / "loras").glob("stock_check_4_steps_*.safetensors"))
    shutil.copy(saved, comfyui / "models" / "loras" / saved.name)
    with caplog.at_level(logging.WARNING):
        (loaded,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, saved.name, 1.0)
    assert "not loaded" not in caplog.text
    trained = sample(out["model"])
    assert torch.equal(sample(loaded), trained)
    assert max_diff(trained, before) > 1e-3  # the LoRA changed the model


def test_same_seed_gives_the_same_lora_on_the_cpu(tiny_sd15, dataset):
    settings = dict(steps=3, global_probability=0.5, antithetic=True, consistency_weight=0.5)
    first, second = (train(tiny_sd15(0), dataset, **settings) for _ in range(2))
    other = train(tiny_sd15(0), dataset, seed=1, **settings)
    assert first["loss"]["loss"] == second["loss"]["loss"] and first["loss"]["sigma"] == second["loss"]["sigma"]
    assert all(torch.equal(first["lora"][k], second["lora"][k]) for k in first["lora"])
    assert first["loss"]["sigma"] != other["loss"]["sigma"]


def test_gradient_checkpointing_gives_the_same_lora_and_is_undone(tiny_sd15, dataset):
    model = tiny_sd15(0)
    settings = dict(steps=2, optimizer="SGD", learning_rate=1e-2)  # SGD: Adam would magnify rounding noise
    plain = train(model, dataset, **settings)
    checkpointed = train(model, dataset, gradient_checkpointing=True, **settings)
    assert checkpointed["loss"]["loss"][0] == plain["loss"]["loss"][0]  # the same forward pass
    for key, value in plain["lora"].items():  # the backward pass may sum in another order
        torch.testing.assert_close(checkpointed["lora"][key], value, rtol=1e-4, atol=1e-7)
    assert not any("forward" in vars(module) for module in model.model.diffusion_model.modules())


def test_per_latent_conditioning_and_flow_models_train(tiny_sd15, tiny_flux, dataset):
    latents, _ = dataset
    generator = torch.Generator().manual_seed(4)
    captions = [[torch.randn(1, 77, 64, generator=generator), {}] for _ in range(3)]
    out = train(tiny_sd15(0), (latents, captions), steps=2, batch_size=2)
    assert len(out["loss"]["loss"]) == 2
    flux_latents = {"samples": torch.randn(2, 16, 8, 8, generator=generator)}
    flux_cond = [[torch.randn(1, 8, 64, generator=generator), {"pooled_output": torch.randn(1, 32)}]]
    flow = train(
        tiny_flux(0), (flux_latents, flux_cond), steps=2, range_unit="sigma", range_min=0.5, range_max=1.0,
        gradient_checkpointing=True,
    )  # fmt: skip
    assert min(flow["loss"]["sigma"]) >= 0.5 - 1e-6 and max(flow["loss"]["sigma"]) <= 1.0
    with pytest.raises(ValueError, match="turn gradient_checkpointing on"):  # Flux adds in place in ComfyUI 0.3.64
        train(tiny_flux(0), (flux_latents, flux_cond), steps=1)


# -- channel projections -----------------------------------------------------------------------------


def test_projections_save_beside_the_lora_and_merge_as_w_minus_identity(tiny_sd15, dataset, sample, comfyui):
    import nodes

    base = tiny_sd15(0)
    out = train(base, dataset, steps=4, learning_rate=2e-2, channel_projection=True)
    projections = out["projection"]
    assert {"input.0", "input.1", "middle.0", "output.0"} <= set(projections)
    assert any(max_diff(w, torch.eye(w.shape[0])) > 1e-4 for w in projections.values())  # they trained
    training.SaveRangeExpertLoRANode.execute(out["lora"], "loras/expert", projections)
    lora_file = next((comfyui / "output" / "loras").glob("expert_*_.safetensors"))
    assert companion_path(lora_file).is_file()
    for path in (lora_file, companion_path(lora_file)):
        shutil.copy(path, comfyui / "models" / "loras" / path.name)

    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, lora_file.name, 1.0)
    (vector,) = tv_nodes.TaskVectorFromLoRANode.execute(lora_file.name, base).result
    assert "channel_projection.middle.0.weight" in vector.keys()
    torch.testing.assert_close(
        vector.delta("channel_projection.middle.0.weight"), projections["middle.0"] - torch.eye(32)
    )
    trained = sample(out["model"])
    (from_lora, _) = tv_nodes.TaskVectorApplyNode.execute(base, vector, 1.0).result
    assert max_diff(sample(from_lora), trained) <= 1e-4
    assert max_diff(sample(stock), trained) > 1e-4  # stock loaders load the LoRA part only

    (from_models,) = tv_nodes.TaskVectorFromModelsNode.execute(out["model"], base).result
    (stack,) = merge_nodes.TaskVectorStackNode.execute(from_models, 0.5).result
    merged, _ = merge_nodes.MergeTaskArithmeticNode.execute(base, stack, 2.0).result
    assert max_diff(sample(merged), trained) <= 1e-4  # I + 2 · 0.5 · (W − I) = W


def widget_defaults(node_cls) -> dict:
    return {i.id: i.default for i in node_cls.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}


def test_trainer_and_save_run_as_a_prompt(run_prompt, comfyui):
    trainer_inputs = widget_defaults(training.TrainRangeExpertLoRANode) | {
        "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0], "range_min": 500, "steps": 2,
        "channel_projection": True, "momentum_decay": ["4", 0], "training_dtype": "fp32",
    }  # fmt: skip
    prompt = {
        "1": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "base", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "4": {"class_type": "DM_MomentumDecay", "inputs": widget_defaults(training.MomentumDecayNode)},
        "5": {"class_type": "DM_TrainRangeExpertLoRA", "inputs": trainer_inputs},
        "6": {
            "class_type": "DM_SaveRangeExpertLoRA",
            "inputs": {"lora": ["5", 1], "filename_prefix": "loras/prompt_expert", "channel_projection": ["5", 4]},
        },
        "7": {"class_type": "LossGraphNode", "inputs": {"loss": ["5", 2], "filename_prefix": "loss"}},
    }
    outputs = run_prompt(prompt)
    assert outputs["5"]["images"] and "prompt_expert_00001_.safetensors" in outputs["6"]["text"][0]
    assert "channel_projection" in outputs["6"]["text"][0]
    assert (comfyui / "output" / "loras" / "prompt_expert_00001_.channel_projection.safetensors").is_file()


def test_cancel_stops_training(tiny_sd15, dataset):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(tiny_sd15(0), dataset, steps=50)
    finally:
        mm.interrupt_current_processing(False)


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"range_min": 0, "range_max": 1500}, "outside the schedule"),
        ({"range_unit": "sigma", "range_min": 1.0, "range_max": 40.0}, "outside this model's schedule"),
        ({"range_unit": "percent", "range_min": 0.5, "range_max": 1.2}, "outside 0…1"),
        ({"range_min": 600, "range_max": 400}, "must be below range_max"),
        ({"global_probability": 1.5}, r"probability in \[0, 1\]"),
        ({"global_probability": -0.1}, r"probability in \[0, 1\]"),
        ({"optimizer": "SGD", "momentum_decay": MomentumDecay()}, "choose AdamW or Adam"),
    ],
)
def test_bad_settings_are_refused_before_training(tiny_sd15, dataset, settings, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_sd15(0), dataset, **settings)


def test_empty_dataset_wrong_conditioning_and_projection_on_a_dit_are_refused(tiny_sd15, tiny_flux, dataset):
    latents, positive = dataset
    with pytest.raises(ValueError, match="dataset is empty"):
        train(tiny_sd15(0), ({"samples": torch.zeros(0, 4, 8, 8)}, positive))
    with pytest.raises(ValueError, match="2 conditionings for 3 latents"):
        train(tiny_sd15(0), (latents, positive * 2))
    flux_cond = [[torch.zeros(1, 8, 64), {"pooled_output": torch.zeros(1, 32)}]]
    with pytest.raises(ValueError, match="channel projections need a UNet"):
        train(tiny_flux(0), ({"samples": torch.zeros(1, 16, 8, 8)}, flux_cond), channel_projection=True)
