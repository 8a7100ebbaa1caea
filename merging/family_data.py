"""The mini model family's data: Fashion-MNIST, coloured garments and their captions (pure torch).

**Images.** Fashion-MNIST's 28×28 grey garments (white on black), padded to 32×32 and coloured: every
garment gets one of six named hues (jittered by up to ±``HUE_JITTER`` degrees) at a random saturation, and
pixel = intensity × colour. The brightest channel of a pixel is therefore its original intensity, which is
what the classifier reads (:func:`grey`), and the hue can be read back from the pixels
(:func:`colour_of`): class and colour are two independent concepts whose presence in a generated image can
be measured, which SuperDiff's AND of two prompts needs.

**Captions.** ``"a red sneaker"`` (colour and class), ``"sneaker"`` (class alone), ``"red"`` (colour alone)
or ``""`` (nothing: the unconditional prediction classifier-free guidance needs), drawn per image.

**Files.** The Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files in
``/usr/share/datasets/fashion-mnist``; ``DM_FASHION_MNIST`` points elsewhere.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIZE = 32  # 28×28 padded by 2 pixels on each side: 8× down-sampling gives a 4×4 latent
SOURCE_SIZE = 28

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Named colours at 60° steps of hue: far enough apart that the hue read back from pixels names one of them.
COLOUR_NAMES: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
COLOUR_HUES: tuple[float, ...] = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
HUE_JITTER = 10.0  # degrees either side of the named hue
SATURATION_RANGE = (0.7, 1.0)

# Class groups of the family's fine-tunes (indices into CLASS_NAMES).
CLASS_GROUPS: dict[str, tuple[int, ...]] = {
    "all": tuple(range(10)),
    "a": (0, 1, 2, 3, 4),  # t-shirt, trousers, pullover, dress, coat
    "b": (5, 6, 7, 8, 9),  # sandal, shirt, sneaker, bag, ankle boot
    "tops": (0, 2, 4, 6),  # t-shirt, pullover, coat, shirt
    "footwear": (5, 7, 9),  # sandal, sneaker, ankle boot
    "bags-trousers-dresses": (1, 3, 8),
}

# Share of each caption kind in training (the rest, 1 − sum, is the empty caption).
CAPTION_SHARES = {"full": 0.6, "class": 0.12, "colour": 0.12}


class DatasetMissingError(FileNotFoundError):
    """Fashion-MNIST is not installed where we look."""


def dataset_dir() -> Path:
    return Path(os.environ.get("DM_FASHION_MNIST", DEFAULT_DATASET_DIR))


def dataset_available() -> bool:
    folder = dataset_dir()
    return all((folder / f"{split}-{kind}.gz").is_file() for split in ("train", "t10k") for kind in _FILES)


_FILES = ("images-idx3-ubyte", "labels-idx1-ubyte")


def _read_idx(path: Path, magic: int, dims: int) -> torch.Tensor:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    header = struct.unpack(">" + "I" * (1 + dims), data[: 4 * (1 + dims)])
    if header[0] != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {header[0]}, expected {magic})")
    shape = header[1:]
    body = data[4 * (1 + dims) :]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path} is truncated: {len(body)} bytes for shape {shape}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``"train"`` (60 000) or ``"test"`` (10 000)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not '{split}'")
    folder, prefix = dataset_dir(), "train" if split == "train" else "t10k"
    images_path, labels_path = (folder / f"{prefix}-{kind}.gz" for kind in _FILES)
    if not (images_path.is_file() and labels_path.is_file()):
        raise DatasetMissingError(
            f"Fashion-MNIST is not in {folder}: run `bash scripts/setup_dataset.sh` (installs the Debian package "
            "dataset-fashion-mnist), or set DM_FASHION_MNIST to a folder with its four .gz IDX files"
        )
    images = _read_idx(images_path, 2051, 3)
    labels = _read_idx(labels_path, 2049, 1).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path.name} has {images.shape[0]} images but {labels_path.name} has {labels.shape[0]}"
        )
    return images, labels


def pad_to_size(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] → float [N, 1, 32, 32] in [0, 1] (black border)."""
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    grey = images.float().div(255.0).unsqueeze(1)
    return torch.nn.functional.pad(grey, (pad, pad, pad, pad))


# -- colour ------------------------------------------------------------------------------------------


def hsv_to_rgb(hue_degrees: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """[N] hue (degrees) and saturation → [N, 3] RGB at value 1."""
    h = (hue_degrees % 360.0) / 60.0
    k = torch.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], dim=-1)  # R, G, B
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0.0, 1.0)
    return 1.0 - saturation.unsqueeze(-1) * ramp


