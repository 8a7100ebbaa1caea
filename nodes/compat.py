"""The one place that knows ComfyUI versions differ (0.3.64, the floor, to 0.33.0 and later).

Every difference is detected by capability (a signature, an attribute, a dataclass field), never by a
version string, so a release in between or after behaves by what it offers. Each shim says what differs.
Nothing else in the pack branches on ComfyUI's version; tests call these shims on every supported version.

Dynamic VRAM (``ModelPatcherDynamic``, on by default on NVIDIA GPUs in newer releases) changes three
contracts the pack relies on; the shims below keep the pack on the right side of them:

- weight adapters are rebuilt as ``type(adapter)(adapter.loaded_keys, weights)`` before each use, so a
  ``WeightAdapterBase`` subclass must keep its whole state in that pair (see ``comfy_bridge.TaskVectorPatch``);
- weight wrappers are not attached to small modules (≤ 16 KB), so training, which wraps every weight, takes
  a non-dynamic patcher (:func:`training_patcher`) and runs under ``in_training`` (:func:`training_mode`);
- layers are created without weights (``None`` or on ``meta``) until ``load_state_dict`` assigns them, so
  models built in code get their values through :func:`assign_parameters`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

try:  # the versioned (stable) API; `latest` is the one still in development
    from comfy_api.v0_0_2 import ComfyExtension, io, ui
except ImportError:  # a ComfyUI that retired v0_0_2
    from comfy_api.latest import ComfyExtension, io, ui

__all__ = [
    "ComfyExtension",
    "assign_parameters",
    "checkpoint_layout",
    "complete_dit_config",
    "inner_sample_extras",
    "io",
    "is_dynamic",
    "latent_shapes_of",
    "packed_latent_shapes",
    "parameter_shapes",
    "process_conds",
    "prompt_executor",
    "run_node",
    "set_latent_shapes",
    "training_mode",
    "training_patcher",
    "ui",
]


def _accepts(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# -- sampling: packed latents (newer ComfyUI passes ``latent_shapes`` down the sampling path) -----------


def inner_sample_extras(extras: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a ``CFGGuider.inner_sample`` override received beyond the 0.3.64 ones.

    Newer ComfyUI packs several latents (e.g. video + audio) into one and passes their ``latent_shapes``;
    an override forwards exactly what it was given. Unknown arguments are refused, not dropped.
    """
    unknown = set(extras) - {"latent_shapes"}
    if unknown:
        raise TypeError(
            f"this ComfyUI passes sampling arguments diffusion-merge does not know ({', '.join(sorted(unknown))}): "
            "update diffusion-merge"
        )
    return dict(extras)


def latent_shapes_of(extras: Mapping[str, Any]) -> list | None:
    """The shapes of the latents packed into the sampled one (None where ComfyUI does not pack latents)."""
    return extras.get("latent_shapes")


def packed_latent_shapes(base_model) -> list | None:
    """The packed-latent shapes the guider set on its BaseModel for the current run (None where it sets none)."""
    return getattr(base_model, "latent_shapes", None)


def set_latent_shapes(base_model, shapes: list | None) -> None:
    """Tell another model sampled in the same run which latents are packed (as the guider does for its own)."""
    if hasattr(base_model, "latent_shapes"):
        base_model.latent_shapes = shapes


def process_conds(model, noise, conds, device, latent_image, denoise_mask, seed, latent_shapes=None):
    """``comfy.samplers.process_conds`` with ``latent_shapes`` passed where ComfyUI takes it."""
    import comfy.samplers

    extra = {"latent_shapes": latent_shapes} if _accepts(comfy.samplers.process_conds, "latent_shapes") else {}
    return comfy.samplers.process_conds(model, noise, conds, device, latent_image, denoise_mask, seed, **extra)


# -- model configs built in code -------------------------------------------------------------------

# Fields newer network classes require that older configs lack, with the value that reproduces the old
# behaviour: Flux's ``txt_ids_dims`` (which text-position axes carry ids; none for Flux.1).
_CLASSIC_FIELD_VALUES: dict[str, list] = {"txt_ids_dims": []}


def complete_dit_config(config: Mapping[str, Any], params_class) -> dict[str, Any]:
    """``config`` plus the required fields of ``params_class`` (a dataclass) that newer ComfyUI added."""
    completed = dict(config)
    for field in dataclasses.fields(params_class):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in completed and field.name in _CLASSIC_FIELD_VALUES:
            completed[field.name] = list(_CLASSIC_FIELD_VALUES[field.name])
    return completed


