"""Saving a (merged, patched) model as a checkpoint, streamed key by key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import torch

from .. import merging
from ..merging.io import parse_dtype, write_safetensors
from ..merging.recipes import RECIPE_METADATA_KEY, not_rerunnable_recipe
from . import comfy_bridge as bridge
from . import compat
from .common import hidden_input
from .compat import io
from .types import CATEGORY, DTYPE_CHOICES, overflow_input

logger = logging.getLogger(__name__)


def _tensor_identities(module: torch.nn.Module, prefix: str) -> dict[int, str]:
    """data_ptr → ``prefix + name`` for a module's non-empty tensors (how saved keys are traced back)."""
    return {t.data_ptr(): prefix + name for name, t in module.state_dict().items() if t.numel()}


def checkpoint_plan(model, clip=None, vae=None) -> list[tuple[str, object, str | None]]:
    """[(key in the file, stored tensor, patched key or None)] in ComfyUI's own checkpoint layout.

    ComfyUI's ``state_dict_for_saving`` decides names and extra markers (prefixes, ``v_pred``…); it only
    returns references to existing tensors, so nothing is copied. Each tensor is traced back to the patcher
    key it came from, so patched weights can be computed one at a time while writing.
    """
    clip_sd = clip.get_sd() if clip is not None else None
    vae_sd = vae.get_sd() if vae is not None else None
    layout = compat.checkpoint_layout(model.model, clip_sd, vae_sd)
    owners = _tensor_identities(model.model.diffusion_model, "unet:diffusion_model.")
    if clip is not None:
        owners.update(_tensor_identities(clip.cond_stage_model, "clip:"))
    plan: list[tuple[str, object, str | None]] = []
    for key, tensor in layout.items():
        owner = owners.get(tensor.data_ptr()) if tensor.numel() else None
        plan.append((key, tensor, owner))
    return plan


def stream_checkpoint(plan, model, clip, dtype: torch.dtype, device):
    """(key, tensor) for each planned entry, patched weights computed on ``device`` one at a time."""
    unet = bridge.PatchedWeights(model, device=device)
    text = bridge.PatchedWeights(clip.patcher, prefix="", device=device) if clip is not None else None
    for key, tensor, owner in plan:
        if owner is not None and owner.startswith("unet:"):
            tensor = unet[owner.removeprefix("unet:")]
        elif owner is not None and text is not None:
            tensor = text[owner.removeprefix("clip:")]
        yield key, tensor.detach()


def output_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


class SaveCheckpointStreamingNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SaveCheckpointStreaming",
            display_name="Save Checkpoint (streaming)",
            category=f"{CATEGORY}/merging",
            description="Write a model (with its merges, task vectors and LoRAs applied) as a checkpoint, one "
            "tensor at a time: memory stays at one layer instead of a second copy of the model. The file loads "
            "with the stock checkpoint loader; merge recipes go into its metadata.",
            inputs=[
                io.Model.Input("model", tooltip="The model to save, patches included."),
                io.String.Input(
                    "filename_prefix",
                    default="checkpoints/merged",
                    tooltip="Name inside ComfyUI's output folder; a counter and .safetensors are appended. "
                    "'..' and absolute paths are refused.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPE_CHOICES,
                    default="fp16",
                    tooltip="Precision of floating-point weights in the file (fp16 is what checkpoints usually use).",
                ),
                io.Clip.Input("clip", optional=True, tooltip="Optional text encoder to include (patches applied)."),
                io.Vae.Input("vae", optional=True, tooltip="Optional VAE to include."),
                overflow_input(),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix="checkpoints/merged", dtype="fp16", clip=None, vae=None, overflow="error"):
        path = bridge.output_path(filename_prefix, default_folder="checkpoints")
        target = parse_dtype(dtype)
        plan = checkpoint_plan(model, clip, vae)
        specs = [(key, output_dtype(tensor, target), tuple(tensor.shape)) for key, tensor, _ in plan]
        metadata = checkpoint_metadata(model, hidden_input(cls, "prompt"), target)
        stream = stream_checkpoint(plan, model, clip, target, mm.get_torch_device())
        write_safetensors(path, specs, stream, metadata, bridge.KeyProgress(len(plan)), overflow)
        relative = path.relative_to(Path(folder_paths.get_output_directory()).resolve())
        return io.NodeOutput(ui={"text": [f"saved {len(plan)} tensors to output/{relative.as_posix()}"]})


def checkpoint_metadata(model, prompt, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """The recipes of task vectors patched into the model, the pack version and the prompt."""
    recipes: list = []
    applied: list = []
    for patches in model.patches.values():
        for patch in patches:
            value = patch[1]
            if isinstance(value, bridge.TaskVectorPatch):
                if value.vector.recipe not in recipes:
                    recipes.append(value.vector.recipe)
                if not any(vector is value.vector and strength == patch[0] for vector, strength in applied):
                    applied.append((value.vector, patch[0]))
    metadata = {"dm_version": merging.__version__, "dm_recipe": json.dumps(recipes)}
    metadata[RECIPE_METADATA_KEY] = json.dumps(checkpoint_recipe(applied, dtype))
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    return metadata


def checkpoint_recipe(applied: list, dtype: torch.dtype) -> dict:
    """What is known of how the checkpoint was made, marked not re-runnable: its base is a MODEL, not a file."""
    vector = None
    for patch_vector, strength in applied:
        term = patch_vector.scale(strength)
        vector = term if vector is None else vector + term
    result = {"kind": "checkpoint", "base": None, "dtype": str(dtype).removeprefix("torch.")}
    return not_rerunnable_recipe(
        vector,
        result,
        "saved from a MODEL loaded in ComfyUI, whose file is not known; save the task vector (or its recipe) and "
        "apply it to the base file, or merge files with merging.merge_checkpoint_files, for a re-runnable recipe",
    )


NODES = [SaveCheckpointStreamingNode]
