"""Every shim of ``nodes/compat.py`` against the ComfyUI under test (the suite runs on 0.3.64 and 0.33.0).

The dynamic-VRAM contracts cannot run end to end without a GPU (ComfyUI reroutes a CPU load device to the
classic patcher); they are tested here the way the dynamic patcher exercises them: adapters rebuilt from
``(loaded_keys, weights)``, layers created without weights, a dynamic patcher swapped for training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffusion_merge.nodes import comfy_bridge, compat, demo_models
from diffusion_merge.nodes import superdiff_runtime as superdiff
from diffusion_merge.nodes import task_vectors as tv_nodes
from diffusion_merge.nodes.training_adapters import SwitchedWrapper


def apply_vector(model, vector, strength=1.0):
    return tv_nodes.TaskVectorApplyNode.execute(model, vector, strength).result[0]


def extract(finetuned, base):
    return tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]


@contextlib.contextmanager
def layers_without_weights():
    """Build models as ComfyUI does under dynamic VRAM (layers get weights from load_state_dict), where the
    running ComfyUI has that mode; elsewhere layers are built with weights as usual."""
    try:
        import comfy.memory_management as memory
    except ImportError:
        yield False
        return
    previous, memory.aimdo_enabled = memory.aimdo_enabled, True
    try:
        yield True
    finally:
        memory.aimdo_enabled = previous


def dynamic_patcher_class():
    import comfy.model_patcher

    return getattr(comfy.model_patcher, "ModelPatcherDynamic", None)


# -- the versioned node API ------------------------------------------------------------------------


def test_nodes_use_the_versioned_api_which_is_the_one_comfyui_registers(comfyui):
    from comfy_api.latest import io as latest_io

    from diffusion_merge.nodes import ALL_NODES

    assert compat.io.ComfyNode is latest_io.ComfyNode  # the versioned module re-exports the same classes
    assert all(issubclass(node, latest_io.ComfyNode) for node in ALL_NODES)


# -- sampling arguments ----------------------------------------------------------------------------


def test_inner_sample_extras_forwards_latent_shapes_and_refuses_unknown_arguments():
    assert compat.inner_sample_extras({}) == {}
    assert compat.inner_sample_extras({"latent_shapes": [(1, 4, 8, 8)]}) == {"latent_shapes": [(1, 4, 8, 8)]}
    with pytest.raises(TypeError, match="surprise"):
        compat.inner_sample_extras({"surprise": 1})


def test_superdiff_refuses_packed_latents_before_sampling(tiny_sd15, conditioning):
    components = tuple(superdiff.Component(tiny_sd15(seed), conditioning(seed)) for seed in (0, 1))
    guider = superdiff.SuperDiffGuider(components)
    with pytest.raises(ValueError, match="packs 2"):
        guider.inner_sample(None, None, "cpu", None, None, None, None, True, 0, latent_shapes=[(1, 4, 8, 8), (1, 8)])


def test_process_conds_and_latent_shapes_reach_the_model(tiny_sd15, conditioning):
    import comfy.model_management as mm

    model = tiny_sd15(0).model
    noise = torch.zeros(1, 4, 8, 8)
    conds = {"positive": [{"cross_attn": conditioning(1)[0][0], "model_conds": {}}]}
    processed = compat.process_conds(model, noise, conds, mm.get_torch_device(), None, None, 0, [noise.shape])
    assert "c_crossattn" in processed["positive"][0]["model_conds"]
    compat.set_latent_shapes(model, [noise.shape])
    assert compat.packed_latent_shapes(model) == ([noise.shape] if hasattr(model, "latent_shapes") else None)


# -- configs and models built in code --------------------------------------------------------------


def test_complete_dit_config_adds_only_fields_the_network_requires(comfyui):
    from comfy.ldm.flux.model import FluxParams

    @dataclasses.dataclass
    class Newer:
        depth: int
        txt_ids_dims: list

    @dataclasses.dataclass
    class Older:
        depth: int

    assert compat.complete_dit_config({"depth": 1}, Newer) == {"depth": 1, "txt_ids_dims": []}
    assert compat.complete_dit_config({"depth": 1}, Older) == {"depth": 1}
    assert compat.complete_dit_config({"depth": 1, "txt_ids_dims": [3]}, Newer)["txt_ids_dims"] == [3]
    config = {k: v for k, v in demo_models.FLUX_TINY.items() if k != "image_model"}
    FluxParams(**compat.complete_dit_config(config, FluxParams))  # constructs on every supported version


@pytest.mark.parametrize("build", ["sd15", "flux", "clip", "vae"])
def test_models_built_in_code_are_complete_when_layers_start_without_weights(demo, build):
    builders = {
        "sd15": lambda: demo.build_sd15(0, "finetune-a").model.diffusion_model,
        "flux": lambda: demo.build_flux(0, "finetune-b").model.diffusion_model,
        "clip": lambda: demo.build_clip(0, "finetune-c").cond_stage_model,
        "vae": lambda: demo.build_vae(0).first_stage_model,
    }
    eager = builders[build]().state_dict()
    with layers_without_weights():
        module = builders[build]()
    assert all(p is not None and not p.is_meta for p in module.parameters())
    lazy = module.state_dict()
    assert lazy.keys() == eager.keys()
    assert all(torch.equal(lazy[k], eager[k]) for k in eager)


def test_parameter_shapes_reads_linear_shapes_from_the_layer_not_its_placeholder():
    layer = torch.nn.Linear(3, 5)
    layer.weight = torch.nn.Parameter(torch.zeros(3, 5))  # what a lazy load leaves when the key was missing
    shapes = compat.parameter_shapes(torch.nn.Sequential(layer))
    assert shapes["0.weight"][0] == (5, 3) and shapes["0.bias"][0] == (5,)
    with pytest.raises(ValueError, match=r"0\.bias"):
        compat.assign_parameters(torch.nn.Sequential(torch.nn.Linear(3, 5)), {"0.weight": torch.ones(5, 3)})


def test_demo_model_samples_identically_when_built_without_weights(demo, sample):
    expected = sample(demo.build_sd15(0))
    with layers_without_weights():
        model = demo.build_sd15(0)
    assert torch.equal(sample(model), expected)


# -- weight adapters rebuilt by dynamic VRAM --------------------------------------------------------


def test_task_vector_patch_survives_being_rebuilt_from_its_loaded_keys_and_weights(tiny_sd15):
    base, finetuned = tiny_sd15(0), tiny_sd15(0, "finetune-d")
    vector = extract(finetuned, base)
    key = "diffusion_model.input_blocks.0.0.weight"
    patch = comfy_bridge.TaskVectorPatch.of(vector, key)
    rebuilt = type(patch)(patch.loaded_keys, patch.weights)
    weight = base.model.state_dict()[key]
    args = (key, 0.5, 1.0, None, lambda a: a)
    expected = patch.calculate_weight(weight.clone(), *args)
    assert torch.equal(rebuilt.calculate_weight(weight.clone(), *args), expected)
    assert torch.allclose(expected, weight + 0.5 * (finetuned.model.state_dict()[key] - weight), atol=1e-6)
    with pytest.raises(TypeError, match=r"TaskVectorPatch\.of"):
        type(patch)(set(), [])


def test_patches_prepared_as_dynamic_vram_does_give_the_patched_weight(tiny_sd15, comfyui):
    """A stock LoRA and a task vector on one key, prepared the way dynamic VRAM stages them (their tensors
    copied into one buffer, every adapter rebuilt), patch the weight exactly like the classic path."""
    import comfy.lora
    import comfy.model_patcher
    import comfy.sd

    base, finetuned = tiny_sd15(0), tiny_sd15(0, "finetune-c")
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    weight = base.model.state_dict()[key]
    generator = torch.Generator().manual_seed(0)
    lora = {
        "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(
            weight.shape[0], 2, 1, 1, generator=generator
        ),
        "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.randn(
            2, weight.shape[1], 1, 1, generator=generator
        ),
    }
    with_lora, _ = comfy.sd.load_lora_for_models(base, None, lora, 0.5, 0)
    patched = apply_vector(with_lora, extract(finetuned, base), 0.7)
    patches = patched.patches[key]
    assert len(patches) == 2 and isinstance(patches[-1][1], comfy_bridge.TaskVectorPatch)
    expected = comfy.lora.calculate_weight(patches, weight.clone(), key)

    low_vram = comfy.model_patcher.LowVramPatch(key, patched.patches)
    if hasattr(low_vram, "prepare"):  # ComfyUI with dynamic VRAM: stage every tensor, rebuild every adapter
        buffer = torch.empty(low_vram.memory_required(), dtype=torch.uint8)
        low_vram.prepare(buffer, None, copy=True, commit=True)
        assert isinstance(low_vram.prepared_patches[-1][1], comfy_bridge.TaskVectorPatch)
    else:  # classic ComfyUI: the same contract by hand
        rebuilt = [(p[0], type(p[1])(p[1].loaded_keys, p[1].weights), *p[2:]) for p in patches]
        low_vram = comfy.model_patcher.LowVramPatch(key, {key: rebuilt})
    assert torch.allclose(low_vram(weight.clone()), expected, atol=1e-6)


def test_projection_patches_are_block_patches_that_clones_and_device_moves_keep(tiny_sd15, sample):
    from diffusion_merge.nodes import projection

    model = tiny_sd15(0)
    weights = {"input.1": torch.eye(32) * 1.5, "middle.0": torch.eye(32) * 0.5}
    projected = projection.with_projections(model, weights)
    expected = sample(projected)
    clone = projected.clone()
    clone.model_patches_to(torch.device("cpu"))
    assert set(projection.projections_of(clone)) == set(weights)
    assert torch.equal(sample(clone), expected)
    assert not torch.equal(expected, sample(model))


# -- training on the non-dynamic path ---------------------------------------------------------------


def test_training_patcher_is_a_clone_for_classic_models(tiny_sd15):
    model = tiny_sd15(0)
    assert not compat.is_dynamic(model)
    clone = compat.training_patcher(model)
    assert clone is not model and clone.model is model.model and not compat.is_dynamic(clone)


def test_a_dynamic_model_trains_on_its_non_dynamic_delegate(sd15_file, comfyui, comfyui_install):
    """In a separate process: the dynamic patcher needs comfy-aimdo's native library loaded, which the
    other tests should not share."""
    if dynamic_patcher_class() is None:
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic)")
    path = sd15_file("dynamic.safetensors", folder="diffusion_models")
    script = Path(__file__).with_name("dynamic_patcher_check.py")
    env = {**os.environ, "COMFYUI_PATH": str(comfyui_install[0]), "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == {
        "cpu_device_gets_classic_patcher": True,
        "gpu_device_gets_dynamic_patcher": True,
        "built_in_code_refused": True,
        "delegate_is_classic": True,
        "delegate_has_its_own_weights": True,
        "delegate_keeps_the_patches": True,
    }


def test_training_mode_sets_comfyuis_flag_for_the_duration(comfyui):
    import comfy.model_management as mm

    before = getattr(mm, "in_training", None)
    with compat.training_mode():
        assert getattr(mm, "in_training", None) is (True if before is not None else None)
    assert getattr(mm, "in_training", None) is before


def test_trainer_wraps_every_weight_even_small_ones(tiny_sd15):
    """Dynamic VRAM would skip wrappers on modules ≤ 16 KB; the trainer's patcher must keep them all."""
    from diffusion_merge.nodes.training_adapters import AdapterSwitch, attach_adapters

    patcher = compat.training_patcher(tiny_sd15(0))
    with torch.inference_mode(False):
        lora = attach_adapters(patcher, "LoRA", 2, torch.float32, AdapterSwitch())
    small = [
        name
        for name, module in patcher.model.named_modules()
        if hasattr(module, "weight_function")
        and sum(p.numel() * p.element_size() for p in module.parameters()) <= 16384
    ]
    assert small and lora
    assert all(
        any(isinstance(w, SwitchedWrapper) for w in patcher.weight_wrapper_patches.get(f"{name}.weight", []))
        for name in small
    )


