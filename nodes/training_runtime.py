"""Training a range-expert LoRA inside ComfyUI: the glue around ``merging.training.schedules``.

How it uses ComfyUI (re-implemented from ComfyUI's interfaces, nothing copied; docs/architecture.md):

- **Adapters** (``training_adapters``). A clone of the MODEL gets ComfyUI's trainable adapters as weight
  wrappers; their parameters are ComfyUI's LoRA dict, which the stock loaders and ``SaveLoRANode`` understand.
  The output MODEL is the input with that dict loaded the way the stock loaders load it.
- **Loop.** A ``comfy.samplers.Sampler`` run by a ``Guider_Basic``: ComfyUI prepares the conditioning, loads
  the model with its patches and wrappers, and hands the sampler the latents in model space. The sampler
  draws normalised times from the :class:`~..merging.training.schedules.TimestepSampler`, maps them to σ with
  the model's own (possibly shifted) ``model_sampling``, noises with its ``noise_scaling`` and asks the guider
  for the denoised prediction.
- **Frozen base.** The consistency loss compares with the base's prediction: the same network with every
  adapter (and projection) switched off — one extra forward without gradients, no second copy in memory.
- **Losses.** In x₀ space (as ComfyUI's trainer) or in the model's output space (ε, v or flow velocity, as
  DeMe): the denoised output is D = a(σ)·x + b(σ)·output for every ComfyUI parameterisation, so the output
  error is the x₀ error divided by b(σ), which is read from ``model_sampling.calculate_denoised``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management as mm
import comfy.samplers
import comfy.sd
import comfy.utils
import node_helpers
import torch
import torch.nn.functional as F
import tqdm
from comfy.weight_adapter import adapter_maps
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..merging.training.schedules import MomentumDecay, TimestepSampler, range_quantile, training_progress
from . import compat
from . import projection as projection_patches
from .common import sigma_scale
from .training_adapters import AdapterSwitch, attach_adapters, frozen_parameters, gradient_checkpointing

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
ADAM_OPTIMIZERS = ("AdamW", "Adam")
LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "MSE": F.mse_loss,
    "L1": F.l1_loss,
    "Huber": F.huber_loss,
    "SmoothL1": F.smooth_l1_loss,
}
LOSS_SPACES = ("x0", "eps/v")
ALGORITHMS = tuple(adapter_maps)
TRAINING_DTYPES = ("bf16", "fp32")  # no fp16: it would need loss scaling
LORA_DTYPES = ("bf16", "fp32")
ADAM_BETA2 = 0.999
EVALUATION_LEVELS = (0.125, 0.375, 0.625, 0.875)  # quantiles of the expert's range used for the fixed eval batch
EVALUATION_IMAGES = 4
_PROGRESS_TEXT_SECONDS = 0.5


@dataclass(frozen=True)
class TrainingSettings:
    """Everything the trainer node sets, validated."""

    timesteps: TimestepSampler
    steps: int = 100
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    loss_space: str = "x0"
    consistency_weight: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    training_dtype: str = "fp32"
    lora_dtype: str = "fp32"
    rank: int = 8
    algorithm: str = "LoRA"
    gradient_checkpointing: bool = False
    channel_projection: bool = False
    momentum: MomentumDecay | None = None

    def __post_init__(self):
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("loss_function", tuple(LOSS_FUNCTIONS)),
            ("loss_space", LOSS_SPACES),
            ("training_dtype", TRAINING_DTYPES),
            ("lora_dtype", LORA_DTYPES),
            ("algorithm", ALGORITHMS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} '{getattr(self, name)}' is unknown; choose one of {choices}")
        for name in ("steps", "batch_size", "grad_accumulation", "rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "consistency_weight", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be above 0, got {self.learning_rate}")
        if self.consistency_weight < 0 or self.grad_clip < 0:
            raise ValueError("consistency_weight and grad_clip must be ≥ 0")
        if self.momentum is not None and self.optimizer not in ADAM_OPTIMIZERS:
            raise ValueError(
                f"momentum decay (MDLRC) schedules Adam's β₁, but the optimizer is {self.optimizer}: choose AdamW "
                "or Adam, or disconnect the momentum schedule"
            )


@dataclass
class TrainingLog:
    """What one training run recorded (per optimiser step unless noted); becomes the LOSS_MAP output."""

    loss: list[float] = field(default_factory=list)
    range_loss: list[float] = field(default_factory=list)
    consistency_loss: list[float] = field(default_factory=list)
    beta1: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    curriculum_weight: list[float] = field(default_factory=list)
    sigma: list[float] = field(default_factory=list)  # every drawn σ, in order
    normalized_time: list[float] = field(default_factory=list)  # every drawn u, in order
    global_draw: list[bool] = field(default_factory=list)  # per micro-batch
    eval_range_loss: list[float] = field(default_factory=list)  # [before, after] on a fixed batch
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimiser step
    range_normalized_time: tuple[float, float] = (0.0, 1.0)
    range_sigma: tuple[float, float] = (0.0, 0.0)
    schedule_sigma: list[float] = field(default_factory=list)  # σ at normalised time 0, 0.1, …, 1 (plot axis)

    def as_loss_map(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, (list, tuple)) else value for name, value in vars(self).items()}


class TrainingDiverged(ValueError):
    """The loss or the trained weights became NaN/Inf: nothing usable was trained."""


@dataclass
class TrainingResult:
    model: Any
    lora: dict[str, torch.Tensor]
    log: TrainingLog
    projections: dict[str, torch.Tensor] | None


# -- data --------------------------------------------------------------------------------------------


def dataset_conditioning(positive: list, count: int) -> list:
    """One conditioning entry for the whole dataset: shared (one given) or one row per latent (N given)."""
    if not positive:
        raise ValueError("the conditioning is empty: connect a CLIP Text Encode (one for all latents, or one each)")
    if len(positive) == 1:
        return positive
    if len(positive) != count:
        raise ValueError(
            f"{len(positive)} conditionings for {count} latents: give one conditioning for all latents or one "
            "per latent"
        )
    first_tensor, first_extra = positive[0]
    for index, (tensor, _) in enumerate(positive, start=1):
        if tensor.shape[0] != 1 or tensor.shape != first_tensor.shape:
            raise ValueError(
                f"conditioning {index} has shape {tuple(tensor.shape)} but conditioning 1 has "
                f"{tuple(first_tensor.shape)}: per-latent captions must encode to the same length (one row each)"
            )
    extra = dict(first_extra)
    for key, value in first_extra.items():
        values = [entry[1].get(key) for entry in positive]
        if all(isinstance(v, torch.Tensor) and v.shape[:1] == (1,) and v.shape == value.shape for v in values):
            extra[key] = torch.cat(values)
    return [[torch.cat([entry[0] for entry in positive]), extra]]


def select_rows(conds: list[dict], indices: torch.Tensor, total: int) -> list[dict]:
    """Processed conditioning restricted to the batch's latents (model conds with one row per latent)."""
    if total == 1:
        return conds
    selected = []
    for cond in conds:
        cond = cond.copy()
        model_conds = {}
        for name, value in cond.get("model_conds", {}).items():
            tensor = getattr(value, "cond", None)
            if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] == total:
                value = value._copy_with(tensor[indices.to(tensor.device)])
            model_conds[name] = value
        cond["model_conds"] = model_conds
        selected.append(cond)
    return selected


