"""Trainable adapters on a ComfyUI MODEL, switchable back to the frozen base, and gradient checkpointing.

The adapters are ComfyUI's own (``comfy.weight_adapter``: LoRA, LoHa, LoKr, OFT) on every ≥2-D weight, plus a
plain trainable difference on every 1-D weight and bias, attached to a clone with
``ModelPatcher.add_weight_wrapper``. Their parameters, named as ComfyUI's trainer names them, form a stock
LoRA dict (``….lora_up.weight``, ``….diff``, ``….diff_b``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from comfy.weight_adapter import adapter_maps

# -- adapters --------------------------------------------------------------------------------------


class AdapterSwitch:
    """Turns every trainable adapter and projection on or off (off = the frozen base network)."""

    def __init__(self):
        self.enabled = True

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


class TrainableDifference(torch.nn.Module):
    """A full trainable difference added to a 1-D weight or a bias (saved as ``.diff`` / ``.diff_b``)."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.difference = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.difference.to(weight.dtype)

    def move_to(self, device) -> int:
        self.to(device)
        return self.difference.numel() * self.difference.element_size()


class SwitchedWrapper:
    """A weight wrapper that applies a trainable adapter only while the switch is on."""

    def __init__(self, adapter, switch: AdapterSwitch):
        self.adapter, self.switch = adapter, switch

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.adapter(weight) if self.switch.enabled else weight

    def move_to(self, device) -> int:
        return self.adapter.move_to(device)


def attach_adapters(patcher, algorithm: str, rank: int, dtype: torch.dtype, switch: AdapterSwitch) -> dict:
    """Trainable adapters on every weight ComfyUI casts (``weight_function``); returns the LoRA dict of them."""
    lora: dict[str, torch.nn.Parameter] = {}
    adapter_cls = adapter_maps[algorithm]
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None:
            if weight.ndim >= 2:
                adapter = adapter_cls.create_train(weight, rank=rank, alpha=1.0).to(dtype)
                lora.update({f"{name}.{p}": value for p, value in adapter.named_parameters()})
            else:
                adapter = TrainableDifference(weight.shape, dtype, weight.device)
                lora[f"{name}.diff"] = adapter.difference
            patcher.add_weight_wrapper(f"{name}.weight", SwitchedWrapper(adapter, switch))
        if bias is not None:
            adapter = TrainableDifference(bias.shape, dtype, bias.device)
            lora[f"{name}.diff_b"] = adapter.difference
            patcher.add_weight_wrapper(f"{name}.bias", SwitchedWrapper(adapter, switch))
    if not lora:
        raise ValueError("this model has no weights ComfyUI can attach trainable adapters to")
    return lora


# -- gradient checkpointing ------------------------------------------------------------------------

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost non-container modules with parameters (containers such as the UNet's
    ``TimestepEmbedSequential`` are iterated by the network, not called, so their layers are the units)."""
    units = []
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            units += checkpoint_units(child)
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


@contextlib.contextmanager
def gradient_checkpointing(network: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each unit's activations in the backward pass instead of storing them (restored afterwards)."""
    if not enabled:
        yield
        return
    patched = []
    for unit in checkpoint_units(network):
        had_own = "forward" in vars(unit)
        original = unit.forward
        unit.forward = _checkpointed(original)
        patched.append((unit, had_own, original))
    try:
        yield
    finally:
        for unit, had_own, original in patched:
            if had_own:
                unit.forward = original
            else:
                del unit.forward


def _checkpointed(forward):
    def on_copies(*args, **kwargs):
        # Some blocks add to their input in place (Flux's in ComfyUI 0.3.64); working on a copy keeps the
        # input the checkpoint stores for recomputing the block unchanged.
        return forward(*[arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args], **kwargs)

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(on_copies, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """No gradients for the model's own parameters during training; their flags are restored afterwards."""
    flags = [(param, param.requires_grad) for param in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            if param.requires_grad != flag:
                with torch.inference_mode(param.is_inference()):  # inference tensors allow it only there
                    param.requires_grad_(flag)