def parameter_shapes(module: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name → (shape, dtype) of every parameter ``module`` will have once its state dict is loaded.

    With dynamic VRAM, ComfyUI's layers start without weights: a ``Linear`` holds ``None`` (or, after a
    load that lacked it, a placeholder of another shape), an ``Embedding`` a ``meta`` tensor. Older ComfyUI
    allocates them at once. A ``Linear``'s shapes are therefore read from ``in_features``/``out_features``.
    """
    shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
    for prefix, layer in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in layer.named_parameters(recurse=False):
            shapes[dot + name] = (param.shape, param.dtype)
        if isinstance(layer, torch.nn.Linear):
            weight = getattr(layer, "weight", None)
            dtype = weight.dtype if weight is not None else _declared_dtype(layer)
            shapes[f"{dot}weight"] = (torch.Size((layer.out_features, layer.in_features)), dtype)
            if getattr(layer, "bias", None) is None and getattr(layer, "comfy_need_lazy_init_bias", False):
                shapes[f"{dot}bias"] = (torch.Size((layer.out_features,)), _declared_dtype(layer))
    return shapes


def _declared_dtype(layer: torch.nn.Module) -> torch.dtype:
    return getattr(layer, "weight_comfy_model_dtype", None) or torch.get_default_dtype()


def assign_parameters(module: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Give ``module`` these parameter values the way loaders do (``load_state_dict``), every one required.

    Writing into parameters in place would miss the layers that have no weight yet under dynamic VRAM.
    """
    expected = parameter_shapes(module)
    missing = sorted(set(expected) - set(values))
    if missing:
        raise ValueError(f"no value for {len(missing)} parameters (e.g. '{missing[0]}')")
    state = module.state_dict()
    state.update(values)
    result = module.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if k in values]
    if unexpected:
        raise ValueError(f"the module has no parameter '{unexpected[0]}'")
    for name, param in module.named_parameters():
        if param.is_meta:
            raise ValueError(f"parameter '{name}' still has no data after loading")


# -- dynamic VRAM ------------------------------------------------------------------------------------


def is_dynamic(patcher) -> bool:
    """Whether ``patcher`` loads weights through dynamic VRAM (``ModelPatcherDynamic``)."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def training_patcher(model):
    """A clone of ``model`` that loads every weight the classic way, for training.

    Dynamic VRAM attaches weight wrappers (the trainable adapters) only to modules above 16 KB, so a
    dynamic MODEL is swapped for its non-dynamic delegate (as ComfyUI does for hooks): the same patches on a
    classic patcher. The delegate reloads the base weights from the model's file.
    """
    if not is_dynamic(model):
        return model.clone()
    delegate = getattr(model, "get_non_dynamic_delegate", None)
    try:
        patcher = delegate() if delegate is not None else model.clone(disable_dynamic=True)
    except RuntimeError as error:
        raise ValueError(
            "training needs this MODEL without dynamic VRAM, and ComfyUI cannot reload it (it was not loaded "
            "by a ComfyUI loader): load it with a checkpoint or diffusion-model loader, or start ComfyUI "
            "with --disable-dynamic-vram"
        ) from error
    if is_dynamic(patcher):
        raise ValueError("ComfyUI returned a dynamic-VRAM model for training; start it with --disable-dynamic-vram")
    return patcher


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI's training flag for the duration (networks then avoid in-place ops autograd cannot undo)."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    previous, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = previous


# -- checkpoint layout -------------------------------------------------------------------------------


def checkpoint_layout(base_model, clip_sd=None, vae_sd=None) -> dict[str, torch.Tensor]:
    """ComfyUI's checkpoint layout ({key in the file: tensor}) of a BaseModel and optional CLIP/VAE dicts.

    0.3.64's ``BaseModel.state_dict_for_saving(clip, vae, …)`` reads the network's weights itself; newer
    ones take them first (``(unet_state_dict, clip, vae, …)``): a positional call there would save the
    CLIP as the UNet. Either way the values are the network's own tensors (no copies).
    """
    save = base_model.state_dict_for_saving
    if _accepts(save, "unet_state_dict"):
        return save(base_model.diffusion_model.state_dict(), clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    return save(clip_state_dict=clip_sd, vae_state_dict=vae_sd)


# -- running ComfyUI pieces in process (tests, scripts) ---------------------------------------------


def prompt_executor(server):
    """An ``execution.PromptExecutor`` with the classic cache, for running prompts in process.

    Newer ComfyUI reads RAM-cache thresholds from ``cache_args`` on every prompt; 0 disables them.
    """
    import execution

    extra = {}
    if _accepts(execution.PromptExecutor.__init__, "cache_args"):
        extra["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, **extra)


def run_node(node_class, **inputs) -> tuple:
    """Run a core node class directly and return its outputs as a tuple, V1 (``FUNCTION``) or V3 (``execute``).

    Core nodes move from V1 to V3 between releases (``SaveLoRA`` did); their input names stay.
    """
    function = getattr(node_class, "FUNCTION", None)
    if function is not None:
        result = getattr(node_class(), function)(**inputs)
        return tuple(result.get("result", ())) if isinstance(result, dict) else tuple(result or ())
    output = node_class.execute(**inputs)
    return tuple(getattr(output, "result", None) or ())
