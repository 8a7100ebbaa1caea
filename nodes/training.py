"""Training nodes: DeMe range-expert LoRAs with CLTS and MDLRC options, and saving them with their projections.

The schedules' maths lives in ``merging.training.schedules`` and ``merging.channel_projection``; the loop
and its ComfyUI plumbing in ``training_runtime``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import merging
from ..merging.channel_projection import companion_path, save_projections
from ..merging.io import check_storable, write_safetensors
from ..merging.sampling.schedules import UNITS
from ..merging.training.schedules import (
    MOMENTUM_SCHEDULES,
    MomentumDecay,
    TimestepCurriculum,
    TimestepSampler,
    resolve_time_range,
)
from . import comfy_bridge as bridge
from . import training_runtime as runtime
from .common import hidden_input, sigma_scale
from .compat import io, ui
from .training_plots import loss_panel, momentum_panel, sigma_histogram_panel, stacked, to_image_batch
from .types import CATEGORY, ChannelProjectionType, CurriculumType, MomentumDecayType, overflow_input

TRAINING_CATEGORY = f"{CATEGORY}/training"
LORA_FOLDER = "loras"


# -- inputs of the trainer -------------------------------------------------------------------------


def _range_inputs() -> list[io.Input]:
    return [
        io.Combo.Input(
            "range_unit",
            options=list(UNITS),
            default="timestep",
            tooltip="Unit of range_min/range_max: timestep (0–1000, 0 = clean; DeMe's ranges), percent of sampling "
            "(0 = start = most noise, 1 = end) or sigma. Converted with this model's own sampling, shift included.",
        ),
        io.Float.Input(
            "range_min",
            default=0.0,
            min=0.0,
            max=10000.0,
            step=0.001,
            round=0.0001,
            tooltip="Lower end of the expert's noise range, in range_unit (DeMe's four experts: 0, 250, 500, 750).",
        ),
        io.Float.Input(
            "range_max",
            default=1000.0,
            min=0.0,
            max=10000.0,
            step=0.001,
            round=0.0001,
            tooltip="Upper end of the range, in range_unit (DeMe: 250, 500, 750, 1000). 0–1000 timesteps = the whole "
            "schedule, i.e. plain LoRA training.",
        ),
        io.Float.Input(
            "global_probability",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="DeMe's probabilistic sampling p: each batch draws from the WHOLE schedule with probability p "
            "(one coin per batch), else from the range. DeMe's Church run used 0.3. 0 = range only.",
        ),
        io.Boolean.Input(
            "antithetic",
            default=False,
            tooltip="DeMe's antithetic timesteps: half of each batch is drawn, the other half mirrored inside the "
            "range (u' = low + high − u), which lowers the variance of the loss.",
        ),
        io.Float.Input(
            "consistency_weight",
            default=0.0,
            min=0.0,
            max=100.0,
            step=0.01,
            tooltip="Weight of DeMe's consistency loss: distance to the frozen base model's prediction on the same "
            "noisy input (DeMe: 1). Costs one extra forward pass per step; 0 = off.",
        ),
        io.Combo.Input(
            "loss_space",
            options=list(runtime.LOSS_SPACES),
            default="x0",
            tooltip="x0: error of the denoised image (ComfyUI's trainer; weights low-σ steps down by σ²). eps/v: "
            "error of the model's own output (ε, v or flow velocity), as DeMe trains — matters for low-noise experts.",
        ),
        io.Combo.Input(
            "loss_function",
            options=list(runtime.LOSS_FUNCTIONS),
            default="MSE",
            tooltip="Distance used for both losses.",
        ),
    ]


def _optimisation_inputs() -> list[io.Input]:
    return [
        io.Int.Input("steps", default=100, min=1, max=1000000, tooltip="Optimiser steps."),
        io.Int.Input("batch_size", default=1, min=1, max=1024, tooltip="Latents per micro-batch (drawn in epochs)."),
        io.Int.Input(
            "grad_accumulation",
            default=1,
            min=1,
            max=1024,
            tooltip="Micro-batches per optimiser step (effective batch = batch_size × this).",
        ),
        io.Float.Input(
            "learning_rate",
            default=0.0001,
            min=0.0000001,
            max=1.0,
            step=0.000001,
            round=0.0000001,
            tooltip="Learning rate (the starting one when a momentum decay schedule is connected).",
        ),
        io.Combo.Input(
            "optimizer",
            options=list(runtime.OPTIMIZERS),
            default="AdamW",
            tooltip="Optimiser (torch defaults; Adam β₂ 0.999). Momentum decay needs AdamW or Adam.",
        ),
        io.Int.Input("rank", default=8, min=1, max=256, tooltip="Rank of the adapters (LoRA alpha is 1, as core)."),
        io.Combo.Input(
            "algorithm",
            options=list(runtime.ALGORITHMS),
            default="LoRA",
            tooltip="ComfyUI's adapter format: LoRA, LoHa, LoKr or OFT. All start as the identity (no change).",
        ),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=0xFFFFFFFFFFFFFFFF,
            control_after_generate=True,
            tooltip="Seed of everything random: adapter initialisation, batch order, noise and timestep draws. "
            "The same seed gives the same LoRA on the CPU.",
        ),
        io.Combo.Input(
            "training_dtype",
            options=list(runtime.TRAINING_DTYPES),
            default="bf16",
            tooltip="Compute precision of the forward and backward pass (bf16: GPUs; fp32: CPU, exact).",
        ),
        io.Combo.Input(
            "lora_dtype",
            options=list(runtime.LORA_DTYPES),
            default="bf16",
            tooltip="Precision of the trained adapter weights, and of the saved LoRA.",
        ),
        io.Boolean.Input(
            "gradient_checkpointing",
            default=True,
            tooltip="Recompute activations in the backward pass: much less memory, about a third slower.",
        ),
        io.Boolean.Input(
            "channel_projection",
            default=False,
            tooltip="DeMe's channel-wise projection: a C×C 1×1 projection (identity at start) after each UNet block, "
            "trained with the LoRA. UNets only; saved in a companion file by Save Range Expert LoRA. The paper found "
            "it helps only together with global sampling and the consistency loss.",
        ),
        io.Float.Input(
            "grad_clip",
            default=1.0,
            min=0.0,
            max=1000.0,
            step=0.01,
            tooltip="Clip the gradient norm to this value before each step (DeMe: 1). 0 = no clipping.",
        ),
        CurriculumType.Input(
            "curriculum",
            optional=True,
            tooltip="Optional CLTS schedule from a Timestep Curriculum node; none = the plain density.",
        ),
        MomentumDecayType.Input(
            "momentum_decay",
            optional=True,
            tooltip="Optional MDLRC schedule from a Momentum Decay node (β₁ and lr per step); none = constant.",
        ),
    ]


class TrainRangeExpertLoRANode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TrainRangeExpertLoRA",
            display_name="Train Range-Expert LoRA (DeMe)",
            category=TRAINING_CATEGORY,
            description="Trains a LoRA that only sees noise levels in a chosen range (a DeMe range expert), with "
            "DeMe's global sampling, antithetic timesteps, consistency loss and channel projection as options, and "
            "optional CLTS / MDLRC schedules. Outputs the MODEL with the LoRA, the LoRA in ComfyUI's format, the "
            "loss log and the histogram of the σ drawn.",
            inputs=[
                io.Model.Input("model", tooltip="The base model to train an expert of (it is not modified)."),
                io.Latent.Input("latents", tooltip="The training images as latents (e.g. VAE Encode of a batch)."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="Their prompt: one conditioning for all latents, or one per latent (same token length).",
                ),
                *_range_inputs(),
                *_optimisation_inputs(),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model_with_lora", tooltip="The base with the trained LoRA (and projections)."
                ),
                io.LoraModel.Output(
                    display_name="lora",
                    tooltip="The LoRA in ComfyUI's format: Save LoRA Weights or Save Range "
                    "Expert LoRA writes it; stock loaders load it.",
                ),
                io.LossMap.Output(
                    display_name="loss",
                    tooltip="Per-step losses (plot with Plot Loss Graph), β₁, lr, and every σ drawn.",
                ),
                io.Image.Output(
                    display_name="sigma_histogram", tooltip="Histogram of the σ drawn vs the density asked."
                ),
                ChannelProjectionType.Output(
                    display_name="channel_projection", tooltip="The trained projections (None when off)."
                ),
                io.Int.Output(display_name="steps", tooltip="Optimiser steps trained (for Save LoRA Weights' name)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_experimental=True,
        )

    @classmethod
    def execute(
        cls,
        model,
        latents,
        positive,
        range_unit="timestep",
        range_min=0.0,
        range_max=1000.0,
        global_probability=0.0,
        antithetic=False,
        consistency_weight=0.0,
        loss_space="x0",
        loss_function="MSE",
        steps=100,
        batch_size=1,
        grad_accumulation=1,
        learning_rate=0.0001,
        optimizer="AdamW",
        rank=8,
        algorithm="LoRA",
        seed=0,
        training_dtype="bf16",
        lora_dtype="bf16",
        gradient_checkpointing=True,
        channel_projection=False,
        grad_clip=1.0,
        curriculum=None,
        momentum_decay=None,
    ):
        sampling = model.get_model_object("model_sampling")
        time_range = resolve_time_range(
            range_min,
            range_max,
            range_unit,
            sigma_scale(sampling),
            float(sampling.sigma_min),
            float(sampling.sigma_max),
        )
        timesteps = TimestepSampler(time_range, float(global_probability), bool(antithetic), curriculum)
        settings = runtime.TrainingSettings(
            timesteps,
            steps=steps,
            batch_size=batch_size,
            grad_accumulation=grad_accumulation,
            learning_rate=learning_rate,
            optimizer=optimizer,
            loss_function=loss_function,
            loss_space=loss_space,
            consistency_weight=consistency_weight,
            grad_clip=grad_clip,
            seed=seed,
            training_dtype=training_dtype,
            lora_dtype=lora_dtype,
            rank=rank,
            algorithm=algorithm,
            gradient_checkpointing=gradient_checkpointing,
            channel_projection=channel_projection,
            momentum=momentum_decay,
        )
        result = runtime.train_range_expert(model, latents, positive, settings, hidden_input(cls, "unique_id"))
        histogram = sigma_histogram_panel(result.log, timesteps, steps)
        panels = [loss_panel(result.log), histogram, *([momentum_panel(result.log)] if momentum_decay else [])]
        preview = ui.PreviewImage(to_image_batch(stacked(panels)), cls=cls if hidden_input(cls, "prompt") else None)
        return io.NodeOutput(
            result.model,
            result.lora,
            result.log.as_loss_map(),
            to_image_batch(histogram),
            result.projections,
            steps,
            ui=preview,
        )


class TimestepCurriculumNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TimestepCurriculum",
            display_name="Timestep Curriculum (CLTS)",
            category=TRAINING_CATEGORY,
            description="A curriculum timestep schedule for the range-expert trainer: the σ sampling density ramps "
            "from uniform towards a normal density around normalised time μ (our documented reconstruction of CLTS, "
            "not the paper's unpublished formula).",
            inputs=[
                io.Float.Input(
                    "center",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="μ in normalised time (0 = clean, 1 = pure noise); the paper's ablation found ≈ 0.3 best.",
                ),
                io.Float.Input(
                    "spread",
                    default=0.15,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip="Standard deviation s of the normal density, in normalised time (truncated to the range).",
                ),
                io.Float.Input(
                    "max_weight",
                    default=0.8,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="λ_max: the normal density's share at the end of the ramp (1 = only the normal density).",
                ),
                io.Float.Input(
                    "ramp_start",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of training where λ starts to rise from 0.",
                ),
                io.Float.Input(
                    "ramp_end",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of training where λ reaches λ_max (it stays there afterwards).",
                ),
            ],
            outputs=[CurriculumType.Output(display_name="curriculum", tooltip="Connect to the trainer's curriculum.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, center=0.3, spread=0.15, max_weight=0.8, ramp_start=0.0, ramp_end=0.5):
        return io.NodeOutput(TimestepCurriculum(center, spread, max_weight, ramp_start, ramp_end))


class MomentumDecayNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MomentumDecay",
            display_name="Momentum Decay (MDLRC)",
            category=TRAINING_CATEGORY,
            description="Momentum decay with learning-rate compensation for the range-expert trainer: Adam's β₁ falls "
            "over training and the learning rate is scaled so lr·(1 − β₁) stays constant (our documented "
            "reconstruction of MDLRC).",
            inputs=[
                io.Combo.Input(
                    "schedule",
                    options=list(MOMENTUM_SCHEDULES),
                    default="rex",
                    tooltip="rex: β₁/(1 − β₁) falls linearly to 0 (then the floor); linear: β₁ falls linearly to the "
                    "floor; exponential: β₁ = β₀·(floor/β₀)^τ.",
                ),
                io.Float.Input(
                    "beta1_start",
                    default=0.9,
                    min=0.0,
                    max=0.999,
                    step=0.001,
                    tooltip="β₀, Adam's β₁ at the first step (Adam's default 0.9; DeMe used 0.95).",
                ),
                io.Float.Input(
                    "beta1_floor",
                    default=0.0,
                    min=0.0,
                    max=0.999,
                    step=0.001,
                    tooltip="The value β₁ ends at and never goes below (must be above 0 for 'exponential').",
                ),
                io.Boolean.Input(
                    "compensate_lr",
                    default=True,
                    tooltip="Scale the learning rate by (1 − β₀)/(1 − β₁) so lr·(1 − β₁) stays constant. Off = plain "
                    "momentum decay, which the paper's reviewers report destabilises the EMA.",
                ),
            ],
            outputs=[MomentumDecayType.Output(display_name="momentum_decay", tooltip="Connect to the trainer.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, schedule="rex", beta1_start=0.9, beta1_floor=0.0, compensate_lr=True):
        return io.NodeOutput(MomentumDecay(schedule, float(beta1_start), float(beta1_floor), bool(compensate_lr)))


class SaveRangeExpertLoRANode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SaveRangeExpertLoRA",
            display_name="Save Range Expert LoRA",
            category=TRAINING_CATEGORY,
            description="Writes a trained LoRA into the output folder (stock format: any LoRA loader loads it) and, "
            "when channel projections were trained, a companion file <name>.channel_projection.safetensors beside "
            "it, which Task Vector from LoRA picks up.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA from Train Range-Expert LoRA (or core's Train LoRA)."),
                io.String.Input(
                    "filename_prefix",
                    default="loras/range_expert",
                    tooltip="Name inside ComfyUI's output folder; a counter and .safetensors are appended. Sub-folders "
                    "are allowed, '..' and absolute paths are not. Move the files to models/loras to load them.",
                ),
                ChannelProjectionType.Input(
                    "channel_projection",
                    optional=True,
                    tooltip="The trainer's channel_projection output; written to the companion file.",
                ),
                overflow_input(),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix="loras/range_expert", channel_projection=None, overflow="error"):
        if not lora:
            raise ValueError("the LoRA is empty: connect the trainer's lora output")
        path = bridge.output_path(filename_prefix, default_folder=LORA_FOLDER)
        metadata = {"dm_version": merging.__version__}
        prompt = hidden_input(cls, "prompt")
        if prompt is not None:
            metadata["prompt"] = json.dumps(prompt)
        tensors = {key: value.detach().cpu().contiguous() for key, value in lora.items()}
        projections = {f"channel projection {block}": w for block, w in (channel_projection or {}).items()}
        check_storable({**tensors, **projections}, "the LoRA")  # before anything is written
        specs = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]
        write_safetensors(path, specs, iter(tensors.items()), metadata, overflow=overflow)
        written = [path]
        if channel_projection:
            written.append(save_projections(channel_projection, companion_path(path), metadata))
        output_dir = Path(bridge.folder_paths.get_output_directory()).resolve()
        names = ", ".join(f"output/{p.relative_to(output_dir).as_posix()}" for p in written)
        return io.NodeOutput(ui={"text": [f"saved {names}"]})


NODES = [TrainRangeExpertLoRANode, TimestepCurriculumNode, MomentumDecayNode, SaveRangeExpertLoRANode]
