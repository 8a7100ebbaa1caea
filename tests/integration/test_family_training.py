"""The mini family's training scripts (scripts/family/): every stage end to end at the dry preset (a few
steps on 256 images) in a subprocess, the family it writes loading through the pack's loader, and the
exactness of the tricks training relies on (latent re-scaling, the trainable text encoder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_merge.merging import family_data
from diffusion_merge.nodes import mini_models

PACK_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = PACK_ROOT / "scripts" / "family"
needs_dataset = pytest.mark.skipif(
    not family_data.dataset_available(), reason="Fashion-MNIST not installed (bash scripts/setup_dataset.sh)"
)


@pytest.fixture(scope="module")
def train_family(comfyui):
    """The training script as a module (its ComfyUI boot is not used: the tests' ComfyUI is already up)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_family as module
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


@needs_dataset
def test_dry_preset_trains_every_stage_and_the_family_loads(comfyui, tmp_path):
    out = tmp_path / "family"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_PATH": os.environ.get("COMFYUI_PATH", str(comfyui_root()))}
    command = [sys.executable, str(SCRIPTS / "train_family.py"), "all", "--preset", "dry", "--out", str(out)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    manifest = json.loads((out / "family.json").read_text())
    assert list(manifest["variants"])[:6] == ["base", "a", "b", "tops", "footwear", "bags-trousers-dresses"]
    assert {"classifier", "vae", "base", "a", "expert-750-1000"} <= set(manifest["training"])
    assert (out / "classifier.safetensors").is_file() and "base" in manifest["evaluation"]
    model, clip, vae = mini_models.load_variant("expert-250-500", out)
    assert model.patches  # base + the expert's LoRA
    images = mini_models.sample_images(model, clip, vae, ["a red sneaker"], seed=0, steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def comfyui_root() -> Path:
    import folder_paths  # a module at the root of the ComfyUI checkout

    return Path(folder_paths.__file__).resolve().parent


def test_latent_normalisation_is_exact_and_reaches_the_target_scale(train_family):
    vae = mini_models.without_missing_key_log(mini_models.build_vae, {})
    autoencoder = vae.first_stage_model.float()
    train_family.seeded_init(autoencoder, 0)
    pixels = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before, _, _ = train_family.vae_forward(autoencoder, pixels, None)
        train_family.normalise_latents(autoencoder, pixels, target_std=5.0)
        after, mean, _ = train_family.vae_forward(autoencoder, pixels, None)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(mean.std(dim=(0, 2, 3)), torch.full((4,), 5.0), atol=1e-3, rtol=0)


def test_trainable_text_encoder_matches_comfyui_and_writes_its_rows_back(train_family):
    clip = mini_models.build_clip()
    text = train_family.CaptionEncoder(clip)
    text.text_model.requires_grad_(True)
    train_family.seeded_init(text.text_model, 3)
    train_family.zero_unused_tokens(text)
    ids = torch.tensor([0, 5, 20, 40])
    with torch.no_grad():
        reference = text(ids)
    with text.trainable():  # raises if its forward differs from ComfyUI's
        encoded = text(ids)
        encoded.square().mean().backward()
        rows = text.text_model.transformer.text_model.embeddings.token_embedding.rows
        assert rows.grad is not None and rows.shape[0] == len(text.vocabulary())
        with torch.no_grad():
            rows.add_(0.5)
    torch.testing.assert_close(encoded.detach(), reference)
    table = text.text_model.transformer.get_input_embeddings().weight
    assert int((table.abs().sum(1) > 0).sum()) == len(text.vocabulary())
    with torch.no_grad():
        assert not torch.allclose(text(ids), reference)  # the changed rows are in the full table
    assert mini_models.encode(clip, "a red sneaker")[0][0].shape == (1, 77, 64)


def test_clock_follows_steps_without_a_budget_and_stops_at_the_budget(train_family):
    plain = list(train_family.Clock(50, None).steps())
    assert plain == [(step, step) for step in range(50)]
    import time

    clock = train_family.Clock(10**6, 0.05)
    started = time.monotonic()
    taken = list(clock.steps())
    assert time.monotonic() - started < 1.0 and len(taken) < 10**6
    assert all(scheduled >= step for step, scheduled in taken)
