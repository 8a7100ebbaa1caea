"""Task-vector nodes: extract, load, save, combine, apply and inspect τ = θ_finetuned − θ_base."""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management as mm

from .. import merging
from ..merging.channel_projection import is_companion_file
from ..merging.task_vector_files import load_task_vector, save_task_vector, task_vector_from_files
from ..merging.task_vectors import TaskVector, extract_task_vector, summarize
from . import comfy_bridge as bridge
from .common import hidden_input
from .compat import io, ui
from .types import (
    CATEGORY,
    DTYPE_CHOICES,
    TaskVectorType,
    key_filter_input,
    nonfinite_input,
    nonfinite_policy,
    overflow_input,
)

TV_CATEGORY = f"{CATEGORY}/task_vectors"
MODEL_FILE_FOLDERS = ("checkpoints", "diffusion_models")
TASK_VECTOR_FILE_FOLDERS = (bridge.TASK_VECTOR_FOLDER, "loras")


def _tv_output() -> io.Output:
    return TaskVectorType.Output(
        display_name="task_vector", tooltip="The task vector (lazy: computed per key when used)."
    )


def _tv_input(name: str = "task_vector", tooltip: str = "A task vector.") -> io.Input:
    return TaskVectorType.Input(name, tooltip=tooltip)


class TaskVectorFromModelsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorFromModels",
            display_name="Task Vector from Models",
            category=TV_CATEGORY,
            description="τ = fine-tuned − base from two loaded models of the same architecture (LoRAs or merges "
            "already applied to a MODEL count as part of it). Lazy: nothing is computed until the task vector is used.",
            inputs=[
                io.Model.Input("finetuned", tooltip="The fine-tuned model (θ_ft)."),
                io.Model.Input("base", tooltip="The base model it was fine-tuned from (θ_base)."),
                key_filter_input(),
                io.Clip.Input(
                    "clip_finetuned",
                    optional=True,
                    tooltip="Optional: the fine-tuned text encoder, to include its change too (needs clip_base).",
                ),
                io.Clip.Input("clip_base", optional=True, tooltip="Optional: the base text encoder."),
                nonfinite_input(),
            ],
            outputs=[_tv_output()],
        )

    @classmethod
    def execute(cls, finetuned, base, key_filter="", clip_finetuned=None, clip_base=None, nonfinite="error"):
        policy = nonfinite_policy(nonfinite)
        vector = extract_task_vector(
            bridge.model_weights(finetuned),
            bridge.model_weights(base),
            key_filter=key_filter,
            nonfinite=policy,
            names=("finetuned MODEL", "base MODEL"),
        )
        if (clip_finetuned is None) != (clip_base is None):
            raise ValueError("connect both clip_finetuned and clip_base, or neither")
        projections = bridge.projection_task_vector(finetuned, base)
        if projections is not None:
            vector = vector.join(projections)
        if clip_finetuned is not None:
            vector = vector.join(
                extract_task_vector(
                    bridge.clip_weights(clip_finetuned),
                    bridge.clip_weights(clip_base),
                    key_filter=key_filter or None,
                    nonfinite=policy,
                    names=("finetuned CLIP", "base CLIP"),
                )
            )
        return io.NodeOutput(vector)


class TaskVectorFromFilesNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = bridge.safetensors_choices(*MODEL_FILE_FOLDERS)
        return io.Schema(
            node_id="DM_TaskVectorFromFiles",
            display_name="Task Vector from Files",
            category=TV_CATEGORY,
            description="τ = fine-tuned − base streamed from two safetensors files (checkpoints or diffusion "
            "models, fp32/fp16/bf16/fp8) one tensor at a time, without loading either model.",
            inputs=[
                io.Combo.Input(
                    "finetuned_file",
                    options=files,
                    tooltip="Fine-tuned model file (checkpoints / diffusion_models).",
                ),
                io.Combo.Input("base_file", options=files, tooltip="Base model file it was fine-tuned from."),
                key_filter_input(),
                nonfinite_input(),
            ],
            outputs=[_tv_output()],
        )

    @classmethod
    def fingerprint_inputs(cls, finetuned_file, base_file, **_):
        return bridge.files_fingerprint([(finetuned_file, MODEL_FILE_FOLDERS), (base_file, MODEL_FILE_FOLDERS)])

    @classmethod
    def execute(cls, finetuned_file, base_file, key_filter="", nonfinite="error"):
        vector = task_vector_from_files(
            bridge.resolve_model_file(finetuned_file, *MODEL_FILE_FOLDERS),
            bridge.resolve_model_file(base_file, *MODEL_FILE_FOLDERS),
            key_filter=key_filter or None,
            nonfinite=nonfinite_policy(nonfinite),
        )
        return io.NodeOutput(vector)


