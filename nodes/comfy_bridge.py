"""Translation between ComfyUI objects (ModelPatcher, CLIP, model folders) and the ``merging`` library."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter import LoRAAdapter, WeightAdapterBase

from ..merging import ComputedDeltas, StoredDeltas, TaskVector, lora_delta
from ..merging.buffers import ByteMemory
from ..merging.channel_projection import companion_path, is_projection_key, load_projections, projection_deltas
from ..merging.io import RenamedMapping, SafetensorsFile, file_fingerprint
from ..merging.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, check_shared_keys, state_dict_fingerprint
from . import projection
from .common import register_folder

logger = logging.getLogger(__name__)

TASK_VECTOR_FOLDER = "task_vectors"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# -- model weights as key→tensor mappings -----------------------------------------------------------


class PatchedWeights(Mapping[str, torch.Tensor]):
    """The effective weights of a ModelPatcher (its own patches applied), one key at a time.

    A MODEL coming out of a LoRA loader or a merge node shares its tensors with its parent and carries
    the change as patches; reading ``state_dict()`` would miss it. Unpatched keys are returned as the
    stored tensor itself (no copy).
    """

    def __init__(self, patcher, prefix: str = UNET_PREFIX, rename: str = "", device: torch.device | None = None):
        key_patches = patcher.get_key_patches(prefix or None)
        self._entries = {rename + k: (k, v) for k, v in key_patches.items() if _is_float(v[0][0])}
        self._device = device

    def __getitem__(self, key: str) -> torch.Tensor:
        original_key, (stored, *patches) = self._entries[key]
        weight, convert = stored
        if not patches:
            return weight
        device = self._device or weight.device
        weight = convert(mm.cast_to_device(weight, device, torch.float32, copy=True), inplace=True)
        return comfy.lora.calculate_weight(patches, weight, original_key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries  # Mapping's default would compute the patched weight

    def read(self, key: str, buffer: ByteMemory) -> torch.Tensor:
        return self[key]  # computed in memory, not read from a file

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][1][0][0].shape)

    def head(self, key: str, count: int) -> torch.Tensor:
        return self[key].reshape(-1)[:count]


def _is_float(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point()


def model_weights(model) -> PatchedWeights:
    """A MODEL's diffusion-model weights under ``diffusion_model.…`` names."""
    return PatchedWeights(model, UNET_PREFIX)


def model_fingerprint(model) -> str:
    """The base fingerprint (:func:`merging.keys.state_dict_fingerprint`) of a MODEL's effective diffusion-model
    weights."""
    weights = model_weights(model)
    return state_dict_fingerprint(weights, {key: weights.shape_of(key) for key in weights})


def clip_weights(clip) -> Mapping[str, torch.Tensor]:
    """A CLIP's text-encoder weights and biases under ``text_encoders.…`` names."""
    weights = PatchedWeights(clip.patcher, prefix="", rename=TEXT_ENCODER_PREFIX)
    kept = {k: k for k in weights if k.endswith((".weight", ".bias"))}
    return RenamedMapping(weights, kept)


# -- applying a task vector lazily ------------------------------------------------------------------


class TaskVectorPatch(WeightAdapterBase):
    """A weight patch that adds ``strength · τ[key]`` when ComfyUI computes the patched weight.

    Nothing is computed when the patch is added; ComfyUI calls this when it loads the model (or, for
    modules kept off the GPU in low-VRAM mode, at each forward).

    ComfyUI's dynamic VRAM rebuilds every adapter before use as ``type(adapter)(adapter.loaded_keys,
    weights)``, where ``weights`` is ``adapter.weights`` with its tensors moved (tuples and lists are rebuilt,
    other objects kept). So the whole state is that pair: ``weights`` is ``(task vector, key)``, and no
    tensor is staged ahead (the delta is computed on the weight's device when it is needed).
    """

    name = "diffusion_merge.task_vector"

    def __init__(self, loaded_keys, weights):
        vector, key = weights if isinstance(weights, (tuple, list)) and len(weights) == 2 else (None, None)
        if not isinstance(vector, TaskVector) or not isinstance(key, str):
            raise TypeError("TaskVectorPatch takes (loaded_keys, (task vector, key)); use TaskVectorPatch.of")
        self.loaded_keys: set[str] = set(loaded_keys)
        self.weights = (vector, key)

    @classmethod
    def of(cls, vector: TaskVector, key: str) -> TaskVectorPatch:
        """The patch adding ``vector``'s delta of ``key`` (a ``diffusion_model.…`` or ``text_encoders.…`` name)."""
        return cls(set(), (vector, key))

    @property
    def vector(self) -> TaskVector:
        return self.weights[0]

    @property
    def key(self) -> str:
        return self.weights[1]

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        delta = self.vector.delta(self.key, weight.device)
        if offset is not None:
            delta = delta.narrow(offset[0], offset[1], offset[2])
        weight += function(strength * delta).to(weight.dtype)
        return weight


