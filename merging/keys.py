"""Key names: normalising checkpoint prefixes, and fingerprints that tell whether two models match.

Inside the library every diffusion-model key is named as ComfyUI's ModelPatcher names it,
``diffusion_model.<module>.<param>``, and every text-encoder key ``text_encoders.<clip key>``, whatever
file layout it came from.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping

import torch

UNET_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIX = "text_encoders."
_CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
_DIFFUSERS_MARKERS = ("down_blocks.", "mid_block.", "up_blocks.", "transformer_blocks.0.attn.to_q")


def unet_key_map(file_keys: Iterable[str], source: str = "file") -> dict[str, str]:
    """Map a file's diffusion-model keys to ``diffusion_model.…`` names: {normalised: key in file}.

    Checkpoints (``model.diffusion_model.…``) keep only the UNet/DiT part; files already using
    ``diffusion_model.…`` are taken as they are; a bare diffusion-model file gets the prefix.
    """
    keys = list(file_keys)
    for prefix, strip in ((_CHECKPOINT_UNET_PREFIX, "model."), (UNET_PREFIX, "")):
        found = {k[len(strip) :]: k for k in keys if k.startswith(prefix)}
        if found:
            return found
    diffusers = [k for k in keys if k.startswith(_DIFFUSERS_MARKERS)]
    if diffusers:
        raise ValueError(
            f"{source}: keys are in diffusers layout ('{diffusers[0]}'); "
            "load it with a ComfyUI loader and use 'Task Vector from Models' instead"
        )
    return {UNET_PREFIX + k: k for k in keys}


def select_keys(keys: Iterable[str], pattern: str | None) -> list[str]:
    """Keys matching a regular expression (searched anywhere in the name); all keys for an empty pattern."""
    keys = list(keys)
    if not pattern or not pattern.strip():
        return keys
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"key filter '{pattern}' is not a valid regular expression: {error}") from None
    return [k for k in keys if regex.search(k)]


def architecture_fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A hash of every key name and shape: equal for two models of the same architecture."""
    digest = hashlib.sha256()
    for key in sorted(shapes):
        digest.update(f"{key}:{tuple(shapes[key])};".encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(
    keys: Iterable[str], head: Callable[[str, int], torch.Tensor], samples: int = 32, count: int = 16
) -> str:
    """A hash of the first ``count`` values of ``samples`` evenly spaced keys, rounded to fp16.

    Reading a few values per key keeps it cheap for files; rounding to fp16 makes a model loaded in fp32
    from an fp16 file print the same fingerprint as the file.
    """
    ordered = sorted(keys)
    if not ordered:
        return "empty"
    step = max(1, len(ordered) // samples)
    digest = hashlib.sha256()
    for key in ordered[::step][:samples]:
        values = head(key, count).detach().to("cpu", torch.float32).reshape(-1)[:count].to(torch.float16)
        digest.update(key.encode())
        digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(mapping: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``<architecture>-<weights>``: the first half matches for any two models of one architecture."""

    def head(key: str, count: int) -> torch.Tensor:
        if hasattr(mapping, "head"):
            return mapping.head(key, count)
        return mapping[key].reshape(-1)[:count]

    return f"{architecture_fingerprint(shapes)}-{weights_fingerprint(shapes.keys(), head)}"
