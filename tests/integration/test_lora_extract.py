"""Extract LoRA from Task Vector through real ComfyUI: the stock loaders apply the file, and what they add is
base + the low-rank delta (the best rank-r approximation of τ); at full rank it is the fine-tune itself."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from diffusion_merge.merging.io import SafetensorsFile
from diffusion_merge.nodes import comfy_bridge
from diffusion_merge.nodes import lora_extract as lora_nodes
from diffusion_merge.nodes import merge as merge_nodes
from diffusion_merge.nodes import task_vectors as tv_nodes


def first(output):
    return output.result[0]


def extract(finetuned, base, **kw):
    return first(tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base, **kw))


def to_lora(vector, prefix, **kw):
    output = lora_nodes.TaskVectorToLoRANode.execute(vector, prefix, **kw)
    return output


def written(comfyui, prefix):
    folder, name = prefix.split("/")
    return max((comfyui / "output" / folder).glob(f"{name}_*.safetensors"))


def into_loras(comfyui, path):
    shutil.copy(path, comfyui / "models" / "loras" / path.name)
    return path.name


def best_approximation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    matrix = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape).float()


def test_stock_loader_applies_base_plus_the_low_rank_delta(tiny_sd15, comfyui, caplog):
    import nodes

    base, finetuned = tiny_sd15(0), tiny_sd15(0, "finetune-d")  # finetune-d changes every parameter
    vector = extract(finetuned, base)
    output = to_lora(vector, "loras/rank4", rank=4, dtype="fp32")
    path = written(comfyui, "loras/rank4")
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, into_loras(comfyui, path), 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    base_weights, patched_weights = comfy_bridge.model_weights(base), comfy_bridge.model_weights(patched)
    keys = SafetensorsFile(path).keys()
    factored = [k for k in vector.keys() if k.removesuffix(".weight") + ".lora_up.weight" in keys]
    convs = [k for k in factored if len(vector.shape(k)) == 4 and vector.shape(k)[2] > 1]
    assert factored and convs  # linear layers and 3×3 convolutions (LoCon) both went through the loader
    for key in vector.keys():
        delta = vector.delta(key, "cpu")
        expected = best_approximation(delta, 4) if key in factored else delta
        got = patched_weights[key].float() - base_weights[key].float()
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=key)
    report = json.loads(output.result[1])
    assert report["keys"]["lora"] + report["keys"]["locon"] == len(factored)
    assert 0 < report["energy"] < 1 and report["rank_max"] == 4
    text = output.ui.as_dict()["text"][0]
    assert "energy kept" in text and "least energy kept" in text and "saved to output/loras/rank4_" in text


def test_full_rank_lora_samples_like_the_finetune(tiny_sd15, sample, comfyui):
    import nodes

    base, finetuned = tiny_sd15(0), tiny_sd15(0, "finetune-a")
    output = to_lora(extract(finetuned, base), "loras/full", mode="energy", energy=1.0, max_rank=4096, dtype="fp32")
    assert json.loads(output.result[1])["energy"] == pytest.approx(1.0, abs=1e-6)
    name = into_loras(comfyui, written(comfyui, "loras/full"))
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, 1.0)
    assert (sample(patched) - sample(finetuned)).abs().max().item() <= 1e-4
    # the node's own output is the same delta, read back from the file
    lora_vector = output.result[0]
    (applied, _) = tv_nodes.TaskVectorApplyNode.execute(base, lora_vector, 1.0).result
    assert (sample(applied) - sample(patched)).abs().max().item() <= 1e-5


def test_text_encoder_part_goes_through_the_stock_lora_loader(demo, comfyui):
    import nodes

    base_model, finetuned_model = demo.build_sd15(0), demo.build_sd15(0, "finetune-a")
    base_clip, finetuned_clip = demo.build_clip(0), demo.build_clip(0, "finetune-a")
    vector = extract(finetuned_model, base_model, clip_finetuned=finetuned_clip, clip_base=base_clip)
    to_lora(vector, "loras/with_clip", mode="energy", energy=1.0, max_rank=4096, dtype="fp32")
    path = written(comfyui, "loras/with_clip")
    assert any(k.startswith("text_encoders.") and k.endswith(".lora_up.weight") for k in SafetensorsFile(path).keys())

    def encode(clip):
        return clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))[0][0]

    _, loaded_clip = nodes.LoraLoader().load_lora(base_model, base_clip, into_loras(comfyui, path), 1.0, 1.0)
    assert (encode(loaded_clip) - encode(finetuned_clip)).abs().max().item() <= 1e-4
    assert (encode(base_clip) - encode(finetuned_clip)).abs().max().item() > 1e-3


def test_a_merge_result_extracts_and_loads(tiny_sd15, comfyui):
    import nodes

    base = tiny_sd15(0)
    stack = None
    for variant in ("finetune-a", "finetune-b"):
        entry = first(merge_nodes.TaskVectorStackNode.execute(extract(tiny_sd15(0, variant), base), 1.0, stack))
        stack = entry
    _, merged = merge_nodes.MergeTIESNode.execute(base, stack, k=0.5).result
    to_lora(merged, "loras/merged", rank=8, conv="skip", other_keys="drop")
    path = written(comfyui, "loras/merged")
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, into_loras(comfyui, path), 1.0)
    assert patched.patches  # the stock loader found keys to patch
    assert not any(".diff" in k for k in SafetensorsFile(path).keys())
    assert json.loads(SafetensorsFile(path).metadata["dm_lora_settings"])["conv"] == "skip"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be"),
        ({"mode": "energy", "energy": float("nan")}, "finite"),
        ({"mode": "energy", "energy": 1.5}, r"\(0, 1\]"),
        ({"mode": "energy", "energy": 0.5, "max_rank": 0}, "max_rank"),
        ({"mode": "fraction"}, "mode must be one of"),
    ],
)
def test_bad_settings_stop_with_a_clear_message(tiny_sd15, comfyui, kwargs, message):
    vector = extract(tiny_sd15(0, "finetune-a"), tiny_sd15(0))
    with pytest.raises(ValueError, match=message):
        to_lora(vector, "loras/bad", **kwargs)


def test_nonfinite_deltas_are_refused_naming_the_key(tiny_sd15, comfyui):
    base, broken = tiny_sd15(0), tiny_sd15(0, "finetune-a")
    key = "diffusion_model.out.2.weight"
    weight = comfy_bridge.model_weights(broken)[key]
    weight.data[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"diffusion_model\.out\.2\.weight"):
        to_lora(extract(broken, base), "loras/broken", rank=2)