def apply_to_model(model, vector: TaskVector, strength: float):
    """A clone of ``model`` with lazy patches adding ``strength · τ``; returns (clone, patched key count).

    Channel-projection keys (DeMe) are deltas W − I: the clone's projections become W + strength · τ, the
    identity where the model had none.
    """
    patched = model.clone()
    patches = {k: TaskVectorPatch.of(vector, k) for k in vector.keys() if k.startswith(UNET_PREFIX)}
    accepted = patched.add_patches(patches, strength)
    projection_keys = [k for k in vector.keys() if is_projection_key(k)]
    if projection_keys:
        projection.add_projection_deltas(patched, {k: vector.delta(k, "cpu") for k in projection_keys}, strength)
    return patched, len(accepted) + len(projection_keys)


def projection_task_vector(finetuned, base) -> TaskVector | None:
    """τ of the channel projections two MODELs carry ((W_ft − I) − (W_base − I)); None when neither has any."""
    tuned, original = projection.projections_of(finetuned), projection.projections_of(base)
    if not tuned and not original:
        return None
    tuned_deltas, base_deltas = projection_deltas(tuned), projection_deltas(original)
    deltas: dict[str, torch.Tensor] = {}
    for key in sorted(set(tuned_deltas) | set(base_deltas)):
        one, other = tuned_deltas.get(key), base_deltas.get(key)
        if one is not None and other is not None and one.shape != other.shape:
            raise ValueError(
                f"projection '{key}' is {tuple(one.shape)} in the fine-tune but {tuple(other.shape)} in the base"
            )
        if one is not None and other is not None:
            deltas[key] = one - other
        elif one is not None:
            deltas[key] = one
        elif other is not None:
            deltas[key] = -other
    return TaskVector(((1.0, StoredDeltas(deltas, "channel projections")),))


def apply_to_clip(clip, vector: TaskVector, strength: float):
    """A clone of ``clip`` with the task vector's ``text_encoders.…`` keys applied lazily."""
    patched = clip.clone()
    patches = {
        k[len(TEXT_ENCODER_PREFIX) :]: TaskVectorPatch.of(vector, k)
        for k in vector.keys()
        if k.startswith(TEXT_ENCODER_PREFIX)
    }
    accepted = patched.add_patches(patches, strength)
    return patched, len(accepted)


def check_compatible(model, vector: TaskVector, what: str = "model") -> None:
    """Refuse a task vector most of whose keys the model lacks, or whose shapes differ, naming keys."""
    weights = model_weights(model)
    unet_keys = [k for k in vector.keys() if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if k not in weights]
    check_shared_keys(
        unet_keys, weights.keys(), ("the task vector", f"this {what}"), f"the task vector does not fit this {what}"
    )
    for key in unet_keys:
        if key in weights and weights.shape_of(key) != vector.shape(key):
            raise ValueError(
                f"task vector key '{key}' is {vector.shape(key)} but the {what} has {weights.shape_of(key)} "
                "— were both extracted from the same architecture?"
            )
    if missing:
        logger.warning(
            "%d task-vector keys are not in the %s (e.g. '%s'); they are ignored",
            len(missing),
            what,
            missing[0],
        )


# -- LoRA files -------------------------------------------------------------------------------------


def lora_task_vector(path: str, model, clip=None) -> TaskVector:
    """A LoRA file's full deltas as a lazy task vector, mapped onto ``model``'s (and ``clip``'s) keys.

    ComfyUI's own key mapping and adapters decide what the stock loader would apply; plain LoRA/LoCon
    pairs are expanded by :func:`merging.lora_delta`, every other kind (LoHa, LoKr, DoRA, OFT, diffs)
    by ComfyUI's adapter against the base weight.
    """
    file = SafetensorsFile(path)
    lora = {k: file[k] for k in file}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    targets = {UNET_PREFIX: model_weights(model)}
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        targets[""] = PatchedWeights(clip.patcher, prefix="")
    patch_dict = comfy.lora.load_lora(lora, key_map, log_missing=False)
    if not patch_dict:
        raise ValueError(f"'{Path(path).name}': no key of this LoRA matches the model — wrong architecture?")
    shapes, patches = {}, {}
    for model_key, patch in patch_dict.items():
        if not isinstance(model_key, str):
            continue
        name = model_key if model_key.startswith(UNET_PREFIX) else TEXT_ENCODER_PREFIX + model_key
        weights = targets[UNET_PREFIX] if model_key.startswith(UNET_PREFIX) else targets[""]
        shapes[name], patches[name] = weights.shape_of(model_key), (model_key, patch, weights)

    def compute(name: str, device) -> torch.Tensor:
        model_key, patch, weights = patches[name]
        if isinstance(patch, LoRAAdapter) and _is_plain_lora(patch):
            up, down, alpha = patch.weights[:3]
            return lora_delta(up, down, alpha, shapes[name], device)
        base = weights[model_key].to(device=device, dtype=torch.float32)
        patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), model_key)
        return patched - base

    vector = TaskVector(
        ((1.0, ComputedDeltas(shapes, compute, Path(path).name)),),
        base_fingerprint=model_fingerprint(model),
        sources=(Path(path).name,),
    )
    companion = companion_path(path)
    if companion.is_file():  # DeMe channel projections trained with the LoRA: their τ is W − I
        deltas = projection_deltas(load_projections(companion))
        vector = vector.join(TaskVector(((1.0, StoredDeltas(deltas, companion.name)),), sources=(companion.name,)))
    return vector


