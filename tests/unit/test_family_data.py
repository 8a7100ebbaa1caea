"""The mini family's data and metrics (no ComfyUI): colouring and reading colours back, captions, Fréchet
distance, coverage, the IDX reader, and the committed classifier on the real test split (when installed)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import pytest
import torch

from diffusion_merge.merging import family_data as data
from diffusion_merge.merging import family_metrics as metrics
from diffusion_merge.merging.io import write_safetensors

CLASSIFIER = Path(__file__).resolve().parents[2] / "mini_models" / "classifier.safetensors"


def garments(count: int, seed: int = 0) -> torch.Tensor:
    """Grey blobs [count, 1, 32, 32] in [0, 1] with a bright core (stand-ins for garments)."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centres = 10 + 12 * torch.rand(count, 2, generator=generator)
    distance = (y - centres[:, 0, None, None]) ** 2 + (x - centres[:, 1, None, None]) ** 2
    texture = 0.6 + 0.4 * torch.rand(count, 32, 32, generator=generator)
    return (torch.exp(-distance / 40.0) * texture).unsqueeze(1)


def test_hsv_primaries_and_saturation():
    hues = torch.tensor(data.COLOUR_HUES)
    rgb = data.hsv_to_rgb(hues, torch.ones(6))
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(rgb, expected)
    torch.testing.assert_close(data.hsv_to_rgb(hues, torch.zeros(6)), torch.ones(6, 3))


def test_colouring_keeps_the_intensity_in_the_brightest_channel_and_the_colour_reads_back():
    grey = garments(120)
    colours = torch.arange(120) % 6
    coloured = data.colourise(grey, colours, torch.Generator().manual_seed(1))
    torch.testing.assert_close(data.grey(coloured), grey)
    reading = data.colour_of(coloured)
    assert torch.equal(reading.colour, colours)
    centres = torch.tensor(data.COLOUR_HUES)[colours]
    hue_error = ((reading.hue - centres + 180) % 360 - 180).abs()
    assert hue_error.max() <= data.HUE_JITTER + 3  # the hexagon hue differs from HSV's by a few degrees
    assert (reading.chroma > 0.2).all()


def test_grey_pictures_have_no_chroma():
    assert (data.colour_of(garments(4).expand(-1, 3, -1, -1)).chroma < 1e-6).all()


def test_captions_cover_every_combination_once_and_draws_follow_the_shares():
    captions = data.all_captions()
    assert len(captions) == len(set(captions)) == 1 + 6 + 10 + 60
    assert captions[0] == "" and "a red sneaker" in captions and "ankle boot" in captions and "cyan" in captions
    labels = torch.randint(10, (4000,), generator=torch.Generator().manual_seed(0))
    colours = torch.randint(6, (4000,), generator=torch.Generator().manual_seed(1))
    ids = data.draw_caption_ids(labels, colours, torch.Generator().manual_seed(2))
    drawn = [captions[i] for i in ids.tolist()]
    full = sum(text.startswith("a ") for text in drawn) / len(drawn)
    empty = sum(text == "" for text in drawn) / len(drawn)
    assert abs(full - data.CAPTION_SHARES["full"]) < 0.03
    assert abs(empty - (1 - sum(data.CAPTION_SHARES.values()))) < 0.03
    for text, label, colour in zip(drawn, labels.tolist(), colours.tolist(), strict=True):
        assert text in ("", data.caption(label, colour), data.caption(label, None), data.caption(None, colour))