def colourise(grey: torch.Tensor, colours: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[N, 1, H, W] intensities and [N] colour indices → [N, 3, H, W] RGB in [0, 1] (jittered hue and saturation)."""
    count = grey.shape[0]
    centres = torch.tensor(COLOUR_HUES)[colours]
    hue = centres + (torch.rand(count, generator=generator) * 2 - 1) * HUE_JITTER
    low, high = SATURATION_RANGE
    saturation = low + (high - low) * torch.rand(count, generator=generator)
    rgb = hsv_to_rgb(hue, saturation)
    return grey * rgb[:, :, None, None]


def grey(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB → [N, 1, H, W]: the brightest channel, i.e. the garment's intensity before colouring."""
    return images.amax(dim=1, keepdim=True)


@dataclass(frozen=True)
class HueReading:
    colour: torch.Tensor  # [N] index into COLOUR_NAMES (nearest named hue)
    hue: torch.Tensor  # [N] degrees, the chroma-weighted circular mean
    chroma: torch.Tensor  # [N] mean chroma of the garment's pixels (≈ 0: grey, no colour to read)


def colour_of(images: torch.Tensor, threshold: float = 0.15) -> HueReading:
    """The colour of each garment read from its pixels ([N, 3, H, W] RGB in [0, 1]).

    Per pixel, hue and chroma (max − min) as in HSV; the image's hue is the circular mean of the pixels'
    hues weighted by chroma, over pixels brighter than ``threshold``, and it names the nearest of
    ``COLOUR_HUES``.
    """
    images = images.float().clamp(0, 1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    chroma = high - low
    r, g, b = images.unbind(dim=1)
    # The hue angle from the standard hexagon projection (atan2 form, exact for the six primaries).
    angle = torch.rad2deg(torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b))
    weight = chroma * (high > threshold)
    radians = torch.deg2rad(angle)
    x = (weight * torch.cos(radians)).flatten(1).sum(1)
    y = (weight * torch.sin(radians)).flatten(1).sum(1)
    hue = torch.rad2deg(torch.atan2(y, x)) % 360.0
    garment = (high > threshold).flatten(1).float()
    mean_chroma = (chroma.flatten(1) * garment).sum(1) / garment.sum(1).clamp_min(1.0)
    centres = torch.tensor(COLOUR_HUES)
    distance = ((hue[:, None] - centres[None, :] + 180.0) % 360.0 - 180.0).abs()
    return HueReading(distance.argmin(dim=1), hue, mean_chroma)


# -- captions ----------------------------------------------------------------------------------------


def caption(class_index: int | None, colour_index: int | None) -> str:
    """ "a red sneaker", "sneaker", "red" or "" (either part may be None)."""
    if class_index is not None and colour_index is not None:
        return f"a {COLOUR_NAMES[colour_index]} {CLASS_NAMES[class_index]}"
    if class_index is not None:
        return CLASS_NAMES[class_index]
    if colour_index is not None:
        return COLOUR_NAMES[colour_index]
    return ""


def all_captions() -> list[str]:
    """Every caption the family was trained on (its vocabulary), the empty one first."""
    captions = ["", *COLOUR_NAMES, *CLASS_NAMES]
    captions += [caption(k, c) for k in range(len(CLASS_NAMES)) for c in range(len(COLOUR_NAMES))]
    return captions


def draw_caption_ids(labels: torch.Tensor, colours: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, the index into :func:`all_captions` of a caption drawn with ``CAPTION_SHARES``."""
    captions = all_captions()
    index = {text: i for i, text in enumerate(captions)}
    draw = torch.rand(labels.shape[0], generator=generator)
    full, cls, col = CAPTION_SHARES["full"], CAPTION_SHARES["class"], CAPTION_SHARES["colour"]
    ids = []
    for u, label, colour in zip(draw.tolist(), labels.tolist(), colours.tolist(), strict=True):
        if u < full:
            text = caption(label, colour)
        elif u < full + cls:
            text = caption(label, None)
        elif u < full + cls + col:
            text = caption(None, colour)
        else:
            text = ""
        ids.append(index[text])
    return torch.tensor(ids, dtype=torch.long)


def class_colour_prompts(classes, per_class: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(prompts "a <colour> <garment>", target classes, target colours): ``per_class`` prompts per class, the
    colours cycling so that every (class, colour) pair occurs as evenly as the count allows."""
    prompts, targets, colours = [], [], []
    for k in classes:
        for i in range(per_class):
            colour = (k + i) % len(COLOUR_NAMES)
            prompts.append(caption(k, colour))
            targets.append(k)
            colours.append(colour)
    return prompts, torch.tensor(targets, dtype=torch.long), torch.tensor(colours, dtype=torch.long)


@dataclass
class ColouredSplit:
    """A split coloured with a fixed seed: images [N, 3, 32, 32] in [0, 1], labels [N], colours [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    colours: torch.Tensor

    def subset(self, classes: tuple[int, ...]) -> ColouredSplit:
        keep = torch.isin(self.labels, torch.tensor(classes))
        return ColouredSplit(self.images[keep], self.labels[keep], self.colours[keep])


def coloured_split(split: str, seed: int = 0, limit: int | None = None) -> ColouredSplit:
    """Fashion-MNIST ``split`` (optionally its first ``limit`` images), each garment in a seeded colour."""
    images, labels = load_split(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(len(COLOUR_NAMES), (labels.shape[0],), generator=generator)
    return ColouredSplit(colourise(pad_to_size(images), colours, generator), labels, colours)
