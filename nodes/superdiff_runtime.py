"""SuperDiff inside ComfyUI: the component chain, the N-model guider and the reverse-SDE sampler loop.

The maths lives in ``merging.sampling.superdiff``; this module only connects it to ComfyUI's sampling path
(``CFGGuider`` → ``KSAMPLER`` → model):

- :class:`SuperDiffGuider` (a ``CFGGuider``) holds N components (MODEL, positive, optional negative, cfg).
  Components are grouped by MODEL; every conditioning of one group is evaluated in ONE
  ``calc_cond_batch`` call per step (a negative shared by several components of that model is evaluated
  once). The first component's MODEL is cloned as the guider's model, every other model is registered as an
  additional model so ComfyUI loads them together before sampling, each gets ``pre_run()`` and its own
  processed conditioning and model options.
- :class:`SuperDiffSampler` (a ``KSAMPLER``) runs :func:`sample_superdiff`, which owns the loop: it asks the
  guider for every component's denoised prediction, draws the step's noise from the seed *before* κ, and
  applies ``merging.sampling.superdiff.superdiff_step``; it calls ``callback`` every step (previews, progress) and
  stops when the user cancels.
- The run's κ and log-density traces are kept on the guider, keyed by a fingerprint of the latent the run
  returned, so the Trace node can find them after ``SamplerCustomAdvanced``.

Any other sampler with the SuperDiff guider, or the SuperDiff sampler with any other guider, is refused
before a network runs: the Itô estimator needs this exact SDE.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import node_helpers
import torch

from ..merging.sampling import superdiff as sd
from . import compat
from .common import model_family, weights_key

logger = logging.getLogger(__name__)

ADDITIONAL_MODELS_KEY = "diffusion_merge.superdiff"
_REMEMBERED_TRACES = 8


@dataclass(frozen=True)
class Component:
    """One SuperDiff component: a MODEL, its prompt, an optional negative prompt and its CFG scale."""

    model: Any
    positive: list
    negative: list | None = None
    cfg: float = 1.0

    @property
    def guided(self) -> bool:
        """Whether the component runs CFG (a negative and cfg ≠ 1); otherwise its prompt alone drives it."""
        return self.negative is not None and abs(self.cfg - 1.0) > 1e-9


def append_component(components: tuple[Component, ...] | None, component: Component) -> tuple[Component, ...]:
    """A new chain with ``component`` last (chains are immutable: node outputs are cached)."""
    return (*(components or ()), component)


# -- validation -------------------------------------------------------------------------------------


def sampling_kind(model_sampling) -> str:
    """'flow' for CONST (x = (1 − σ)x₀ + σε), 've' for ε/v/EDM/x₀ models (x = x₀ + σε)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.EPS) and not isinstance(
        model_sampling, comfy.model_sampling.IMG_TO_IMG
    ):
        return "ve"
    raise ValueError(
        f"SuperDiff supports ε/v-prediction (VE) and rectified-flow (CONST) models; this model samples with "
        f"{type(model_sampling).__name__}"
    )


def _latent_format(patcher) -> str:
    return type(patcher.get_model_object("latent_format")).__name__