# -- checkpoint layout -----------------------------------------------------------------------------


def test_checkpoint_layout_names_every_part_and_keeps_the_networks_own_tensors(demo):
    model, clip, vae = demo.build_sd15(0), demo.build_clip(0), demo.build_vae(0)
    clip_sd, vae_sd = clip.get_sd(), vae.get_sd()
    layout = compat.checkpoint_layout(model.model, clip_sd, vae_sd)
    unet = model.model.diffusion_model.state_dict()
    for name, tensor in unet.items():
        assert layout[f"model.diffusion_model.{name}"].data_ptr() == tensor.data_ptr()
    assert sum(k.startswith("cond_stage_model.") for k in layout) == len(clip_sd)
    assert sum(k.startswith("first_stage_model.") for k in layout) == len(vae_sd)
    assert compat.checkpoint_layout(model.model).keys() == {f"model.diffusion_model.{k}" for k in unet}


# -- running core pieces in process ----------------------------------------------------------------


def test_prompt_executor_runs_prompts_with_the_classic_cache(run_prompt):
    prompt = {"1": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "base", "seed": 0}}}
    prompt["2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}}
    prompt["3"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}}
    prompt["4"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
    }
    prompt["5"] = {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "compat/l"}}
    for _ in range(2):  # a second run through a fresh executor: nothing left over from the first
        outputs = run_prompt(prompt)
        assert "5" in outputs


def test_run_node_runs_v1_and_v3_core_nodes(comfyui, tiny_sd15, tmp_path):
    import nodes

    (latent,) = compat.run_node(nodes.EmptyLatentImage, width=64, height=64, batch_size=2)
    assert latent["samples"].shape == (2, 4, 8, 8)
    model = tiny_sd15(0)
    (sampling,) = compat.run_node(
        __import__("comfy_extras.nodes_model_advanced", fromlist=["x"]).ModelSamplingDiscrete,
        model=model,
        sampling="v_prediction",
        zsnr=False,
    )
    assert sampling is not model
    from comfy_extras.nodes_train import SaveLoRA

    assert compat.run_node(SaveLoRA, lora={"a.lora_up.weight": torch.zeros(2, 2)}, prefix="compat/run", steps=1) == ()
    saved = list((comfyui / "output" / "compat").glob("run_1_steps_*.safetensors"))
    assert len(saved) == 1 and safetensors.torch.load_file(str(saved[0])).keys() == {"a.lora_up.weight"}