def _is_plain_lora(adapter: LoRAAdapter) -> bool:
    _up, _down, _alpha, mid, dora_scale, reshape = adapter.weights
    return mid is None and dora_scale is None and reshape is None


# -- files and folders ------------------------------------------------------------------------------


def register_task_vector_folder() -> None:
    """``models/task_vectors`` (and ``output/task_vectors``, where the save node writes) as a model folder."""
    register_folder(TASK_VECTOR_FOLDER, SAFETENSORS_SUFFIXES)


def safetensors_choices(*folders: str) -> list[str]:
    """Safetensors files in ComfyUI model folders (first folder wins on duplicate names)."""
    names: list[str] = []
    for folder in folders:
        for name in folder_paths.get_filename_list(folder):
            if name.lower().endswith(SAFETENSORS_SUFFIXES) and name not in names:
                names.append(name)
    return names


def resolve_model_file(name: str, *folders: str) -> str:
    """The full path of ``name`` in the first of ``folders`` holding it; clear errors otherwise."""
    if not name.lower().endswith(SAFETENSORS_SUFFIXES):
        raise ValueError(f"'{name}' is not a .safetensors file; pickled formats are never opened")
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise FileNotFoundError(f"'{name}' was not found in the {' / '.join(folders)} model folders")


def files_fingerprint(names_and_folders: list[tuple[str, tuple[str, ...]]]) -> str | float:
    """A value that changes whenever one of the named model files is rewritten or replaced: what a file-reading
    node returns from ``fingerprint_inputs``, so that ComfyUI's cache never reuses what an old file gave.
    NaN (never equal: the node runs again) when a file cannot be found or read; the node then says why."""
    parts = []
    for name, folders in names_and_folders:
        try:
            path = resolve_model_file(name, *folders)
            parts.append(f"{path}:{file_fingerprint(path)}")
            companion = companion_path(path)
            if companion.is_file():
                parts.append(f"{companion}:{file_fingerprint(companion)}")
        except (OSError, ValueError):
            return float("nan")
    return "|".join(parts)


def output_path(filename_prefix: str, default_folder: str, suffix: str = ".safetensors") -> Path:
    """A new numbered file inside ComfyUI's output folder for a user prefix such as ``task_vectors/tau``.

    Names and counters come from ComfyUI's own ``folder_paths.get_save_image_path`` (so ``%year%``, ``%month%``,
    ``%day%``, ``%hour%``, ``%minute%``, ``%second%`` are filled in as for images). Absolute prefixes and ``..``
    components are refused before anything touches the disk, and a folder that resolves outside the output
    folder (a symbolic link) afterwards.
    """
    prefix = filename_prefix.strip().replace("\\", "/")
    parts = PurePath(prefix).parts
    if not prefix or prefix.startswith("/") or ".." in parts or PurePath(prefix).is_absolute():
        raise ValueError(f"filename prefix '{filename_prefix}' must be a relative name inside the output folder")
    if len(parts) == 1:
        prefix = f"{default_folder}/{prefix}"
    output_dir = Path(folder_paths.get_output_directory()).resolve()
    _check_inside(output_dir / os.path.dirname(prefix), output_dir, filename_prefix)
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(output_dir))
    target_dir = _check_inside(Path(folder), output_dir, filename_prefix)
    target_dir.mkdir(parents=True, exist_ok=True)
    return target_dir / f"{name}_{counter:05d}_{suffix}"


def _check_inside(folder: Path, output_dir: Path, filename_prefix: str) -> Path:
    resolved = folder.resolve()
    if not resolved.is_relative_to(output_dir):
        raise ValueError(f"filename prefix '{filename_prefix}' points outside the output folder")
    return resolved


class KeyProgress:
    """A ComfyUI progress bar over keys that also honours the Cancel button."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done)
