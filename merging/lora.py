"""LoRA / LoCon factors → full weight deltas (pure torch).

A LoRA stores ΔW = (α / r) · up · down per module, with ``up`` (out, r[, 1, 1]) and ``down``
(r, in[, kh, kw]); LoCon uses the same pair on convolutions. Other LyCORIS kinds (LoHa, LoKr, DoRA,
Tucker ``mid`` factors) are expanded by ComfyUI's own weight adapters in the node layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

import torch

_PAIR_NAMES = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"))


def lora_delta(
    up: torch.Tensor,
    down: torch.Tensor,
    alpha: float | torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(α / rank) · up @ down in fp32, reshaped to the target weight's shape (conv kernels included)."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    up32 = up.to(device=device, dtype=torch.float32).reshape(up.shape[0], -1)
    down32 = down.to(device=device, dtype=torch.float32).reshape(rank, -1)
    delta = scale * (up32 @ down32)
    out_shape = shape if shape is not None else (up.shape[0], *down.shape[1:])
    return delta.reshape(out_shape)


class LoraParts(TypedDict):
    up: torch.Tensor
    down: torch.Tensor
    alpha: torch.Tensor | None


def lora_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraParts]:
    """Group a LoRA file's tensors by module: {module: {"up", "down", "alpha"}} (plain LoRA/LoCon only)."""
    modules: dict[str, LoraParts] = {}
    for key in state_dict:
        for up_name, down_name in _PAIR_NAMES:
            if key.endswith("." + up_name):
                module = key[: -len(up_name) - 1]
                down_key = f"{module}.{down_name}"
                if down_key not in state_dict:
                    raise ValueError(f"LoRA key '{key}' has no matching '{down_key}'")
                alpha_key = f"{module}.alpha"
                modules[module] = {
                    "up": state_dict[key],
                    "down": state_dict[down_key],
                    "alpha": state_dict.get(alpha_key),
                }
    return modules


def lora_deltas(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module name as in the file: fp32 ΔW} for every plain LoRA/LoCon pair in a LoRA state dict."""
    return {
        module: lora_delta(parts["up"], parts["down"], parts["alpha"])
        for module, parts in lora_modules(state_dict).items()
    }