def test_class_colour_prompts_cycle_colours_per_class():
    prompts, targets, colours = data.class_colour_prompts([7, 8], per_class=7)
    assert prompts[0] == "a yellow sneaker" and prompts[7] == "a green bag"
    assert targets.tolist() == [7] * 7 + [8] * 7
    assert sorted(colours[:6].tolist()) == list(range(6)) and colours[6] == colours[0]


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=generator) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=generator) * torch.tensor([2.0, 1.0, 0.5]) + torch.tensor([1.0, 0, 0])
    stats_a, stats_b = metrics.feature_statistics(a), metrics.feature_statistics(b)
    # exact: |Δμ|² + Σ (σa − σb)² = 1 + 1 + 1 + 0 for the true parameters
    assert metrics.frechet_distance(stats_a, stats_b) == pytest.approx(3.0, abs=0.15)
    assert metrics.frechet_distance(stats_a, stats_a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        metrics.feature_statistics(a[:1])


def predictions_of(classes: list[int]) -> metrics.Predictions:
    probabilities = torch.nn.functional.one_hot(torch.tensor(classes), 10).float() * 0.9 + 0.01
    return metrics.Predictions(probabilities, torch.zeros(len(classes), metrics.FEATURES))


def test_coverage_entropy_and_confidence():
    even = predictions_of(list(range(10)) * 5)
    assert metrics.coverage(even) == 1.0
    assert metrics.class_entropy(even) == pytest.approx(math.log(10))
    one_class = predictions_of([3] * 50)
    assert metrics.coverage(one_class) == pytest.approx(0.1)
    assert metrics.class_entropy(one_class) == pytest.approx(0.0)
    targets = torch.full((50,), 3)
    assert metrics.class_accuracy(one_class, targets) == 1.0
    assert metrics.confidence(one_class, targets) == pytest.approx(0.91)
    assert metrics.confidence(one_class, torch.zeros(50, dtype=torch.long)) == pytest.approx(0.01)


def test_classifier_refuses_bad_pictures_and_files(tmp_path):
    classifier = metrics.FashionClassifier().eval()
    with pytest.raises(ValueError, match=r"\[N, C, 32, 32\]"):
        metrics.predict(classifier, torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        metrics.predict(classifier, torch.full((2, 3, 32, 32), float("nan")))
    path = tmp_path / "other.safetensors"
    write_safetensors(path, [("weight", torch.float32, (2,))], iter([("weight", torch.zeros(2))]), {})
    with pytest.raises(ValueError, match="not a mini-family classifier"):
        metrics.load_classifier(path)


def write_idx(path, magic: int, array: torch.Tensor) -> None:
    header = struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.to(torch.uint8).numpy().tobytes())


def test_idx_reader_and_a_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("DM_FASHION_MNIST", str(tmp_path))
    with pytest.raises(data.DatasetMissingError, match=r"setup_dataset\.sh"):
        data.load_split("train")
    images = torch.randint(256, (5, 28, 28), generator=torch.Generator().manual_seed(0))
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 2049, torch.arange(5))
    loaded, labels = data.load_split("test")
    assert torch.equal(loaded, images.to(torch.uint8)) and labels.tolist() == [0, 1, 2, 3, 4]
    assert data.dataset_available()
    split = data.coloured_split("train", seed=3)
    assert split.images.shape == (5, 3, 32, 32) and torch.equal(split.subset((1, 2)).labels, torch.tensor([1, 2]))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2051, torch.arange(5))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.load_split("train")


@pytest.mark.skipif(not data.dataset_available(), reason="Fashion-MNIST not installed (bash scripts/setup_dataset.sh)")
def test_committed_classifier_recognises_the_test_split():
    images, labels = data.load_split("test")
    classifier = metrics.load_classifier(CLASSIFIER)
    predictions = metrics.predict(classifier, data.pad_to_size(images[:2000]))
    assert metrics.class_accuracy(predictions, labels[:2000]) >= 0.88
    coloured = data.coloured_split("test", seed=0, limit=500)  # colour does not change its answer
    assert metrics.class_accuracy(metrics.predict(classifier, coloured.images), coloured.labels) >= 0.86
    real = metrics.reference_features(classifier, limit=1000)
    other = metrics.predict(classifier, data.pad_to_size(images[1000:2000])).features
    shuffled = metrics.predict(classifier, data.pad_to_size(images[:1000]).flip(2)).features
    assert metrics.classifier_fid(real, other) < metrics.classifier_fid(real, shuffled)
