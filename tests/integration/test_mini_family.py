"""The committed mini model family through real ComfyUI (CPU): the loader's outputs with stock nodes, what
its pictures show (classifier), how the variants differ, saving with the stock and the streaming checkpoint
savers and loading the file back, and refusing what is not a family member."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_merge.merging import family_data as data
from diffusion_merge.merging import family_metrics as metrics
from diffusion_merge.nodes import demo, mini_models

FAMILY = mini_models.FAMILY_DIR


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier(FAMILY / "classifier.safetensors")


@pytest.fixture(scope="module")
def base(comfyui):
    return mini_models.load_variant("base")


def sampling_prompt(variant: str, text: str, batch: int, seed: int = 1) -> dict:
    """Load Mini Model → CLIPTextEncode → KSampler (32×32) → VAEDecode → PreviewImage, all stock but the loader."""
    return {
        "1": {"class_type": "DM_LoadMiniModel", "inputs": {"variant": variant}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": batch}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": 20,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"mini_{variant}"}},
    }


def saved_images(comfyui, outputs: dict, node: str = "7") -> torch.Tensor:
    import numpy as np
    from PIL import Image

    pictures = []
    for entry in outputs[node]["images"]:
        path = comfyui / "output" / entry["subfolder"] / entry["filename"]
        pictures.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255.0)
    return torch.stack(pictures).movedim(-1, 1)


def test_manifest_lists_every_variant_with_its_files():
    manifest = json.loads((FAMILY / mini_models.MANIFEST).read_text())
    names = list(mini_models.variants())
    assert names[0] == "base"
    for expected in ("a", "b", "tops", "footwear", "bags-trousers-dresses"):
        assert expected in names
    assert [n for n in names if n.startswith("expert-")] == [
        "expert-000-250", "expert-250-500", "expert-500-750", "expert-750-1000"
    ]  # fmt: skip
    total = sum(p.stat().st_size for p in FAMILY.rglob("*.safetensors"))
    assert total <= 25 * 1024 * 1024, f"the committed family is {total / 2**20:.1f} MiB (limit 25)"
    assert manifest["text_encoder"] and manifest["vae"]


def test_loader_node_with_stock_nodes_draws_the_prompted_garment_and_colour(comfyui, run_prompt, classifier):
    outputs = run_prompt(sampling_prompt("base", "a red sneaker", batch=8))
    images = saved_images(comfyui, outputs)
    assert images.shape == (8, 3, 32, 32)
    predictions = metrics.predict(classifier, images)
    assert metrics.class_accuracy(predictions, torch.full((8,), data.CLASS_NAMES.index("sneaker"))) >= 0.75
    assert metrics.colour_accuracy(images, torch.full((8,), data.COLOUR_NAMES.index("red"))) >= 0.75


def test_sample_images_helper_follows_class_and_colour_and_is_seeded(base, classifier):
    model, clip, vae = base
    prompts = [data.caption(k, k % 6) for k in range(10) for _ in range(3)]
    targets = torch.arange(10).repeat_interleave(3)
    images = mini_models.sample_images(model, clip, vae, prompts, seed=5)
    assert images.shape == (30, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    result = metrics.evaluate(classifier, images, targets, targets % 6)
    assert result["class_accuracy"] >= 0.7 and result["colour_accuracy"] >= 0.8
    again = mini_models.sample_images(model, clip, vae, prompts[:3], seed=5)
    torch.testing.assert_close(again, images[:3])


def test_base_draws_the_prompted_garment_for_four_in_five_pictures(base, classifier):
    """The family's quality bar on a small fixed sample: the committed classifier recognises the prompted garment
    in at least 80 % of base's pictures (20 Euler steps, cfg 4, five prompts × four pictures, seed 11)."""
    model, clip, vae = base
    asked = {"a red sneaker": "sneaker", "a blue trousers": "trousers", "a yellow bag": "bag",
             "a green dress": "dress", "a magenta ankle boot": "ankle boot"}  # fmt: skip
    prompts = [text for text in asked for _ in range(4)]
    images = mini_models.sample_images(model, clip, vae, prompts, seed=11, steps=20, cfg=4.0)
    targets = torch.tensor([data.CLASS_NAMES.index(asked[text]) for text in prompts])
    accuracy = metrics.class_accuracy(metrics.predict(classifier, images), targets)
    assert accuracy >= 0.8, f"{accuracy:.2f} of the pictures show the prompted garment"


def test_class_group_variants_draw_their_own_classes_without_a_prompt(comfyui, classifier):
    """A is base fine-tuned on classes 0–4 and B on 5–9: their unconditional pictures (empty prompt) fall into
    their own half, while prompted classes still work in both (the text encoder is shared and frozen)."""
    share_of_a = {}
    for variant in ("a", "b"):
        model, clip, vae = mini_models.load_variant(variant)
        images = mini_models.sample_images(model, clip, vae, [""] * 30, seed=3)
        predicted = metrics.predict(classifier, images).classes
        share_of_a[variant] = float(torch.isin(predicted, torch.tensor(data.CLASS_GROUPS["a"])).float().mean())
        prompted = mini_models.sample_images(model, clip, vae, ["a red trousers", "a red bag"], seed=4)
        assert metrics.predict(classifier, prompted).classes.tolist() == [1, 8]
    assert share_of_a["a"] >= 0.8 and share_of_a["b"] <= 0.4


