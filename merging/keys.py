"""Key names: normalising checkpoint prefixes, checking that two key sets belong together, and fingerprints
that tell whether two models match.

Inside the library every diffusion-model key is named as ComfyUI's ModelPatcher names it,
``diffusion_model.<module>.<param>``, and every text-encoder key ``text_encoders.<clip key>``, whatever
file layout it came from: files are read through :func:`unet_key_map`, and in-memory mappings (a checkpoint's
state dict with ``model.diffusion_model.`` keys) through :func:`normalised`. Two mappings whose keys would
only meet by accident (almost none shared) are refused by :func:`check_shared_keys` rather than combined as
if each held zeros where the other has values.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping

import torch

from .io import RenamedMapping, head_of

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


def normalise_key(key: str) -> str:
    """A key under the library's names: a checkpoint's ``model.diffusion_model.…`` becomes ``diffusion_model.…``;
    every other key is kept as it is."""
    return key[len("model.") :] if key.startswith(_CHECKPOINT_UNET_PREFIX) else key


def normalised(mapping: Mapping[str, torch.Tensor], source: str = "mapping") -> Mapping[str, torch.Tensor]:
    """``mapping`` under normalised key names (itself when they already are; a lazy renaming view otherwise).

    Refuses a mapping in which two keys normalise to one name (e.g. ``model.diffusion_model.x`` and
    ``diffusion_model.x``): which of the two is meant cannot be known.
    """
    keys = list(mapping.keys())
    if not any(key.startswith(_CHECKPOINT_UNET_PREFIX) for key in keys):
        return mapping
    names: dict[str, str] = {}
    for key in keys:
        name = normalise_key(key)
        if name in names:
            raise ValueError(f"{source} holds both '{names[name]}' and '{key}', which name the same parameter")
        names[name] = key
    return RenamedMapping(mapping, names)


MIN_SHARED_FRACTION = 0.5
"""Two key sets to be combined must share at least this share of the smaller one's keys."""


class KeyMismatchError(ValueError):
    """Two key→tensor mappings that should describe one model share no key, or only a few."""


def check_shared_keys(
    first: Collection[str], second: Collection[str], names: tuple[str, str], problem: str = ""
) -> None:
    """Refuse two key sets that share no key or fewer than :data:`MIN_SHARED_FRACTION` of the smaller one's.

    Combining them anyway treats every key one side lacks as a zero delta there, so a mere difference in naming
    (``model.diffusion_model.`` vs ``diffusion_model.``, a bare UNet dict) would silently change nothing. The
    message (after ``problem``, when given) names a few keys found only on each side.
    """
    first_set, second_set = set(first), set(second)
    if not first_set or not second_set:
        return
    shared = len(first_set & second_set)
    if shared >= MIN_SHARED_FRACTION * min(len(first_set), len(second_set)):
        return
    only_first, only_second = sorted(first_set - second_set), sorted(second_set - first_set)
    lead = f"{problem}: " if problem else ""
    raise KeyMismatchError(
        f"{lead}{names[0]} and {names[1]} share {shared} of their keys ({len(first_set)} and {len(second_set)} keys): "
        f"e.g. only in {names[0]}: {_examples(only_first)}; only in {names[1]}: {_examples(only_second)}. "
        f"{_naming_hint(only_first, only_second)}"
    )


def _examples(keys: list[str], count: int = 3) -> str:
    shown = ", ".join(f"'{key}'" for key in keys[:count])
    return shown + (f" (+{len(keys) - count} more)" if len(keys) > count else "")


def _naming_hint(first: list[str], second: list[str]) -> str:
    """Why two key sets may not meet: a prefix one side lacks, or different models."""
    stripped = {key.split(".", 1)[-1] for key in first} | set(first)
    if any(key.split(".", 1)[-1] in stripped or key in stripped for key in second[:1000]):
        return (
            "The names differ by a prefix: use the same layout on both sides (task vectors name diffusion-model "
            "keys 'diffusion_model.…' and text-encoder keys 'text_encoders.…'; checkpoint state dicts are "
            "normalised, bare UNet state dicts are not)."
        )
    return "Are both from the same model architecture?"


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


def state_dict_fingerprint(mapping: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``<architecture>-<weights>``: the first half matches for any two models of one architecture."""

    def head(key: str, count: int) -> torch.Tensor:
        return head_of(mapping, key, count)

    return f"{architecture_fingerprint(shapes)}-{weights_fingerprint(shapes.keys(), head)}"