class BatchOrder:
    """Latent indices in shuffled epochs (seeded): every latent once per epoch, batches may span epochs."""

    def __init__(self, count: int, generator: torch.Generator):
        self.count, self.generator = count, generator
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self, batch: int) -> torch.Tensor:
        while self.queue.numel() < batch:
            self.queue = torch.cat([self.queue, torch.randperm(self.count, generator=self.generator)])
        indices, self.queue = self.queue[:batch], self.queue[batch:]
        return indices


# -- noise levels ----------------------------------------------------------------------------------


class NoiseLevels:
    """Normalised time ↔ σ with one model's sampling (shift included): σ(u) = percent_to_sigma(1 − u)."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling
        self.scale = sigma_scale(model_sampling)
        self.sigma_min, self.sigma_max = float(model_sampling.sigma_min), float(model_sampling.sigma_max)

    def sigma(self, normalized_times: torch.Tensor) -> torch.Tensor:
        values = [self.model_sampling.percent_to_sigma(1.0 - float(u)) for u in normalized_times]
        return torch.tensor(values, dtype=torch.float32).clamp(self.sigma_min, self.sigma_max)


# -- progress ----------------------------------------------------------------------------------------


class TrainingProgress:
    """ComfyUI's progress bar, a console bar and the loss as text on the node; honours Cancel."""

    def __init__(self, total: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(total)
        self.console = tqdm.trange(total, desc="Range-expert LoRA", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        self.node_id, self.last_text = node_id, 0.0

    def check(self) -> None:
        mm.throw_exception_if_processing_interrupted()

    def update(self, step: int, total: int, loss: float) -> None:
        self.bar.update_absolute(step + 1, total)
        self.console.update(1)
        self.console.set_postfix({"loss": f"{loss:.4f}"})
        now = time.monotonic()
        if self.node_id is not None and (now - self.last_text > _PROGRESS_TEXT_SECONDS or step + 1 == total):
            self.last_text = now
            _send_text(f"step {step + 1}/{total}   loss {loss:.4f}", self.node_id)

    def close(self) -> None:
        self.console.close()


def _send_text(text: str, node_id: str) -> None:
    try:
        from server import PromptServer

        server = PromptServer.instance
    except (ImportError, AttributeError):  # no server: library or test use
        return
    server.send_progress_text(text, node_id)


# -- the trainer -----------------------------------------------------------------------------------


class RangeExpertTrainer:
    """One training run: adapters, optimiser, the loop and its log."""

    def __init__(self, settings: TrainingSettings, lora: dict, switch: AdapterSwitch, node_id: str | None):
        self.settings, self.lora, self.switch, self.node_id = settings, lora, switch, node_id
        self.log = TrainingLog()
        self.latents = torch.empty(0)
        self.projection: projection_patches.ProjectionSet | None = None
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.loss_fn = LOSS_FUNCTIONS[settings.loss_function]
        self.autocast_dtype = node_helpers.string_to_torch_dtype(settings.training_dtype)

    # the loop ------------------------------------------------------------------------------------

    def run(self, guider, extra_args: dict, latents: torch.Tensor) -> None:
        settings = self.settings
        self.latents = latents
        conds, count = guider.conds["positive"], latents.shape[0]
        levels = NoiseLevels(guider.inner_model.model_sampling)
        self._record_range(levels)
        if self.projection is not None:
            self._create_projections(guider, extra_args, conds)
        optimizer = self._optimizer()
        evaluation = self._evaluation_batch(latents, levels)
        self.log.eval_range_loss.append(self._evaluate(guider, extra_args, conds, count, *evaluation))
        order = BatchOrder(count, self.generator)
        progress = TrainingProgress(settings.steps, self.node_id)
        try:
            for step in range(settings.steps):
                self._optimizer_step(step, optimizer, guider, extra_args, conds, latents, order, levels, progress)
        finally:
            progress.close()
        if not all(bool(torch.isfinite(p).all()) for p in self._parameters()):
            raise TrainingDiverged(self._divergence_message(settings.steps, "the trained weights hold NaN/Inf"))
        self.log.eval_range_loss.append(self._evaluate(guider, extra_args, conds, count, *evaluation))

    def _optimizer_step(self, step, optimizer, guider, extra_args, conds, latents, order, levels, progress) -> None:
        settings = self.settings
        started = time.perf_counter()
        tau = training_progress(step, settings.steps)
        self._schedule(optimizer, tau)
        totals: torch.Tensor | None = None  # (total, range, consistency) summed on the device, read once per step
        for _ in range(settings.grad_accumulation):
            progress.check()
            indices = order.next(settings.batch_size)
            draw = settings.timesteps.draw(len(indices), tau, self.generator)
            sigma = levels.sigma(draw.normalized_times)
            batch_conds = select_rows(conds, indices, latents.shape[0])
            losses = self._losses(guider, extra_args, batch_conds, latents[indices], sigma)
            self._check_finite_loss(step, float(losses[0].detach()))
            (losses[0] / settings.grad_accumulation).backward()
            values = torch.stack([loss.detach().float() for loss in losses])
            totals = values if totals is None else totals + values
            self.log.sigma += sigma.tolist()
            self.log.normalized_time += draw.normalized_times.tolist()
            self.log.global_draw.append(draw.used_global)
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert totals is not None  # grad_accumulation ≥ 1
        total, range_loss, consistency = (totals / settings.grad_accumulation).tolist()  # waits for the step
        self.log.loss.append(total)
        self.log.range_loss.append(range_loss)
        self.log.consistency_loss.append(consistency)
        self.log.curriculum_weight.append(settings.timesteps.curriculum_weight(tau))
        self.log.step_seconds.append(time.perf_counter() - started)  # reading the losses waited for the device
        progress.update(step, settings.steps, total)

    def _check_finite_loss(self, step: int, loss: float) -> None:
        """Stop at the first non-finite loss: every later update would only spread NaN through the adapters."""
        if not math.isfinite(loss):
            raise TrainingDiverged(self._divergence_message(step + 1, f"the loss is {loss}"))

    def _divergence_message(self, step: int, what: str) -> str:
        settings = self.settings
        last = next(((i, v) for i, v in reversed(list(enumerate(self.log.loss, start=1))) if math.isfinite(v)), None)
        before = f" (last finite loss {last[1]:.4g} at step {last[0]})" if last else ""
        return (
            f"training diverged at step {step} of {settings.steps}: {what}{before}; no LoRA is output. Lower the "
            f"learning rate (now {settings.learning_rate:g}), keep gradient clipping on (grad_clip now "
            f"{settings.grad_clip:g}; 1 is DeMe's), or use AdamW (now {settings.optimizer})."
        )

    def _losses(self, guider, extra_args, conds, x0, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, range loss, consistency loss) of one micro-batch."""
        sampling = guider.inner_model.model_sampling
        device = x0.device
        noise = to_device(torch.randn(x0.shape, generator=self.generator, dtype=torch.float32), device, x0.dtype)
        sigma = to_device(sigma, device)
        noisy = sampling.noise_scaling(sigma, noise, x0)
        scale = self._output_scale(sampling, sigma, x0)
        guider.conds["positive"] = conds
        consistency = torch.zeros((), device=device)
        weight = self.settings.consistency_weight
        if weight > 0:
            with torch.no_grad(), self.switch.off(), self._autocast(device):
                frozen = _scaled(guider(noisy, sigma, **extra_args).float(), scale)
        with self._autocast(device):
            prediction = _scaled(guider(noisy, sigma, **extra_args).float(), scale)
        range_loss = self.loss_fn(prediction, _scaled(x0.float(), scale))
        if weight > 0:
            consistency = self.loss_fn(prediction, frozen)
        return range_loss + weight * consistency, range_loss, consistency

    def _output_scale(self, sampling, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
        """None (x₀ loss), or |b(σ)| in D = a·x + b·output: dividing x₀ errors by it gives ε / v / velocity errors."""
        if self.settings.loss_space == "x0":
            return None
        shape = (sigma.shape[0],) + (1,) * (x0.ndim - 1)
        ones = torch.ones(shape, device=x0.device)
        return sampling.calculate_denoised(sigma.float(), ones, torch.zeros_like(ones)).abs().clamp_min(1e-8)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    # evaluation ----------------------------------------------------------------------------------

    def _evaluation_batch(self, latents: torch.Tensor, levels: NoiseLevels):
        """A fixed batch: the first few latents at fixed quantiles of the range, with seeded noise."""
        count = min(latents.shape[0], EVALUATION_IMAGES)
        quantiles = torch.tensor(EVALUATION_LEVELS, dtype=torch.float64)
        times = range_quantile(quantiles, self.settings.timesteps.expert_range)
        indices = torch.arange(count).repeat_interleave(len(EVALUATION_LEVELS))
        sigma = levels.sigma(times.repeat(count))
        generator = torch.Generator().manual_seed(self.settings.seed + 1)
        noise = torch.randn((len(indices), *latents.shape[1:]), generator=generator)
        return indices, sigma, noise.to(device=latents.device, dtype=latents.dtype)

    def _evaluate(self, guider, extra_args, conds, count, indices, sigma, noise) -> float:
        sampling = guider.inner_model.model_sampling
        x0 = self.latents[indices]
        sigma = sigma.to(x0.device)
        noisy = sampling.noise_scaling(sigma, noise, x0)
        scale = self._output_scale(sampling, sigma, x0)
        guider.conds["positive"] = select_rows(conds, indices, count)
        with torch.no_grad(), self._autocast(x0.device):
            prediction = _scaled(guider(noisy, sigma, **extra_args).float(), scale)
        return float(self.loss_fn(prediction, _scaled(x0.float(), scale)))

    # optimiser -----------------------------------------------------------------------------------

    def _parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.lora.values() if p.requires_grad]
        if self.projection is not None:
            params += list(self.projection.weights.values())
        return params

    def _optimizer(self) -> torch.optim.Optimizer:
        settings, params = self.settings, self._parameters()
        if settings.optimizer in ADAM_OPTIMIZERS:
            beta1 = settings.momentum.beta1_start if settings.momentum is not None else 0.9
            adam = torch.optim.AdamW if settings.optimizer == "AdamW" else torch.optim.Adam
            return adam(params, lr=settings.learning_rate, betas=(beta1, ADAM_BETA2))
        other = torch.optim.SGD if settings.optimizer == "SGD" else torch.optim.RMSprop
        return other(params, lr=settings.learning_rate)

    def _schedule(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """Set this step's β₁ and learning rate (MDLRC) and log them."""
        momentum, base_lr = self.settings.momentum, self.settings.learning_rate
        for group in optimizer.param_groups:
            if momentum is not None:
                group["betas"] = (momentum.beta1(progress), group["betas"][1])
                group["lr"] = momentum.learning_rate(base_lr, progress)
        group = optimizer.param_groups[0]
        self.log.beta1.append(float(group["betas"][0]) if "betas" in group else float(group.get("momentum", 0.0)))
        self.log.lr.append(float(group["lr"]))

    # channel projections -------------------------------------------------------------------------

    def _create_projections(self, guider, extra_args, conds) -> None:
        """Identity projections sized by one probing forward pass (channel counts per block)."""
        projection = self.projection
        if projection is None:
            raise RuntimeError("training: channel projections were asked for but none were set up")
        projection.probed_channels = {}
        first = torch.zeros(1, dtype=torch.long)
        guider.conds["positive"] = select_rows(conds, first, self.latents.shape[0])
        latent = self.latents[first]
        sigma = torch.full((1,), float(guider.inner_model.model_sampling.sigma_max), device=latent.device)
        try:
            with torch.no_grad():
                guider(latent, sigma, **extra_args)
            channels = projection.probed_channels
        finally:
            projection.probed_channels = None
        projection.weights = {
            block: torch.nn.Parameter(torch.eye(count, dtype=torch.float32, device=latent.device))
            for block, count in channels.items()
        }

    def _record_range(self, levels: NoiseLevels) -> None:
        time_range = self.settings.timesteps.expert_range
        self.log.range_normalized_time = (time_range.low, time_range.high)
        ends = levels.sigma(torch.tensor([time_range.low, time_range.high], dtype=torch.float64))
        self.log.range_sigma = tuple(ends.tolist())
        grid = torch.linspace(0, 1, 11, dtype=torch.float64)
        self.log.schedule_sigma = levels.sigma(grid).tolist()


def _scaled(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return values if scale is None else values / scale


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: on CUDA through pinned memory, copied
    asynchronously (a copy from pageable memory waits until the device has finished all queued work)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device=device, dtype=dtype)
    return tensor.pin_memory().to(device=device, dtype=dtype, non_blocking=True)


class _TrainingSampler(comfy.samplers.Sampler):
    """The guider calls this with the conditioning prepared and the model loaded; it trains and returns zeros."""

    def __init__(self, trainer: RangeExpertTrainer):
        self.trainer = trainer

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        self.trainer.run(model_wrap, extra_args, latent_image)
        return torch.zeros_like(latent_image)


# -- entry point -------------------------------------------------------------------------------------


def train_range_expert(model, latents: dict, positive: list, settings: TrainingSettings, node_id=None):
    """Train a range-expert LoRA on a clone of ``model``; returns a :class:`TrainingResult`.

    The output MODEL is ``model`` with the trained LoRA loaded the way the stock LoRA loaders load it (and
    the projections, if trained), so it samples exactly like the saved LoRA loaded later.
    """
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if samples is None or samples.ndim < 3 or samples.shape[0] == 0:
        raise ValueError(
            "the dataset is empty: connect latents (e.g. VAE Encode of your images) with at least one image"
        )
    samples = samples.float()
    conditioning = dataset_conditioning(positive, samples.shape[0])
    switch = AdapterSwitch()
    patcher = compat.training_patcher(model)  # a classic (non-dynamic-VRAM) clone: adapters on every weight
    patcher.set_model_compute_dtype(node_helpers.string_to_torch_dtype(settings.training_dtype))
    lora_dtype = node_helpers.string_to_torch_dtype(settings.lora_dtype)
    network = patcher.model.diffusion_model
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # ComfyUI's adapters initialise from the global generator
        lora = attach_adapters(patcher, settings.algorithm, settings.rank, lora_dtype, switch)
        trainer = RangeExpertTrainer(settings, lora, switch, node_id)
        if settings.channel_projection:
            projection_patches.check_unet(patcher)
            trainer.projection = projection_patches.ProjectionSet({}, switch)
            projection_patches.install(patcher, trainer.projection)
        with (
            frozen_parameters(patcher.model),
            gradient_checkpointing(network, settings.gradient_checkpointing),
            compat.training_mode(),
        ):
            mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
            guider = Guider_Basic(patcher)
            guider.set_conds(conditioning)
            try:
                guider.sample(
                    torch.zeros_like(samples),
                    samples,
                    _TrainingSampler(trainer),
                    torch.arange(samples.shape[0], dtype=torch.float32),
                    seed=settings.seed,
                )
            except RuntimeError as error:
                if "modified by an inplace operation" in str(error) and not settings.gradient_checkpointing:
                    raise ValueError(
                        "this model's network changes activations in place (Flux-family models in ComfyUI 0.3.64 "
                        "do), which breaks the backward pass: turn gradient_checkpointing on to train it"
                    ) from error
                raise
        lora_out = {key: value.detach().to(device="cpu", dtype=lora_dtype).clone() for key, value in lora.items()}
        projections = (
            {block: weight.detach().float().cpu().clone() for block, weight in trainer.projection.weights.items()}
            if trainer.projection is not None
            else None
        )
    result_model, _ = comfy.sd.load_lora_for_models(model, None, lora_out, 1.0, 0)
    if projections:
        result_model = projection_patches.with_projections(result_model, projections)
    return TrainingResult(result_model, lora_out, trainer.log, projections)