def test_variants_share_text_encoder_and_vae_and_differ_in_the_unet(comfyui):
    base_state = mini_models.family_state("base")
    tops_state = mini_models.family_state("tops")
    unet_keys = [k for k in base_state if k.startswith(mini_models.UNET_PREFIX)]
    assert all(torch.equal(base_state[k], tops_state[k]) for k in base_state if k not in unet_keys)
    changed = sum(not torch.equal(base_state[k], tops_state[k]) for k in unet_keys)
    assert changed > 0.9 * len(unet_keys)


def test_expert_variant_is_base_with_its_lora(comfyui, base):
    model, _, _ = mini_models.load_variant("expert-750-1000")
    base_model = base[0]
    assert not base_model.patches and len(model.patches) > 0
    assert set(model.model.diffusion_model.state_dict()) == set(base_model.model.diffusion_model.state_dict())


def test_stock_checkpoint_save_then_our_loader_gives_the_same_model(comfyui, run_prompt, base):
    model, clip, vae = base
    run_prompt(
        {
            "1": {"class_type": "DM_LoadMiniModel", "inputs": {"variant": "base"}},
            "2": {
                "class_type": "CheckpointSave",
                "inputs": {
                    "model": ["1", 0],
                    "clip": ["1", 1],
                    "vae": ["1", 2],
                    "filename_prefix": "checkpoints/mini_stock",
                },
            },
        }
    )
    saved = sorted((comfyui / "output" / "checkpoints").glob("mini_stock*.safetensors"))[-1]
    target = comfyui / "models" / "checkpoints" / saved.name
    saved.replace(target)
    node_output = demo.LoadMiniCheckpointNode.execute(saved.name)
    again_model, again_clip, again_vae = node_output.result
    positive = mini_models.encode(again_clip, "a blue bag")
    torch.testing.assert_close(positive[0][0], mini_models.encode(clip, "a blue bag")[0][0], atol=2e-3, rtol=0)
    latents = mini_models.sample_latents(model, positive, positive, 2, seed=3, steps=4)
    again = mini_models.sample_latents(again_model, positive, positive, 2, seed=3, steps=4)
    torch.testing.assert_close(again, latents, atol=1e-3, rtol=0)  # fp16 file, fp16-stored family
    torch.testing.assert_close(again_vae.decode(latents), vae.decode(latents), atol=1e-3, rtol=0)


def test_streaming_save_of_a_merge_loads_back(comfyui, run_prompt):
    prompt = {
        "1": {"class_type": "DM_LoadMiniModel", "inputs": {"variant": "a"}},
        "2": {"class_type": "DM_LoadMiniModel", "inputs": {"variant": "b"}},
        "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.5}},
        "4": {
            "class_type": "DM_SaveCheckpointStreaming",
            "inputs": {
                "model": ["3", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "filename_prefix": "checkpoints/mini_ab",
                "dtype": "fp16",
            },
        },
    }
    run_prompt(prompt)
    saved = sorted((comfyui / "output" / "checkpoints").glob("mini_ab*.safetensors"))[-1]
    model, _, _ = mini_models.load_checkpoint_file(saved)
    merged = mini_models.read_safetensors(saved)
    a, b = mini_models.family_state("a"), mini_models.family_state("b")
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    expected = (a[key].float() + b[key].float()) / 2
    torch.testing.assert_close(merged[key].float(), expected, atol=1e-3, rtol=0)
    loaded = model.model.diffusion_model.state_dict()["input_blocks.1.0.in_layers.2.weight"]
    torch.testing.assert_close(loaded.float(), merged[key].float())


def test_checkpoints_that_are_not_family_members_are_refused(comfyui, sd15_file):
    path = sd15_file("not_family.safetensors")
    with pytest.raises(mini_models.FamilyError, match="no text encoder"):
        mini_models.load_checkpoint_file(path)
    state = mini_models.family_state("base")
    broken = dict(state)
    broken.pop("model.diffusion_model.out.2.bias")
    with pytest.raises(mini_models.FamilyError, match=r"out\.2\.bias"):
        mini_models.load_checkpoint_state(broken, "broken.safetensors")
    bad = dict(state)
    key = next(k for k in bad if k.startswith("first_stage_model."))
    bad[key] = torch.full_like(bad[key], float("nan"))
    with pytest.raises(mini_models.FamilyError, match="NaN"):
        mini_models.load_checkpoint_state(bad, "nan.safetensors")
    with pytest.raises(mini_models.FamilyError, match="no variant 'nope'"):
        mini_models.load_variant("nope")


def test_readme_snippet_runs_and_its_pictures_are_right(comfyui):
    readme = (mini_models.FAMILY_DIR.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The built-in mini model family", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (mini family)", "exec"), namespace)
    assert namespace["images"].shape == (16, 3, 32, 32)
    assert namespace["scores"]["class_accuracy"] >= 0.75 and namespace["scores"]["colour_accuracy"] >= 0.75


def test_vocabulary_compaction_round_trips_and_unknown_words_embed_as_zero(comfyui, base):
    _, clip, _ = base
    stored = mini_models.read_safetensors(FAMILY / "text_encoder.safetensors")
    full = mini_models.expand_vocabulary(stored)
    table = full[mini_models.TOKEN_EMBEDDING_KEY]
    assert table.shape == (
        mini_models.VOCAB_SIZE,
        clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1],
    )
    ids = stored[mini_models.VOCAB_IDS_KEY].long()
    assert (table[ids].abs().sum(1) > 0).all()
    assert int((table.abs().sum(1) > 0).sum()) == ids.numel()
    compact = mini_models.compact_vocabulary(full, ids.tolist())
    assert torch.equal(compact[mini_models.VOCAB_ROWS_KEY], stored[mini_models.VOCAB_ROWS_KEY])