def _every(tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The per-component predictions, every one of which a model group has filled in."""
    missing = [index + 1 for index, tensor in enumerate(tensors) if tensor is None]
    if missing:
        raise RuntimeError(f"no prediction for SuperDiff component(s) {missing}")
    return [tensor for tensor in tensors if tensor is not None]


def check_components(components: tuple[Component, ...]) -> str:
    """Refuse component lists SuperDiff cannot sample; returns their common parameterisation ('ve'/'flow')."""
    if not components:
        raise ValueError("no components: connect at least one SuperDiff Component node")
    first = components[0].model
    kind = None
    for number, component in enumerate(components, start=1):
        model = component.model
        if not hasattr(model, "model") or not hasattr(model, "get_model_object"):
            raise ValueError(f"component {number}: the model input is not a MODEL")
        if not component.positive:
            raise ValueError(f"component {number}: the positive conditioning is empty")
        if component.negative is None and abs(component.cfg - 1.0) > 1e-9:
            raise ValueError(
                f"component {number} has cfg {component.cfg:g} but no negative prompt: connect a negative "
                "(CFG needs one) or set cfg to 1"
            )
        if _latent_format(model) != _latent_format(first):
            raise ValueError(
                f"component {number} ({model_family(model)}) has latent format {_latent_format(model)} but component 1 "
                f"({model_family(first)}) has {_latent_format(first)}: SuperDiff mixes scores in one latent space — "
                "use models of one family"
            )
        this_kind = sampling_kind(model.get_model_object("model_sampling"))
        if kind is not None and this_kind != kind:
            raise ValueError(
                f"component {number} samples as {this_kind} but component 1 as {kind}: mixing rectified-flow and "
                "ε/v models is not supported"
            )
        kind = this_kind
    _check_shared_modules(components)
    assert kind is not None  # set by the first component
    return kind


def _check_shared_modules(components: tuple[Component, ...]) -> None:
    seen: dict[int, tuple[int, tuple]] = {}
    for number, component in enumerate(components, start=1):
        key = weights_key(component.model)
        first_number, first_key = seen.setdefault(key[0], (number, key))
        if first_key != key:
            raise ValueError(
                f"components {first_number} and {number} are two versions of one loaded model (e.g. with and "
                "without a LoRA, or another model-sampling patch): SuperDiff evaluates every component at every "
                "step and ComfyUI holds one version of a model's weights at a time — save one as its own "
                "checkpoint, or put the difference in the prompts"
            )


# -- the guider -------------------------------------------------------------------------------------


@dataclass
class _Group:
    """The components served by one ModelPatcher, and the conditioning names they evaluate."""

    patcher: Any
    members: list[int]
    cond_names: list[str]
    is_primary: bool  # the first component's MODEL: evaluated with the sampler's model options
    shares_primary_module: bool  # same loaded weights as the first (its conditioning is processed with it)
    model_options: dict | None = None  # during a run, for groups other than the primary
    conds: dict | None = None  # during a run, processed conditioning of groups with modules of their own


class SuperDiffGuider(comfy.samplers.CFGGuider):
    """A GUIDER over N components for the SuperDiff sampler (refuses any other sampler)."""

    def __init__(self, components: tuple[Component, ...]):
        components = tuple(components or ())
        self.kind = check_components(components)
        self.components = components
        primary = components[0].model.clone()
        super().__init__(primary)
        self.groups, conds, self.names = self._plan(components)
        extras = self._additional_models()
        if extras:
            primary.set_additional_models(ADDITIONAL_MODELS_KEY, extras)
        self.inner_set_conds(conds)
        self.traces: OrderedDict[str, sd.SuperDiffTrace] = OrderedDict()
        self.last_trace: sd.SuperDiffTrace | None = None
        self._pending_trace: sd.SuperDiffTrace | None = None
        self._scales: tuple | None = None  # (device, dtype, rank) and the CFG scales as a tensor there

    def _plan(self, components) -> tuple[list[_Group], dict, list[tuple[str, str | None]]]:
        first = components[0].model
        groups: dict[int, _Group] = {}
        conds: dict[str, list] = {}
        names: list[tuple[str, str | None]] = []
        by_object: dict[tuple[int, int, str], str] = {}
        for index, component in enumerate(components):
            patcher = component.model
            group = groups.setdefault(
                id(patcher), _Group(patcher, [], [], patcher is first, patcher.model is first.model)
            )
            group.members.append(index)
            positive = self._name(group, component.positive, "positive", conds, by_object)
            negative = self._name(group, component.negative, "negative", conds, by_object) if component.guided else None
            names.append((positive, negative))
        return list(groups.values()), conds, names

    @staticmethod
    def _name(group, conditioning, prompt_type, conds, by_object) -> str:
        """The cond name of ``conditioning`` for ``group``: one per distinct conditioning object and model."""
        key = (id(group.patcher), id(conditioning), prompt_type)
        if key not in by_object:
            name = f"superdiff_{len(conds)}"
            by_object[key] = name
            group.cond_names.append(name)
            conds[name] = node_helpers.conditioning_set_values(conditioning, {"prompt_type": prompt_type})
        return by_object[key]

    def _additional_models(self) -> list:
        chosen: dict[int, Any] = {}
        for group in self.groups:
            if not group.shares_primary_module:
                chosen.setdefault(id(group.patcher.model), group.patcher)
        return list(chosen.values())

    # -- sampling ------------------------------------------------------------------------------------

    def sample(
        self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None
    ):
        if not isinstance(sampler, SuperDiffSampler):
            raise ValueError(
                f"the SuperDiff guider needs the SuperDiff Sampler, not {_sampler_name(sampler)}: "
                f"{sd.ODE_REFUSAL} — connect a 'SuperDiff Sampler' node to SamplerCustomAdvanced"
            )
        if denoise_mask is not None:
            raise ValueError("SuperDiff does not support inpainting (the latent has a noise mask); remove the mask")
        self._pending_trace = None
        output = super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        if self._pending_trace is not None:
            self._remember(output, self._pending_trace)
        return output

    def inner_sample(
        self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **extras
    ):
        """Prepare every other model (pre_run, its own conditioning and options) around the stock inner sample."""
        extras = compat.inner_sample_extras(extras)
        shapes = compat.latent_shapes_of(extras)
        if shapes is not None and len(shapes) > 1:
            raise ValueError(
                f"SuperDiff samples one latent, but this one packs {len(shapes)} (e.g. video and audio); "
                "sample such models without SuperDiff"
            )
        others = [group for group in self.groups if not group.is_primary]
        own = [group for group in others if not group.shares_primary_module]
        raw = {name: self.conds.pop(name) for group in own for name in group.cond_names}
        latent = latent_image
        if latent is not None and torch.count_nonzero(latent) > 0:
            latent = self.inner_model.process_latent_in(latent)
        for group in others:
            self._prepare_group(group, raw, sigmas)
        for group in own:
            group.patcher.pre_run()
            compat.set_latent_shapes(group.patcher.model, shapes)
            group_conds = {name: raw[name] for name in group.cond_names}
            group.conds = compat.process_conds(
                group.patcher.model, noise, group_conds, device, latent, denoise_mask, seed, shapes
            )
        try:
            return super().inner_sample(
                noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **extras
            )
        finally:
            for group in others:
                self.conds.update(group.conds or {})  # so ComfyUI's clean-up sees every model's conditioning
                group.model_options, group.conds = None, None

    def _prepare_group(self, group: _Group, raw: dict, sigmas) -> None:
        """A model's own options: its wrappers, callbacks and patches, as CFGGuider.sample does for the first."""
        group_conds = {name: raw.get(name, self.conds.get(name)) for name in group.cond_names}
        options = comfy.model_patcher.create_model_options_clone(group.patcher.model_options)
        options.setdefault("transformer_options", {})
        comfy.sampler_helpers.prepare_model_patcher(group.patcher, group_conds, options)
        options["transformer_options"]["sample_sigmas"] = sigmas
        group.model_options = options

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        raise ValueError(
            f"the SuperDiff guider was called by a sampler other than the SuperDiff Sampler: {sd.ODE_REFUSAL}"
        )

    def predict_components(self, x, timestep, model_options, seed=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every component's unguided (positive) and guided (CFG) denoised prediction, stacked (N, B, …).

        One ``calc_cond_batch`` call per model group evaluates all of that model's conditionings. When every
        component runs plain CFG (no custom CFG function on any model), the N guided predictions are computed
        together, in three launches.
        """
        count = len(self.components)
        together = all(component.guided for component in self.components) and all(
            _plain_cfg(group.model_options if group.model_options is not None else model_options)
            for group in self.groups
        )
        positives: list[torch.Tensor | None] = [None] * count
        others: list[torch.Tensor | None] = [None] * count  # negatives (together) or guided predictions
        for group in self.groups:
            base_model = group.patcher.model if not group.shares_primary_module else self.inner_model
            options = group.model_options if group.model_options is not None else model_options
            processed = group.conds if group.conds is not None else self.conds
            conds = [processed[name] for name in group.cond_names]
            predictions = comfy.samplers.calc_cond_batch(base_model, conds, x, timestep, options)
            outputs = dict(zip(group.cond_names, predictions, strict=True))
            for index in group.members:
                positive_name, negative_name = self.names[index]
                positives[index] = outputs[positive_name]
                if not together:
                    others[index] = self._guided(index, outputs, base_model, x, timestep, options, processed)
                elif negative_name is None:  # `together` means every component has a negative
                    raise RuntimeError(f"SuperDiff component {index + 1} has no negative to guide with")
                else:
                    others[index] = outputs[negative_name]
        positive = torch.stack(_every(positives))
        if not together:
            return positive, torch.stack(_every(others))
        first = others[0]
        negative = (
            first if first is not None and all(other is first for other in others) else torch.stack(_every(others))
        )
        return positive, negative + (positive - negative) * self._cfg_scales(positive)  # CFG, as cfg_function

    def _cfg_scales(self, like: torch.Tensor) -> float | torch.Tensor:
        """The components' CFG scales: one number when they agree, else an (N, 1, …) tensor made once per device."""
        scales = [component.cfg for component in self.components]
        if all(scale == scales[0] for scale in scales):
            return scales[0]
        key = (like.device, like.dtype, like.dim())
        if self._scales is None or self._scales[0] != key:
            shape = (len(scales),) + (1,) * (like.dim() - 1)
            self._scales = key, torch.tensor(scales, dtype=like.dtype).reshape(shape).to(like.device)
        return self._scales[1]

    def _guided(self, index, outputs, base_model, x, timestep, options, processed) -> torch.Tensor:
        positive_name, negative_name = self.names[index]
        if negative_name is None:
            return outputs[positive_name]
        return comfy.samplers.cfg_function(
            base_model,
            outputs[positive_name],
            outputs[negative_name],
            self.components[index].cfg,
            x,
            timestep,
            model_options=options,
            cond=processed[positive_name],
            uncond=processed[negative_name],
        )

    # -- traces ----------------------------------------------------------------------------------------

    def hand_over_trace(self, trace: sd.SuperDiffTrace) -> None:
        """Called by the sampler at the end of a run; kept once the run's output latent is known."""
        self._pending_trace = trace

    def _remember(self, output: torch.Tensor, trace: sd.SuperDiffTrace) -> None:
        key = sd.latent_fingerprint(output)
        self.traces[key] = trace
        self.traces.move_to_end(key)
        while len(self.traces) > _REMEMBERED_TRACES:
            self.traces.popitem(last=False)
        self.last_trace = trace

    def trace_for(self, samples: torch.Tensor) -> sd.SuperDiffTrace:
        """The trace of the run that returned ``samples`` (a LATENT's samples), or a ValueError saying why not."""
        trace = self.traces.get(sd.latent_fingerprint(samples))
        if trace is None:
            raise ValueError(
                "this latent was not sampled with this SuperDiff guider (or was changed afterwards): connect the "
                "'output' of the SamplerCustomAdvanced that used this guider"
            )
        return trace


def _plain_cfg(model_options: dict) -> bool:
    """Whether CFG on these options is ComfyUI's plain formula (no custom CFG or post-CFG function)."""
    return "sampler_cfg_function" not in model_options and not model_options.get("sampler_post_cfg_function")


def _sampler_name(sampler) -> str:
    function = getattr(sampler, "sampler_function", None)
    name = getattr(function, "__name__", None) or type(sampler).__name__
    return f"'{name.removeprefix('sample_')}'"


# -- the sampler ------------------------------------------------------------------------------------


class SuperDiffSampler(comfy.samplers.KSAMPLER):
    """A SAMPLER whose loop is SuperDiff's reverse SDE (for SamplerCustomAdvanced with the SuperDiff guider)."""

    def __init__(self, settings: sd.SuperDiffSettings):
        super().__init__(sample_superdiff, extra_options={"settings": settings})
        self.settings = settings


def _guider_of(model) -> SuperDiffGuider:
    guider = getattr(model, "inner_model", None)
    if not isinstance(guider, SuperDiffGuider):
        raise ValueError(
            "the SuperDiff Sampler needs the SuperDiff Guider (it evaluates every component separately); "
            f"got {type(guider).__name__}"
        )
    return guider


@torch.no_grad()
def sample_superdiff(model, x, sigmas, extra_args=None, callback=None, disable=None, settings=None):
    """The SuperDiff loop: for each step, all components' predictions, noise, κ, the SDE move, Itô updates.

    Nothing in the loop reads a value back from the device, so the host keeps queueing work while the GPU
    computes; the singular-κ count and the trace are read once, after the last step.
    """
    guider = _guider_of(model)
    settings = settings or sd.SuperDiffSettings()
    extra_args = extra_args or {}
    model_options, seed = extra_args.get("model_options", {}), extra_args.get("seed")
    kind = sampling_kind(guider.inner_model.model_sampling)
    count = len(guider.components)
    bias = settings.bias_for(count)
    x, used, skip = _start(model, x, sigmas, kind, settings)
    values = used.tolist()  # σ as Python floats, read once
    log_density = torch.zeros(x.shape[0], count, dtype=sd.scalar_dtype(x.device), device=x.device)
    bias_t = sd.bias_tensor(bias, log_density)  # made on the device once, not at every step
    offsets = sd.and_step_offsets(bias, len(values) - 1) if settings.mode == "AND" else None
    offsets_t = sd.bias_tensor(offsets, log_density)
    generator = sd.noise_generator(seed)
    kappas, densities, invalid = [], [log_density], []
    timesteps = used[:-1, None] * x.new_ones([x.shape[0]])  # every step's σ per sample, in one launch
    for step, (sigma, sigma_next) in enumerate(itertools.pairwise(values)):
        mm.throw_exception_if_processing_interrupted()
        coefficients = sd.step_coefficients(kind, sigma, sigma_next)
        positive, guided = guider.predict_components(x, timesteps[step], model_options, seed)
        scores = sd.score_from_denoised(x, positive, sigma, kind)
        guided_scores = sd.score_from_denoised(x, guided, sigma, kind)
        noise = sd.draw_noise(generator, x)  # drawn before κ: AND solves with it
        result = sd.superdiff_step(
            x, scores, guided_scores, noise, log_density, coefficients, settings, bias_t, offsets_t
        )
        if callback is not None:
            denoised = sd.denoised_from_score(x, result.mixed_score, sigma, kind)
            callback({"x": x, "i": step + skip, "sigma": used[step], "sigma_hat": used[step], "denoised": denoised})
        x, log_density = result.x, result.log_density
        kappas.append(result.kappa)
        densities.append(log_density)
        if result.invalid is not None:
            invalid.append(result.invalid)
    invalid_count = int(torch.stack(invalid).sum()) if invalid else 0  # the run's one read-back of it
    if invalid_count:
        logger.warning("SuperDiff AND: %d sample-step(s) had a singular κ system and used equal weights", invalid_count)
    guider.hand_over_trace(_trace(settings, kind, bias, used, kappas, densities, invalid_count))
    return x


def _start(model, x, sigmas, kind: str, settings: sd.SuperDiffSettings):
    """(x, the σ used, how many were skipped): flow schedules start below ``flow_sigma_max``, x rescaled there."""
    skip = sd.start_schedule(sigmas, kind, settings.flow_sigma_max)
    if not skip:
        return x, sigmas, 0
    start = float(sigmas[skip])
    logger.info("SuperDiff: the flow schedule starts at σ %.4g (first σ below %.4g)", start, settings.flow_sigma_max)
    # the sampler's model wrapper holds the clean latent the noise was added to (zeros for text-to-image)
    x = sd.restart_flow(x, getattr(model, "latent_image", None), float(sigmas[0]), start)
    return x, sigmas[skip:], skip


def _trace(settings, kind, bias, sigmas, kappas, densities, invalid) -> sd.SuperDiffTrace:
    count = densities[0].shape[-1]
    return sd.SuperDiffTrace(
        mode=settings.mode,
        kind=kind,
        temperature=settings.temperature,
        bias=tuple(bias),
        sigmas=sigmas.detach().to("cpu", torch.float64),
        kappa=torch.stack(kappas).cpu(),
        log_density=torch.stack(densities).cpu(),
        invalid_kappa=invalid,
        labels=tuple(f"component {i + 1}" for i in range(count)),
    )
