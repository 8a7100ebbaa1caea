"""ComfyUI helpers the node modules and runtimes share: what a MODEL is, how its σ scale reads, hidden inputs.

The routing, SuperDiff and training runtimes all need these; keeping them here means none of those runtimes
imports another (training no longer depends on routing).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Iterable

import comfy.model_sampling
import folder_paths
import torch

from ..merging.sampling.schedules import SigmaScale, discrete_scale, flow_scale

logger = logging.getLogger(__name__)

_PARAMETERISATIONS = (
    comfy.model_sampling.CONST,
    comfy.model_sampling.IMG_TO_IMG,
    comfy.model_sampling.X0,
    comfy.model_sampling.EDM,
    comfy.model_sampling.V_PREDICTION,
    comfy.model_sampling.EPS,
    comfy.model_sampling.COSMOS_RFLOW,
)


# -- a MODEL (ModelPatcher) -------------------------------------------------------------------------


def model_family(patcher) -> str:
    """The model's ComfyUI config class name (e.g. ``SDXL``, ``WAN22_T2V``): for messages."""
    return type(patcher.model.model_config).__name__


def weights_key(patcher) -> tuple:
    """Identifies the weights a patcher computes: its modules, its weight patches and its object patches.

    Two patchers with equal keys run the same network with the same weights (e.g. clones nobody patched).
    """
    objects = tuple(sorted((name, id(value)) for name, value in patcher.object_patches.items()))
    return id(patcher.model), patcher.patches_uuid, objects


# -- model sampling ---------------------------------------------------------------------------------


def sigma_scale(model_sampling) -> SigmaScale:
    """The :class:`SigmaScale` of a ComfyUI model-sampling object (shift and object patches included)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        scale = flow_scale(model_sampling.percent_to_sigma)
    elif type(model_sampling).timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep:
        scale = discrete_scale(model_sampling.sigmas.detach().cpu(), model_sampling.percent_to_sigma)
    else:
        scale = SigmaScale(
            model_sampling.percent_to_sigma,
            lambda timestep: float(model_sampling.sigma(torch.tensor(float(timestep)))),
            lambda sigma: float(model_sampling.timestep(torch.tensor(float(sigma)))),
        )
    sigma_max = getattr(model_sampling, "sigma_max", None)
    return scale if sigma_max is None else dataclasses.replace(scale, sigma_max=float(sigma_max))


def parameterisation(model_sampling) -> str:
    """What a model predicts, as ComfyUI's class name: EPS, V_PREDICTION, CONST (flow), EDM, …"""
    for cls in _PARAMETERISATIONS:
        if isinstance(model_sampling, cls):
            return cls.__name__
    return type(model_sampling).__name__


# -- node inputs ------------------------------------------------------------------------------------


def hidden_input(node_cls, name: str):
    """A hidden input of a V3 node (``"prompt"``, ``"unique_id"``, ``"extra_pnginfo"``), or None — also when
    the node runs outside a prompt, where ComfyUI sets no hidden values."""
    return getattr(getattr(node_cls, "hidden", None), name, None)


# -- registration (called from the extension's load hook, never at import) --------------------------


def register_folder(name: str, suffixes: Iterable[str]) -> None:
    """``models/<name>`` and ``output/<name>`` (where the pack's save nodes write) as a ComfyUI model folder of
    files with ``suffixes``; idempotent, and keeps folders other code added."""
    paths = [os.path.join(folder_paths.models_dir, name), os.path.join(folder_paths.get_output_directory(), name)]
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([], set(suffixes))
    known, known_suffixes = folder_paths.folder_names_and_paths[name]
    known_suffixes.update(suffixes)
    known.extend(p for p in paths if p not in known)


def add_get_route(path: str, handler) -> bool:
    """Add a GET route to ComfyUI's server when one is running (not in in-process tests); whether it was."""
    server = sys.modules.get("server")  # imported by main.py before custom nodes load
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        logger.debug("no PromptServer instance: %s not registered", path)
        return False
    instance.routes.get(path)(handler)
    return True


def without_missing_key_log(function, *args):
    """``function(*args)`` with the root logger at ERROR: ComfyUI logs "missing keys" for models built without a
    state dict (the demo models) or checked by the caller instead (the mini family)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return function(*args)
    finally:
        root.setLevel(level)
