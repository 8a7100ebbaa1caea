"""Measuring the mini family's pictures: a Fashion-MNIST classifier and the metrics built on it (pure torch).

The classifier is a small CNN trained in-house on the training split (``scripts/family/train_family.py
classifier``); it reads the grey intensity of a picture (the brightest channel, see
:func:`~.family_data.grey`), so it works on coloured garments. Metrics of a batch of generated pictures:

- **class accuracy**: share of pictures the classifier assigns to the prompted class;
- **coverage**: share of the classes that at least ``min_share`` of the pictures fall into (mode coverage
  of an unconditional or OR-composed sampler), and the entropy of the predicted class histogram;
- **confidence**: mean classifier probability of the prompted class (or of the predicted one);
- **classifier FID**: the Fréchet distance between Gaussians fitted to the classifier's penultimate-layer
  features (128-d) of two picture sets. It follows FID's formula but in *this* classifier's feature space:
  it is **not Inception FID** and its values are not comparable with published FID numbers;
- **colour accuracy**: share of pictures whose hue (read from the pixels) is the prompted colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .family_data import CLASS_NAMES, colour_of, grey, load_split, pad_to_size
from .io import SafetensorsFile, write_safetensors

FEATURES = 128


class FashionClassifier(torch.nn.Module):
    """Three 3×3 conv blocks (32-64-128 channels, max-pool) and a 128-unit head; input [N, 1, 32, 32] in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 128, 3, padding=1)
        self.hidden = torch.nn.Linear(128 * 4 * 4, FEATURES)
        self.dropout = torch.nn.Dropout(0.3)
        self.out = torch.nn.Linear(FEATURES, len(CLASS_NAMES))

    def features(self, grey_images: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (after ReLU): what classifier FID compares."""
        x = (grey_images - 0.5) / 0.5
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, grey_images: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.features(grey_images)))


def save_classifier(model: FashionClassifier, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    write_safetensors(path, specs, iter(state.items()), metadata or {})


def load_classifier(path: Path) -> FashionClassifier:
    model = FashionClassifier()
    file = SafetensorsFile(path)
    expected = model.state_dict()
    if set(file.keys()) != set(expected):
        raise ValueError(f"{path} is not a mini-family classifier: its keys differ from FashionClassifier's")
    model.load_state_dict({k: file[k].float() for k in expected})
    return model.eval()


@dataclass
class Predictions:
    probabilities: torch.Tensor  # [N, 10]
    features: torch.Tensor  # [N, 128]

    @property
    def classes(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)


@torch.no_grad()
def predict(classifier: FashionClassifier, images: torch.Tensor, batch: int = 500) -> Predictions:
    """Class probabilities and penultimate features of [N, 3 or 1, 32, 32] pictures in [0, 1]."""
    if images.ndim != 4 or images.shape[-2:] != (32, 32):
        raise ValueError(f"pictures must be [N, C, 32, 32], got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("the pictures contain NaN or infinite values")
    intensities = grey(images.float()) if images.shape[1] == 3 else images.float()
    probabilities, features = [], []
    for start in range(0, intensities.shape[0], batch):
        chunk = intensities[start : start + batch]
        feats = classifier.features(chunk)
        features.append(feats)
        probabilities.append(classifier.out(feats).softmax(dim=1))
    return Predictions(torch.cat(probabilities), torch.cat(features))


def class_accuracy(predictions: Predictions, targets: torch.Tensor) -> float:
    return float((predictions.classes == targets).float().mean())


def confidence(predictions: Predictions, targets: torch.Tensor | None = None) -> float:
    """Mean probability of the target class (of the predicted class when no targets are given)."""
    probs = predictions.probabilities
    chosen = probs.max(dim=1).values if targets is None else probs.gather(1, targets[:, None]).squeeze(1)
    return float(chosen.mean())


def class_histogram(predictions: Predictions) -> torch.Tensor:
    return torch.bincount(predictions.classes, minlength=len(CLASS_NAMES)).float() / predictions.classes.numel()


def coverage(predictions: Predictions, min_share: float = 0.02) -> float:
    """Share of the 10 classes that receive at least ``min_share`` of the pictures."""
    return float((class_histogram(predictions) >= min_share).float().mean())


def class_entropy(predictions: Predictions) -> float:
    """Entropy (nats) of the predicted-class histogram; log 10 ≈ 2.303 is a perfectly even spread."""
    histogram = class_histogram(predictions)
    nonzero = histogram[histogram > 0]
    return float(-(nonzero * nonzero.log()).sum())


def colour_accuracy(images: torch.Tensor, target_colours: torch.Tensor) -> float:
    return float((colour_of(images).colour == target_colours).float().mean())


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of [N, D] features."""
    feats = features.double()
    if feats.shape[0] < 2:
        raise ValueError("classifier FID needs at least two pictures per set")
    return feats.mean(0), torch.cov(feats.T)


def frechet_distance(stats_a, stats_b) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) for two (mean, covariance) pairs.

    tr (Σ_a Σ_b)^½ is computed as the sum of square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½ (symmetric
    positive semi-definite, so the eigenvalues are real; tiny negative ones from rounding are clipped).
    """
    (mean_a, cov_a), (mean_b, cov_b) = stats_a, stats_b
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return float(distance)


def classifier_fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance in the classifier's feature space (not Inception FID; see the module docstring)."""
    return frechet_distance(feature_statistics(features_a), feature_statistics(features_b))


def reference_features(classifier: FashionClassifier, limit: int | None = None) -> torch.Tensor:
    """Penultimate features of Fashion-MNIST's test split (the first ``limit`` images): the reference set of
    classifier FID. Colour does not matter (the classifier reads intensities)."""
    images, _ = load_split("test")
    return predict(classifier, pad_to_size(images[:limit])).features


def evaluate(
    classifier: FashionClassifier,
    images: torch.Tensor,
    target_classes: torch.Tensor | None = None,
    target_colours: torch.Tensor | None = None,
    reference_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric that applies to one batch of generated pictures, as a flat dict of floats."""
    predictions = predict(classifier, images)
    result = {
        "count": float(images.shape[0]),
        "coverage": coverage(predictions),
        "class_entropy": class_entropy(predictions),
        "confidence_predicted": confidence(predictions),
    }
    if target_classes is not None:
        result["class_accuracy"] = class_accuracy(predictions, target_classes)
        result["confidence_target"] = confidence(predictions, target_classes)
    if target_colours is not None:
        result["colour_accuracy"] = colour_accuracy(images, target_colours)
    if reference_features is not None:
        result["classifier_fid"] = classifier_fid(predictions.features, reference_features)
    return result
