"""Task vector → LoRA: a low-rank copy of any task vector (a merge result included) as a standard LoRA file."""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management as mm

from .. import merging
from ..merging.lora_extract import BACKENDS, CONV_MODES, OTHER_KEY_MODES, extract_lora, format_report, load_lora
from ..merging.task_vectors import TaskVector
from . import comfy_bridge as bridge
from .common import hidden_input
from .compat import io, ui
from .types import CATEGORY, DTYPE_CHOICES, TaskVectorType

RANK_MODES = ("rank", "energy")


class TaskVectorToLoRANode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorToLoRA",
            display_name="Extract LoRA from Task Vector",
            category=f"{CATEGORY}/task_vectors",
            description="Write a task vector (a fine-tune's change, a merge result …) as a standard LoRA file: "
            "each weight's delta is replaced by its best rank-r approximation (SVD), at a fixed rank or at the "
            "smallest rank keeping a chosen share of its energy; convolutions as LoCon. The stock LoRA loaders "
            "apply the file. Shows how much of the task vector the LoRA keeps, per key and in total.",
            inputs=[
                TaskVectorType.Input("task_vector", tooltip="The task vector to approximate."),
                io.String.Input(
                    "filename_prefix",
                    default="loras/extracted_lora",
                    tooltip="Name inside ComfyUI's output folder; a counter and .safetensors are appended. "
                    "'..' and absolute paths are refused.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(RANK_MODES),
                    default="rank",
                    tooltip="rank: the same rank for every weight. energy: per weight, the smallest rank that keeps "
                    "the chosen share of its squared norm (at most max_rank).",
                ),
                io.Int.Input(
                    "rank",
                    default=32,
                    min=1,
                    max=4096,
                    tooltip="Rank of every LoRA pair in 'rank' mode (capped by each weight's size). Larger = closer "
                    "to the task vector and a larger file.",
                ),
                io.Float.Input(
                    "energy",
                    default=0.9,
                    min=0.0001,
                    max=1.0,
                    step=0.01,
                    tooltip="'energy' mode: the share of each weight's squared Frobenius norm to keep (0.9 = 90 %).",
                ),
                io.Int.Input(
                    "max_rank",
                    default=128,
                    min=1,
                    max=4096,
                    tooltip="'energy' mode: the largest rank any weight may get.",
                ),
                io.Combo.Input(
                    "conv",
                    options=list(CONV_MODES),
                    default="locon",
                    tooltip="k×k convolutions: locon (a low-rank pair, as LoCon: down k×k, up 1×1), diff (stored "
                    "whole) or skip (left out). 1×1 convolutions are treated as linear layers.",
                ),
                io.Combo.Input(
                    "other_keys",
                    options=list(OTHER_KEY_MODES),
                    default="diff",
                    tooltip="Biases, norms and other non-matrix parameters: diff (stored whole; small) or drop.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPE_CHOICES,
                    default="fp16",
                    tooltip="Storage precision of the LoRA tensors (fp16 is what LoRA files use).",
                ),
                io.Combo.Input(
                    "backend",
                    options=list(BACKENDS),
                    default="auto",
                    optional=True,
                    tooltip="How the top singular vectors are found: auto (= gram: eigenvectors of the smaller Gram "
                    "matrix, exact and fastest), svd (full SVD, the reference), lowrank (randomised; rank mode only, "
                    "keeps slightly less energy).",
                ),
            ],
            outputs=[
                TaskVectorType.Output(
                    display_name="lora_task_vector",
                    tooltip="What the written LoRA adds (read back from the file), e.g. to compare with the original.",
                ),
                io.String.Output(display_name="report", tooltip="Totals and per-key energy as JSON."),
            ],
            hidden=[io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        task_vector: TaskVector,
        filename_prefix="loras/extracted_lora",
        mode="rank",
        rank=32,
        energy=0.9,
        max_rank=128,
        conv="locon",
        other_keys="diff",
        dtype="fp16",
        backend="auto",
    ):
        if mode not in RANK_MODES:
            raise ValueError(f"mode must be one of {list(RANK_MODES)}, not {mode!r}")
        settings = {"rank": rank} if mode == "rank" else {"energy": energy, "max_rank": max_rank}
        path = bridge.output_path(filename_prefix, default_folder="loras")
        metadata = {"dm_version": merging.__version__}
        prompt = hidden_input(cls, "prompt")
        if prompt is not None:
            metadata["prompt"] = json.dumps(prompt)
        progress = bridge.KeyProgress(len(task_vector))
        report = extract_lora(
            task_vector,
            path,
            **settings,
            conv=conv,
            other_keys=other_keys,
            backend=backend,
            dtype=dtype,
            device=mm.get_torch_device(),
            metadata=metadata,
            progress=lambda done, _total: progress(done),
            should_stop=mm.throw_exception_if_processing_interrupted,
        )
        relative = path.relative_to(Path(bridge.folder_paths.get_output_directory()).resolve())
        text = f"saved to output/{relative.as_posix()}\n{format_report(report)}"
        return io.NodeOutput(load_lora(path), json.dumps(report.summary()), ui=ui.PreviewText(text))


NODES = [TaskVectorToLoRANode]
