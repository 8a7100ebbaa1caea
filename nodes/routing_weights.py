"""Resident weight sets for routed experts that share expert 1's modules (base, base + τ, a LoRA, a merge).

Such experts are clones of one ``ModelPatcher``: one set of modules, different weight patches. ComfyUI can hold
only one version of those weights loaded, so swapping experts through ``load_models_gpu`` unpatches the whole
network (its modules back to the offload device), then loads and patches it again — seconds for an SD-size
UNet, at every boundary of every run, and once more at the start of the next run.

:class:`ExpertWeightSets` keeps, for every such expert, its own tensors of the weights whose patches differ
from the loaded expert's, computed once by ComfyUI's own patch code (so they are exactly what a swap through
ComfyUI would load) and kept on the device. A swap then replaces those parameters in the modules and puts the
loaded expert's back afterwards: dictionary assignments, no copies, no patch computation after the first run.

ComfyUI does not know about these tensors, so they are only made while they fit (free memory after them must
still hold the sampler's activations), only while the loaded expert is fully loaded as plain tensors (not
partially offloaded, not under dynamic VRAM, no weight hooks), and dropped as soon as ComfyUI unloads the
modules or loads them partially; every other case takes the ComfyUI swap, as before.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import torch

from . import compat
from .common import weights_key

logger = logging.getLogger(__name__)

# The stand-in backup entry that keeps ComfyUI's patch code from copying a weight it will not replace.
_Backup = collections.namedtuple("_Backup", ["weight", "inplace_update"])


@dataclass
class _WeightSet:
    """One expert's tensors for the keys whose patches differ from the loaded expert's."""

    parameters: dict[str, torch.nn.Parameter]
    size: int


@dataclass
class _Swapped:
    """The loaded expert's parameters taken out of the modules while another expert's set is in."""

    model: Any
    held: dict[str, torch.nn.Parameter] = field(default_factory=dict)


class ExpertWeightSets:
    """Per routed model: the resident weight sets of its clone experts and the swap in progress."""

    def __init__(self):
        self._loaded_key: tuple | None = None  # the loaded expert the sets were made against
        self._sets: dict[tuple, _WeightSet] = {}
        self._swapped: _Swapped | None = None
        self.computed_weights = 0  # weights computed with ComfyUI's patch code (made sets), for tests and logs

    @property
    def swapped(self) -> bool:
        return self._swapped is not None

    @property
    def resident_bytes(self) -> int:
        """Memory the kept sets hold (ComfyUI does not count it)."""
        return sum(weight_set.size for weight_set in self._sets.values())

    def swap_in(self, loaded, expert, input_shape) -> bool:
        """Put ``expert``'s weights into the modules ``loaded`` holds; False when it cannot (use ComfyUI's swap)."""
        self.restore()
        if not _can_swap(loaded, expert):
            return False
        loaded_key, expert_key = weights_key(loaded), weights_key(expert)
        if loaded_key != self._loaded_key:
            self.drop()
            self._loaded_key = loaded_key
        weight_set = self._sets.get(expert_key)
        if weight_set is None:
            weight_set = self._make(loaded, expert, input_shape)
            if weight_set is None:
                return False
            self._sets[expert_key] = weight_set
        self._put(loaded.model, weight_set.parameters)
        return True

    def restore(self) -> None:
        """Give the modules the loaded expert's parameters back (a no-op when no set is swapped in)."""
        swapped, self._swapped = self._swapped, None
        if swapped is not None:
            for key, parameter in swapped.held.items():
                _set_parameter(swapped.model, key, parameter)

    def drop(self) -> None:
        """Free every set (restoring the modules first)."""
        self.restore()
        if self._sets:
            logger.debug("σ routing: dropping %d resident expert weight set(s)", len(self._sets))
        self._sets.clear()
        self._loaded_key = None

    def drop_unless_loaded(self, loaded) -> None:
        """Drop the sets unless ``loaded``'s modules are still fully loaded with its weights (before a run)."""
        if self._sets and not (weights_key(loaded) == self._loaded_key and _fully_loaded(loaded)):
            self.drop()

    def drop_if_memory_is_short(self, device) -> None:
        """After a run: keep the sets for the next run only while the free memory is at least their size, so
        what runs next (decoding, another model) does not have to push ComfyUI's own models out for them."""
        size = self.resident_bytes
        if size and mm.get_free_memory(device) < size:
            self.drop()

    # -- internals -----------------------------------------------------------------------------------------

    def _put(self, model, parameters: dict[str, torch.nn.Parameter]) -> None:
        swapped = _Swapped(model)
        self._swapped = swapped
        for key, parameter in parameters.items():
            swapped.held[key] = _set_parameter(model, key, parameter)

    def _make(self, loaded, expert, input_shape) -> _WeightSet | None:
        keys = _differing_keys(loaded, expert)
        model, device = loaded.model, loaded.load_device
        current = {key: comfy.model_patcher.get_key_weight(model, key) for key in keys}
        if any(set_func is not None or not _plain(weight, device) for weight, set_func, _ in current.values()):
            return None  # custom weight storage (quantised ops…): leave it to ComfyUI
        size = sum(weight.numel() * weight.element_size() for weight, _, _ in current.values())
        if not _fits(loaded, device, size, input_shape):
            logger.info(
                "σ routing: not keeping a second weight set of %.0f MiB resident (not enough free memory); "
                "swapping experts through ComfyUI instead",
                size / 2**20,
            )
            return None
        parameters = {}
        try:
            for key in keys:
                original = _original(loaded, key, current[key][0])
                if key in expert.patches:
                    parameters[key] = _patched_by(expert, key, original, device)
                    self.computed_weights += 1
                else:
                    parameters[key] = torch.nn.Parameter(original.to(device), requires_grad=False)
        except torch.cuda.OutOfMemoryError:
            logger.info("σ routing: out of memory while making a second weight set; swapping through ComfyUI instead")
            return None
        logger.info("σ routing: keeping a second weight set resident (%d tensors, %.0f MiB)", len(keys), size / 2**20)
        return _WeightSet(parameters, size)


