"""DeMe's channel-wise projections: a C×C 1×1 projection after UNet blocks.

DeMe: arXiv 2410.06664; design notes in ``docs/methods.md`` (DeMe note 2).

A projection W maps a block's output h (batch, C, …) to W·h over the channel dimension; it starts as the
identity, so a freshly added projection changes nothing. Projections are named after the block whose output
they transform — ``input.<i>``, ``middle.0``, ``output.<j>`` — and stored as ``channel_projection.<block>.weight``.

Merging treats a projection like any other weight whose base value is the identity (``docs/methods.md``, Merging
note 5): its task vector is W − I, and a merged model gets I + Σ wₖ (Wₖ − I). The LoRA a range expert is trained
with stays a stock LoRA; its projections go to a *companion file* beside it
(``<lora stem>.channel_projection.safetensors``), so stock LoRA loaders still load the LoRA part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .io import SafetensorsFile, write_safetensors

PROJECTION_PREFIX = "channel_projection."
COMPANION_SUFFIX = ".channel_projection.safetensors"
_WEIGHT = ".weight"


def projection_key(block: str) -> str:
    """The key of a block's projection: ``channel_projection.<block>.weight``."""
    return f"{PROJECTION_PREFIX}{block}{_WEIGHT}"


def is_projection_key(key: str) -> bool:
    return key.startswith(PROJECTION_PREFIX)


def block_of(key: str) -> str:
    """The block name in a projection key."""
    if not (is_projection_key(key) and key.endswith(_WEIGHT)):
        raise ValueError(f"'{key}' is not a channel-projection key ('{PROJECTION_PREFIX}<block>{_WEIGHT}')")
    return key[len(PROJECTION_PREFIX) : -len(_WEIGHT)]


def identity_projections(channels: Mapping[str, int], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Identity projections {block: I_C} for the channel count of each block."""
    return {block: torch.eye(count, dtype=dtype) for block, count in channels.items()}


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W·h over the channel dimension (dim 1): a 1×1 convolution without bias."""
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"a {tuple(weight.shape)} projection cannot map {hidden.shape[1]} channels")
    return torch.einsum("oc,bc...->bo...", weight.to(dtype=hidden.dtype, device=hidden.device), hidden)


def projection_deltas(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Task-vector deltas W − I (fp32) of projections {block: W}, keyed ``channel_projection.<block>.weight``."""
    deltas = {}
    for block, weight in weights.items():
        _check_square(block, weight)
        delta = weight.detach().to(device="cpu", dtype=torch.float32, copy=True)
        deltas[projection_key(block)] = delta - torch.eye(delta.shape[0])
    return deltas


def projections_with_deltas(
    deltas: Mapping[str, torch.Tensor], strength: float = 1.0, current: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Projections after adding ``strength · Δ`` to ``current`` ones (the identity where a block has none)."""
    weights = {block: weight.detach().float().cpu() for block, weight in (current or {}).items()}
    for key, delta in deltas.items():
        block = block_of(key)
        delta = delta.detach().float().cpu()
        _check_square(block, delta)
        base = weights.get(block, torch.eye(delta.shape[0]))
        if base.shape != delta.shape:
            raise ValueError(f"projection '{block}' is {tuple(base.shape)} but its delta is {tuple(delta.shape)}")
        weights[block] = base + strength * delta
    return weights


def companion_path(lora_path: str | os.PathLike) -> Path:
    """Where the projections of a LoRA file live: ``<stem>.channel_projection.safetensors`` beside it."""
    path = Path(lora_path)
    return path.with_name(path.name.removesuffix(path.suffix) + COMPANION_SUFFIX)


def is_companion_file(name: str) -> bool:
    return str(name).lower().endswith(COMPANION_SUFFIX)


def save_projections(
    weights: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write projections {block: W} atomically as fp32 ``channel_projection.<block>.weight`` tensors."""
    tensors = {projection_key(block): weight.detach().float().cpu() for block, weight in weights.items()}
    for block, weight in weights.items():
        _check_square(block, weight)
    specs = [(key, torch.float32, tuple(tensor.shape)) for key, tensor in tensors.items()]
    return write_safetensors(path, specs, iter(tensors.items()), dict(metadata or {}))


def load_projections(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Projections {block: W} from a companion file (refusing anything that is not a square projection)."""
    file = SafetensorsFile(path)
    weights = {}
    for key in file.keys():
        weight = file[key].float()
        weights[block_of(key)] = weight
        _check_square(block_of(key), weight)
    if not weights:
        raise ValueError(f"'{Path(path).name}' holds no channel projections")
    return weights


def _check_square(block: str, weight: torch.Tensor) -> None:
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"channel projection '{block}' must be a square C×C matrix, got {tuple(weight.shape)}")
