"""Task vectors through real ComfyUI: extraction, application, saving, LoRA files, bad input."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import safetensors.torch
import torch

from diffusion_merge.merging import SafetensorsFile
from diffusion_merge.merging.io import NotSafetensorsError
from diffusion_merge.nodes import comfy_bridge
from diffusion_merge.nodes import task_vectors as tv_nodes


def first(output):
    return output.result[0]


def extract(finetuned, base, **kw):
    return first(tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base, **kw))


def apply(model, vector, strength=1.0):
    return first(tv_nodes.TaskVectorApplyNode.execute(model, vector, strength))


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_base_plus_full_task_vector_samples_like_the_finetune(tiny_sd15, sample):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    vector = extract(finetuned, base)
    assert max_diff(sample(apply(base, vector, 1.0)), sample(finetuned)) <= 1e-4
    assert max_diff(sample(base), sample(finetuned)) > 1e-2  # the fine-tune really changes the samples


def test_strength_zero_gives_the_base(tiny_sd15, sample):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-b")
    assert max_diff(sample(apply(base, extract(finetuned, base), 0.0)), sample(base)) == 0.0


def test_flow_model_task_vector_round_trip(tiny_flux, comfyui):
    import comfy.sample

    base, finetuned = tiny_flux(0, "base"), tiny_flux(0, "finetune-a")
    latent = torch.zeros(1, 16, 8, 8)
    gen = torch.Generator().manual_seed
    cond = [[torch.randn(1, 8, 64, generator=gen(1)), {"pooled_output": torch.randn(1, 32, generator=gen(2))}]]

    def run(model):
        noise = comfy.sample.prepare_noise(latent, 3)
        return comfy.sample.sample(model, noise, 3, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True)

    assert max_diff(run(apply(base, extract(finetuned, base))), run(finetuned)) <= 1e-4


def test_saved_task_vector_applies_through_stock_lora_loader(tiny_sd15, sample, comfyui):
    import nodes

    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    tv_nodes.TaskVectorSaveNode.execute(extract(finetuned, base), "task_vectors/roundtrip", "fp32")
    saved = next((comfyui / "output" / "task_vectors").glob("roundtrip_*.safetensors"))
    shutil.copy(saved, comfyui / "models" / "loras" / saved.name)
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, saved.name, 1.0)
    assert max_diff(sample(patched), sample(finetuned)) <= 1e-4


def test_saved_file_metadata_and_reload(tiny_sd15, comfyui):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-b")
    vector = extract(finetuned, base).scale(0.5)
    tv_nodes.TaskVectorSaveNode.execute(vector, "task_vectors/meta", "fp32")
    path = next((comfyui / "output" / "task_vectors").glob("meta_*.safetensors"))
    metadata = SafetensorsFile(path).metadata
    assert metadata["dm_base_fingerprint"] == vector.base_fingerprint
    assert '"coefficient": 0.5' in metadata["dm_recipe"]
    assert metadata["dm_version"]
    reloaded = first(tv_nodes.TaskVectorLoadNode.execute(path.name))
    assert reloaded.keys() == vector.keys()
    for key in vector.keys():
        torch.testing.assert_close(reloaded.delta(key, "cpu"), vector.delta(key, "cpu"), rtol=0, atol=0)


def test_from_files_equals_from_models_key_by_key(sd15_file, comfyui):
    import nodes

    sd15_file("ft.safetensors", "finetune-a")
    sd15_file("base.safetensors", "base")
    from_files = first(tv_nodes.TaskVectorFromFilesNode.execute("ft.safetensors", "base.safetensors"))
    loader = nodes.CheckpointLoaderSimple()
    finetuned = loader.load_checkpoint("ft.safetensors")[0]
    base = loader.load_checkpoint("base.safetensors")[0]
    from_models = extract(finetuned, base)
    assert sorted(from_files.keys()) == sorted(from_models.keys())
    assert from_files.base_fingerprint == from_models.base_fingerprint
    for key in from_models.keys():
        assert torch.equal(from_files.delta(key, "cpu"), from_models.delta(key, "cpu")), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_from_files_reads_low_precision_and_bare_unet_files(sd15_file, dtype):
    ft = sd15_file(f"ft_{dtype}.safetensors", "finetune-a", dtype=dtype, folder="diffusion_models")
    base = sd15_file(f"base_{dtype}.safetensors", "base", dtype=dtype, folder="diffusion_models")
    vector = first(tv_nodes.TaskVectorFromFilesNode.execute(ft.name, base.name))
    raw_ft, raw_base = safetensors.torch.load_file(ft), safetensors.torch.load_file(base)
    key = "input_blocks.0.0.weight"
    expected = raw_ft[key].float() - raw_base[key].float()
    assert torch.equal(vector.delta("diffusion_model." + key, "cpu"), expected)
    assert len(vector) == len(raw_ft)


def lora_state_dict():
    """A LoRA on the tiny UNet: a LoCon on a conv, a LoRA on a linear (with alpha), a LoHa on a conv and a LoKr
    on a linear."""
    g = torch.Generator().manual_seed(5)
    prefix = "diffusion_model."
    return {
        f"{prefix}input_blocks.0.0.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
        f"{prefix}input_blocks.0.0.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight": torch.randn(32, 4, generator=g),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight": torch.randn(4, 64, generator=g),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.alpha": torch.tensor(2.0),
        f"{prefix}out.2.hada_w1_a": torch.randn(4, 2, generator=g),
        f"{prefix}out.2.hada_w1_b": torch.randn(2, 32 * 9, generator=g),
        f"{prefix}out.2.hada_w2_a": torch.randn(4, 2, generator=g),
        f"{prefix}out.2.hada_w2_b": torch.randn(2, 32 * 9, generator=g),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_v.lokr_w1": torch.randn(4, 8, generator=g),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_v.lokr_w2": torch.randn(8, 8, generator=g),
    }


def test_lora_task_vector_equals_the_stock_loader_delta(tiny_sd15, comfyui):
    import comfy.lora
    import comfy.sd

    base = tiny_sd15(0, "base")
    lora = lora_state_dict()
    safetensors.torch.save_file(lora, str(comfyui / "models" / "loras" / "tiny_lora.safetensors"))
    vector = first(tv_nodes.TaskVectorFromLoRANode.execute("tiny_lora.safetensors", base))
    patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    assert len(vector) == 4
    weights = base.model.state_dict()
    for key in vector.keys():
        original = weights[key].float()
        stock = comfy.lora.calculate_weight(patched.patches[key], original.clone(), key)
        torch.testing.assert_close(vector.delta(key, "cpu"), stock - original, rtol=1e-5, atol=1e-6)


def fingerprint_of(*objects) -> str:
    digest = hashlib.sha256()
    for obj in objects:
        for key, tensor in sorted(obj.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().numpy().tobytes())
        digest.update(repr(sorted((k, len(v)) for k, v in obj.patches.items())).encode())
    return digest.hexdigest()


def test_nodes_leave_their_inputs_bit_identical(tiny_sd15, sample, comfyui):
    import comfy.model_management as mm

    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    before = fingerprint_of(base, finetuned)
    vector = extract(finetuned, base)
    patched = apply(base, vector, 0.7)
    sample(patched)
    tv_nodes.TaskVectorInfoNode.execute(vector)
    tv_nodes.TaskVectorSaveNode.execute(vector, "task_vectors/untouched", "fp16")
    extract(patched, base)
    mm.unload_all_models()  # sampling leaves the shared module patched while loaded, as ComfyUI always does
    assert fingerprint_of(base, finetuned) == before
    assert not base.patches and not finetuned.patches


def test_task_vector_of_a_patched_model_is_its_patch(tiny_sd15, sample):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    patched = apply(base, extract(finetuned, base), 0.5)
    half = extract(patched, base)
    again = apply(base, half, 2.0)
    assert max_diff(sample(again), sample(finetuned)) <= 1e-4


def test_info_reports_keys_norms_and_sparsity(tiny_sd15):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    out = tv_nodes.TaskVectorInfoNode.execute(extract(finetuned, base))
    import json

    summary = json.loads(out.result[0])
    assert summary["keys"] == len(base.model.diffusion_model.state_dict())
    assert 0.0 < summary["sparsity"] < 1.0  # finetune-a leaves the output blocks unchanged
    assert summary["block_norms"]["output_blocks.0"] == 0.0
    assert summary["block_norms"]["input_blocks.1"] > 0.0
    assert "keys:" in out.ui.as_dict()["text"][0]


# -- bad input ----------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_key(tiny_sd15):
    with pytest.raises(
        ValueError,
        match=r"key 'diffusion_model\..+' is \(\d+, \d+\) in finetuned MODEL but \(\d+, \d+\) in base MODEL",
    ):
        extract(tiny_sd15(0, model_channels=64), tiny_sd15(0))


def test_different_architectures_are_refused(tiny_sd15, tiny_flux):
    with pytest.raises(ValueError, match="different architectures"):
        extract(tiny_flux(0), tiny_sd15(0))
    with pytest.raises(ValueError, match="does not fit this model"):
        apply(tiny_sd15(0), extract(tiny_flux(0, "finetune-a"), tiny_flux(0)))


def test_missing_file_is_named(comfyui):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        tv_nodes.TaskVectorFromFilesNode.execute("nope.safetensors", "nope.safetensors")


def test_pickled_file_is_never_unpickled(comfyui, monkeypatch):
    path = comfyui / "models" / "checkpoints" / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(NotSafetensorsError, match="not a safetensors file"):
        tv_nodes.TaskVectorFromFilesNode.execute("evil.safetensors", "evil.safetensors")
    with pytest.raises(ValueError, match=r"not a \.safetensors file"):
        comfy_bridge.resolve_model_file("evil.ckpt", "checkpoints")


def test_nan_delta_errors_naming_the_key_or_is_skipped(tiny_sd15):
    base, finetuned = tiny_sd15(0, "base"), tiny_sd15(0, "finetune-a")
    broken = finetuned.clone()
    key = "diffusion_model.input_blocks.0.0.bias"
    nan = torch.full_like(base.model.state_dict()[key], float("nan"))
    broken.add_patches({key: (nan,)}, 1.0)
    with pytest.raises(ValueError, match=rf"'{key}' has NaN/Inf"):
        extract(broken, base).delta(key, "cpu")
    skipped = extract(broken, base, nonfinite="skip key")
    assert torch.count_nonzero(skipped.delta(key, "cpu")) == 0


@pytest.mark.parametrize("prefix", ["../escape", "task_vectors/../../escape", "/tmp/abs"])
def test_save_refuses_paths_outside_the_output_folder(tiny_sd15, prefix):
    vector = extract(tiny_sd15(0, "finetune-a"), tiny_sd15(0))
    with pytest.raises(ValueError, match="output folder"):
        tv_nodes.TaskVectorSaveNode.execute(vector, prefix, "fp16")


def test_text_encoder_part_round_trips_through_apply_and_the_stock_lora_loader(demo, comfyui):
    import nodes

    base_model, finetuned_model = demo.build_sd15(0), demo.build_sd15(0, "finetune-a")
    base_clip, finetuned_clip = demo.build_clip(0), demo.build_clip(0, "finetune-a")
    vector = extract(finetuned_model, base_model, clip_finetuned=finetuned_clip, clip_base=base_clip)
    text_keys = [k for k in vector.keys() if k.startswith("text_encoders.")]
    assert text_keys and all(k.endswith((".weight", ".bias")) for k in text_keys)

    def encode(clip):
        return clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))[0][0]

    _, patched_clip = tv_nodes.TaskVectorApplyNode.execute(base_model, vector, 1.0, base_clip).result
    assert max_diff(encode(patched_clip), encode(finetuned_clip)) <= 1e-4
    assert max_diff(encode(base_clip), encode(finetuned_clip)) > 1e-3

    tv_nodes.TaskVectorSaveNode.execute(vector, "task_vectors/with_clip", "fp32")
    saved = next((comfyui / "output" / "task_vectors").glob("with_clip_*.safetensors"))
    shutil.copy(saved, comfyui / "models" / "loras" / saved.name)
    _, loaded_clip = nodes.LoraLoader().load_lora(base_model, base_clip, saved.name, 1.0, 1.0)
    assert max_diff(encode(loaded_clip), encode(finetuned_clip)) <= 1e-4


def test_apply_refuses_a_task_vector_most_of_whose_keys_the_model_lacks(tiny_sd15):
    from diffusion_merge.merging import StoredDeltas, TaskVector
    from diffusion_merge.merging.keys import KeyMismatchError

    base = tiny_sd15(0, "base")
    fitting = extract(tiny_sd15(0, "finetune-b"), base, key_filter=r"^diffusion_model\.out\.")
    foreign = {f"diffusion_model.other_net.{i}.weight": torch.zeros(2) for i in range(3 * len(fitting))}
    vector = fitting.join(TaskVector(((1.0, StoredDeltas(foreign, "foreign")),)))
    with pytest.raises(KeyMismatchError, match=r"'diffusion_model\.other_net\.0\.weight'"):
        apply(base, vector)