class TaskVectorFromLoRANode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorFromLoRA",
            display_name="Task Vector from LoRA",
            category=TV_CATEGORY,
            description="The full weight change a LoRA file makes (LoRA, LoCon, LoHa, LoKr, DoRA …) as a task "
            "vector: exactly what the stock LoRA loader would add at strength 1.",
            inputs=[
                io.Combo.Input(
                    "lora_name",
                    options=[n for n in bridge.safetensors_choices("loras") if not is_companion_file(n)],
                    tooltip="LoRA file (loras folder). A channel-projection companion file beside it "
                    "(<name>.channel_projection.safetensors, from Save Range Expert LoRA) is included as W − I.",
                ),
                io.Model.Input("model", tooltip="The base model the LoRA is for: maps LoRA names to model keys."),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional: the base text encoder, to include the LoRA's text part.",
                ),
            ],
            outputs=[_tv_output()],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_):
        return bridge.files_fingerprint([(lora_name, ("loras",))])

    @classmethod
    def execute(cls, lora_name, model, clip=None):
        path = bridge.resolve_model_file(lora_name, "loras")
        return io.NodeOutput(bridge.lora_task_vector(path, model, clip))


class TaskVectorLoadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorLoad",
            display_name="Load Task Vector",
            category=TV_CATEGORY,
            description="Load a saved task vector (or a ComfyUI 'full diff' LoRA) from models/task_vectors, "
            "output/task_vectors or models/loras.",
            inputs=[
                io.Combo.Input(
                    "name",
                    options=bridge.safetensors_choices(*TASK_VECTOR_FILE_FOLDERS),
                    tooltip="Task-vector file (task_vectors or loras folders).",
                ),
                nonfinite_input(),
            ],
            outputs=[_tv_output()],
        )

    @classmethod
    def fingerprint_inputs(cls, name, **_):
        return bridge.files_fingerprint([(name, TASK_VECTOR_FILE_FOLDERS)])

    @classmethod
    def execute(cls, name, nonfinite="error"):
        path = bridge.resolve_model_file(name, *TASK_VECTOR_FILE_FOLDERS)
        return io.NodeOutput(load_task_vector(path, nonfinite=nonfinite_policy(nonfinite)))


class TaskVectorSaveNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorSave",
            display_name="Save Task Vector",
            category=TV_CATEGORY,
            description="Write a task vector key by key into the output folder, in the 'full diff' LoRA format "
            "the stock LoraLoaderModelOnly applies; base fingerprint, sources and recipe go in the metadata.",
            inputs=[
                _tv_input(),
                io.String.Input(
                    "filename_prefix",
                    default="task_vectors/task_vector",
                    tooltip="Name inside ComfyUI's output folder; a counter and .safetensors are appended. "
                    "Sub-folders are allowed, '..' and absolute paths are not.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPE_CHOICES,
                    default="fp16",
                    tooltip="Storage precision: fp16 (half the size of fp32, what LoRA files use), bf16, or fp32 "
                    "(exact).",
                ),
                overflow_input(),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, task_vector: TaskVector, filename_prefix="task_vectors/task_vector", dtype="fp16", overflow="error"
    ):
        path = bridge.output_path(filename_prefix, default_folder=bridge.TASK_VECTOR_FOLDER)
        metadata = {"dm_version": merging.__version__}
        prompt = hidden_input(cls, "prompt")
        if prompt is not None:
            metadata["prompt"] = json.dumps(prompt)
        save_task_vector(
            task_vector,
            path,
            dtype=dtype,
            metadata=metadata,
            device=mm.get_torch_device(),
            progress=bridge.KeyProgress(len(task_vector)),
            overflow=overflow,
        )
        relative = path.relative_to(Path(bridge.folder_paths.get_output_directory()).resolve())
        return io.NodeOutput(ui={"text": [f"saved {len(task_vector)} keys to output/{relative.as_posix()}"]})


class TaskVectorScaleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorScale",
            display_name="Scale Task Vector",
            category=TV_CATEGORY,
            description="factor · τ: strengthen, weaken or reverse a task vector (lazy: only a coefficient changes).",
            inputs=[
                _tv_input(),
                io.Float.Input(
                    "factor",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier; 0.5 halves the change, −1 reverses it.",
                ),
            ],
            outputs=[_tv_output()],
        )

    @classmethod
    def execute(cls, task_vector: TaskVector, factor=1.0):
        return io.NodeOutput(task_vector.scale(factor))


class TaskVectorAddNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorAdd",
            display_name="Add Task Vectors",
            category=TV_CATEGORY,
            description="τ_a + τ_b (lazy; task arithmetic). Keys only one side has count as zero on the other.",
            inputs=[_tv_input("a", "First task vector."), _tv_input("b", "Second task vector.")],
            outputs=[_tv_output()],
        )

    @classmethod
    def execute(cls, a: TaskVector, b: TaskVector):
        return io.NodeOutput(a + b)


class TaskVectorSubtractNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorSubtract",
            display_name="Subtract Task Vectors",
            category=TV_CATEGORY,
            description="τ_a − τ_b (lazy), e.g. to remove one fine-tune's change from a combination.",
            inputs=[
                _tv_input("a", "Task vector to subtract from."),
                _tv_input("b", "Task vector to subtract."),
            ],
            outputs=[_tv_output()],
        )

    @classmethod
    def execute(cls, a: TaskVector, b: TaskVector):
        return io.NodeOutput(a - b)


class TaskVectorNegateNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorNegate",
            display_name="Negate Task Vector",
            category=TV_CATEGORY,
            description="−τ (lazy): applying it removes the fine-tune's change ('forgetting by negation').",
            inputs=[_tv_input()],
            outputs=[_tv_output()],
        )

    @classmethod
    def execute(cls, task_vector: TaskVector):
        return io.NodeOutput(-task_vector)


class TaskVectorApplyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorApply",
            display_name="Apply Task Vector",
            category=TV_CATEGORY,
            description="θ + strength · τ as lazy patches on a clone of the model (the input is untouched; the "
            "change is computed when ComfyUI loads the model, like a LoRA).",
            inputs=[
                io.Model.Input("model", tooltip="The model to change (normally the task vector's base)."),
                _tv_input(),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="1 = the full fine-tune, 0 = unchanged, between = interpolation, >1 = extrapolation.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional text encoder to apply the task vector's text-encoder part to.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The patched model."),
                io.Clip.Output(display_name="CLIP", tooltip="The patched text encoder (None when none was given)."),
            ],
        )

    @classmethod
    def execute(cls, model, task_vector: TaskVector, strength=1.0, clip=None):
        bridge.check_compatible(model, task_vector)
        patched, _ = bridge.apply_to_model(model, task_vector, strength)
        patched_clip = bridge.apply_to_clip(clip, task_vector, strength)[0] if clip is not None else None
        return io.NodeOutput(patched, patched_clip)


class TaskVectorInfoNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorInfo",
            display_name="Task Vector Info",
            category=TV_CATEGORY,
            description="Key count, parameter count, L2 norm, sparsity and per-block norms of a task vector, "
            "shown on the node and returned as JSON text.",
            inputs=[_tv_input()],
            outputs=[io.String.Output(display_name="summary", tooltip="The summary as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, task_vector: TaskVector):
        summary = summarize(task_vector, mm.get_torch_device())
        return io.NodeOutput(json.dumps(summary), ui=ui.PreviewText(format_summary(summary)))


def format_summary(summary: dict, top_blocks: int = 12) -> str:
    lines = [
        f"keys: {summary['keys']}   parameters: {summary['parameters']:,}",
        f"L2 norm: {summary['norm']:.4g}   sparsity: {100 * summary['sparsity']:.2f}% zeros",
        "largest block norms:",
    ]
    blocks = sorted(summary["block_norms"].items(), key=lambda item: -item[1])[:top_blocks]
    lines += [f"  {name}: {norm:.4g}" for name, norm in blocks]
    return "\n".join(lines)


NODES = [
    TaskVectorFromModelsNode,
    TaskVectorFromFilesNode,
    TaskVectorFromLoRANode,
    TaskVectorLoadNode,
    TaskVectorSaveNode,
    TaskVectorScaleNode,
    TaskVectorAddNode,
    TaskVectorSubtractNode,
    TaskVectorNegateNode,
    TaskVectorApplyNode,
    TaskVectorInfoNode,
]