def _can_swap(loaded, expert) -> bool:
    """Only weight patches differ, and the loaded expert's modules hold plain, fully loaded weights."""
    if loaded.model is not expert.model or not _fully_loaded(loaded):
        return False
    if compat.is_dynamic(loaded):  # dynamic VRAM computes weights per forward
        return False
    for patcher in (loaded, expert):
        if patcher.weight_inplace_update or patcher.hook_patches or getattr(patcher, "current_hooks", None):
            return False
    same_objects = loaded.object_patches.keys() == expert.object_patches.keys() and all(
        loaded.object_patches[name] is expert.object_patches[name] for name in loaded.object_patches
    )
    return same_objects and _same_wrappers(loaded.weight_wrapper_patches, expert.weight_wrapper_patches)


def _fully_loaded(patcher) -> bool:
    model = patcher.model
    return (
        getattr(model, "current_weight_patches_uuid", None) == patcher.patches_uuid
        and getattr(model, "model_lowvram", True) is False
        and getattr(model, "model_loaded_weight_memory", 0) > 0
    )


def _same_wrappers(one: dict, other: dict) -> bool:
    return one.keys() == other.keys() and all(_same_list(one[key], other[key]) for key in one)


def _same_list(one: list, other: list) -> bool:
    return len(one) == len(other) and all(a is b for a, b in zip(one, other, strict=True))


def _differing_keys(loaded, expert) -> list[str]:
    """The weights whose patch lists differ between the two experts (the only ones a swap changes)."""
    keys = set(loaded.patches) | set(expert.patches)
    return sorted(key for key in keys if not _same_list(loaded.patches.get(key, []), expert.patches.get(key, [])))


def _plain(weight, device) -> bool:
    """A plain tensor (no quantised or custom storage) on ``device``."""
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    device = torch.device(device)
    return weight.device.type == device.type and (device.index is None or weight.device.index == device.index)


def _fits(loaded, device, size: int, input_shape) -> bool:
    """Whether ``size`` more bytes leave room for the sampler's activations on ``device``."""
    reserve = mm.minimum_inference_memory() + loaded.memory_required(list(input_shape))
    return mm.get_free_memory(device) - size > reserve


def _original(loaded, key: str, current: torch.Tensor) -> torch.Tensor:
    """The unpatched weight: ComfyUI's backup when the loaded expert patches it, else the loaded tensor."""
    backup = loaded.backup.get(key)
    return backup.weight if backup is not None else current


def _patched_by(expert, key: str, original: torch.Tensor, device) -> torch.nn.Parameter:
    """``expert``'s weight for ``key`` as ComfyUI's loader computes it, from ``original``, with no side effects.

    ComfyUI's ``patch_weight_to_device`` reads the module's weight and writes the result into the module: the
    module holds ``original`` for the call and gets its own parameter back afterwards. A stand-in backup entry
    keeps it from copying ``original`` to the offload device when the key has none.
    """
    model = expert.model
    held = _set_parameter(model, key, torch.nn.Parameter(original, requires_grad=False))
    placeholder = key not in expert.backup
    if placeholder:
        expert.backup[key] = _Backup(original, False)
    try:
        expert.patch_weight_to_device(key, device_to=device)
        return _set_parameter(model, key, held)
    except BaseException:
        _set_parameter(model, key, held)
        raise
    finally:
        if placeholder:
            expert.backup.pop(key, None)


def _set_parameter(model, key: str, parameter: torch.nn.Parameter) -> torch.nn.Parameter:
    """Put ``parameter`` at ``key`` (e.g. ``diffusion_model.out.2.weight``); returns the one it replaces."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path)
    previous = module._parameters[name]
    module._parameters[name] = parameter  # direct: no Module.__setattr__ bookkeeping on the hot path
    return previous
