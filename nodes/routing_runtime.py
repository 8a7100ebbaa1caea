"""σ-range routing inside ComfyUI: experts, the APPLY_MODEL router and the routed guider.

A routed MODEL is a clone of the first expert carrying wrappers (``comfy.patcher_extension``):

- ``OUTER_SAMPLE`` starts a *run* per sampler call: it resolves the experts' ends to σ with the model
  sampling actually used (so a shift node applied after routing is honoured), checks that the experts
  cover the schedule and that their parameterisations agree, before the network is called once.
- ``APPLY_MODEL`` dispatches every network call on its σ: the first expert's weights run the wrapped
  call itself; an expert with *other modules* is called through its own ``BaseModel.apply_model``; an
  expert that *shares the first expert's modules* with different patches (base + τ, a LoRA, a merge:
  ``is_clone``) is swapped in once with ``load_models_gpu``, which re-patches the shared weights.
- When an expert is a different model class (SDXL base → refiner), ``SAMPLER_SAMPLE`` encodes the
  conditioning once more with that model and ``PREDICT_NOISE`` hands each step the right set.

Memory modes: ``resident`` registers the other experts as additional models, so ComfyUI loads them
together with the routed model before sampling (no load mid-run), and keeps the weights of clone experts as
resident weight sets (``routing_weights``) while they fit; ``sequential`` loads only the active expert and,
at each boundary, unloads the outgoing one and loads the next (one load per expert per run).

The σ of a call lives on the device; reading it would stop the host until the GPU has finished everything queued.
The expert is therefore chosen from the sampler's reported progress (``merging.sampling.schedules.call_windows``)
and the calls' real σ are read once, after the run: a sampler whose calls did not follow its progress (a restart
sampler, adaptive steps) is run again reading σ where needed, and remembered.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import comfy.model_management as mm
import comfy.patcher_extension
import comfy.samplers
import node_helpers
import torch

from ..merging.sampling.schedules import (
    Boundary,
    call_windows,
    check_coverage,
    coverage_problem,
    expert_index,
    resolve_ends,
)
from . import compat
from .common import model_family, parameterisation, sigma_scale, weights_key
from .routing_weights import ExpertWeightSets

logger = logging.getLogger(__name__)

ROUTER_KEY = "diffusion_merge.router"
MEMORY_MODES = ("resident", "sequential")
_PATCH_OPTIONS = ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function")
_REMEMBERED_SAMPLINGS = 64
# How an expert is chosen per call, from the cheapest to the safest: the schedule point for calls between
# steps whose window holds a boundary, a read-back of σ for just those calls, a read-back at every call.
CHOICE_MODES = ("predict", "window", "exact")
_REMEMBERED_SAMPLERS = 64
# ComfyUI's samplers whose calls leave that pattern (measured over every boundary position of a 10-step schedule):
# midpoint evaluations between reported steps, and the adaptive solvers. Others start at "predict"; any sampler
# is checked after each run all the same.
_INITIAL_CHOICE_MODES = {
    **dict.fromkeys(
        ("sample_heunpp2", "sample_dpm_2", "sample_dpmpp_sde", "sample_dpmpp_sde_gpu", "sample_seeds_2"), "window"
    ),
    **dict.fromkeys(("sample_seeds_3", "sample_sa_solver_pece"), "window"),
    **dict.fromkeys(("dpm_fast_function", "dpm_adaptive_function"), "exact"),
}


@dataclass(frozen=True)
class Expert:
    """One expert of a routed model: a MODEL and where it stops (plus guider-only settings)."""

    model: Any
    end: Boundary
    cfg: float | None = None
    positive: list | None = None
    negative: list | None = None


def append_expert(experts: tuple[Expert, ...] | None, expert: Expert) -> tuple[Expert, ...]:
    """A new expert list with ``expert`` after ``experts`` (lists are immutable: node outputs are cached)."""
    return (*(experts or ()), expert)


# -- model sampling ---------------------------------------------------------------------------------


def _sampling_of(patcher):
    return patcher.get_model_object("model_sampling")


# -- validation -------------------------------------------------------------------------------------


def check_experts(experts: tuple[Expert, ...]) -> None:
    """Refuse expert lists that cannot be routed, naming the expert and what differs."""
    if not experts:
        raise ValueError("no experts: connect at least one Route Expert node")
    first = experts[0].model
    for number, expert in enumerate(experts, start=1):
        model = expert.model
        if not hasattr(model, "model") or not hasattr(model, "get_model_object"):
            raise ValueError(f"expert {number}: the input is not a MODEL")
        if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, ROUTER_KEY):
            raise ValueError(f"expert {number} is itself a routed model; chain all experts into one router instead")
        _check_samemodel_family(first, model, number)


def _check_samemodel_family(first, model, number: int) -> None:
    checks = (
        ("latent format", lambda p: type(p.model.latent_format).__name__),
        ("model type", lambda p: getattr(p.model.model_type, "name", str(p.model.model_type))),
        ("prediction", lambda p: parameterisation(_sampling_of(p))),
    )
    for what, read in checks:
        if read(model) != read(first):
            raise ValueError(
                f"expert {number} ({model_family(model)}) has {what} {read(model)} but expert 1 "
                f"({model_family(first)}) has {read(first)}: routed experts must share one latent space and "
                "prediction type — use models of the same family (e.g. SDXL base + refiner, Wan 2.2 high + low)"
            )


def _ignored_patches(patcher) -> list[str]:
    """Model patches of an expert that a routed model cannot apply (only its weights are used)."""
    options = patcher.model_options
    transformer = options.get("transformer_options", {})
    found = [name for name in ("patches", "patches_replace") if transformer.get(name)]
    found += [name for name in _PATCH_OPTIONS if options.get(name)]
    found += [kind for kind, by_key in patcher.wrappers.items() if any(by_key.values())]
    return found


# -- the router -------------------------------------------------------------------------------------


class Kind(Enum):
    """How an expert's network is reached during sampling."""

    PRIMARY = "the routed model's own weights"
    SWAP = "same modules as expert 1, other patches: swapped in at its boundary"
    DELEGATE = "separate modules: called through its own apply_model"


def _arch_key(base_model) -> tuple:
    return type(base_model), type(base_model.model_config)


class SigmaRouter:
    """Dispatches each network call of a routed MODEL to the expert whose σ range holds the call's σ."""

    def __init__(self, experts: tuple[Expert, ...], memory_mode: str = "resident", node_id: str | None = None):
        check_experts(experts)
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode '{memory_mode}' is not one of {', '.join(MEMORY_MODES)}")
        self.experts = experts
        self.memory_mode = memory_mode
        self.node_id = node_id
        self.boundaries = [expert.end for expert in experts]
        self.primary_module = experts[0].model.model
        self.kinds, self.canonical = self._classify()
        archs = {_arch_key(p.model) for p, k in zip(self.canonical, self.kinds, strict=True) if k is Kind.DELEGATE}
        self.own_conds = archs - {_arch_key(self.primary_module)}
        self._run: RoutingRun | None = None
        self.weight_sets = ExpertWeightSets()  # clone experts' resident weights (resident mode)
        resolve_ends(self.boundaries, sigma_scale(_sampling_of(experts[0].model)))  # order errors now

    def _classify(self) -> tuple[list[Kind], list[Any]]:
        first_key = weights_key(self.experts[0].model)
        by_key: dict[tuple, Any] = {}
        kinds, canonical = [], []
        for expert in self.experts:
            key = weights_key(expert.model)
            canonical.append(by_key.setdefault(key, expert.model))
            if expert.model.model is not self.primary_module:
                kinds.append(Kind.DELEGATE)
            else:
                kinds.append(Kind.PRIMARY if key == first_key else Kind.SWAP)
        return kinds, canonical

    def install(self, routed) -> None:
        """Attach the wrappers (and, in resident mode, the other experts) to ``routed``, a clone of expert 1."""
        wrappers = comfy.patcher_extension.WrappersMP
        routed.add_wrapper_with_key(wrappers.OUTER_SAMPLE, ROUTER_KEY, self.outer_sample_wrapper)
        routed.add_wrapper_with_key(wrappers.APPLY_MODEL, ROUTER_KEY, self.apply_model_wrapper)
        routed.add_wrapper_with_key(wrappers.SAMPLER_SAMPLE, ROUTER_KEY, self.sampler_sample_wrapper)
        if self.own_conds:
            routed.add_wrapper_with_key(wrappers.PREDICT_NOISE, ROUTER_KEY, self.predict_noise_wrapper)
        if self.memory_mode == "resident":
            resident = self._first_per_module()
            if resident:
                routed.set_additional_models(ROUTER_KEY, resident)

    def _first_per_module(self) -> list[Any]:
        chosen: dict[int, Any] = {}
        for patcher, kind in zip(self.canonical, self.kinds, strict=True):
            if kind is Kind.DELEGATE:
                chosen.setdefault(id(patcher.model), patcher)
        return list(chosen.values())

    def warn_about_ignored_settings(self, uses_guider: bool) -> None:
        """Log what the routed model will not apply (patches on later experts, guider-only settings)."""
        for number, (expert, kind) in enumerate(zip(self.experts, self.kinds, strict=True), start=1):
            ignored = _ignored_patches(expert.model) if kind is not Kind.PRIMARY else []
            if ignored:
                logger.warning(
                    "expert %d carries model patches (%s) that routing does not apply; only its weights are "
                    "used. Apply such patches to the routed MODEL instead.",
                    number,
                    ", ".join(ignored),
                )
            has_guider_settings = expert.cfg or expert.positive is not None or expert.negative is not None
            if has_guider_settings and not uses_guider:
                logger.warning(
                    "expert %d sets cfg or conditioning, which only the Routed Guider uses; a routed MODEL "
                    "samples with the sampler's cfg and prompts",
                    number,
                )

    def current_expert(self, timestep: torch.Tensor) -> int:
        """The expert serving a call at ``timestep`` (σ) in the current run."""
        return self._active_run().choose(timestep)

    def _active_run(self) -> RoutingRun:
        if self._run is None:  # ComfyUI merges model wrappers only in CFGGuider.sample, which starts a run
            raise RuntimeError("a routed model was called outside a sampler run (CFGGuider.sample)")
        return self._run

    @contextlib.contextmanager
    def run(self, running, sigmas, conds: dict | None = None, choice_mode: str = "exact") -> Iterator[RoutingRun]:
        """One sampler call of ``running`` (the routed model or a clone of it) over ``sigmas``."""
        run = RoutingRun(self, running, sigmas, choice_mode)
        if self.memory_mode == "sequential":  # a previous run may have left a later expert loaded
            run.unload_others(running)
        else:  # weight sets made against modules ComfyUI has since (partly) unloaded are stale: free them first
            self.weight_sets.drop_unless_loaded(running)
        if self.own_conds and conds is not None:
            run.raw_conds = {name: [c.copy() for c in items] for name, items in conds.items()}
        previous, self._run = self._run, run
        try:
            yield run
        finally:
            self._run = previous
            run.finish()

    # -- wrappers ----------------------------------------------------------------------------------

    def outer_sample_wrapper(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        """OUTER_SAMPLE: one run per sampler call, validated before anything is loaded.

        If the run's calls did not follow the sampler's reported progress, the result is discarded and the
        sampler runs again choosing more carefully (and is remembered for the next runs).
        """
        guider = executor.class_obj
        key = _sampler_key(sampler)
        conds = _copied_conds(guider.conds)
        function = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
        mode = _learned_choice_modes.get(key) or _INITIAL_CHOICE_MODES.get(function, CHOICE_MODES[0])
        while True:
            with self.run(guider.model_patcher, sigmas, guider.conds, mode) as run:
                output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
                safer = run.choice.verdict()
            if safer is None:
                return output
            mode = max(safer, mode, key=CHOICE_MODES.index)
            _remember_choice_mode(key, mode)
            logger.info(
                "σ routing: this sampler's calls did not follow its reported steps; sampling again (%s σ reads)", mode
            )
            guider.conds = _copied_conds(conds)

    def sampler_sample_wrapper(
        self, executor, guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs
    ):
        """SAMPLER_SAMPLE: follow the sampler's progress (its step callback); encode the conditioning for experts
        of another model class, once per run."""
        run = self._run
        if run is None:
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs)
        if run.raw_conds is not None:
            denoise_mask = args[0] if args else kwargs.get("denoise_mask")
            run.encode_conds(guider, noise, latent_image, denoise_mask, extra_args.get("seed"))

        def progress(step, *rest, **named):
            run.choice.step_reported(step)
            return callback(step, *rest, **named) if callback is not None else None

        return executor(guider, sigmas, extra_args, progress, noise, latent_image, *args, **kwargs)

    def predict_noise_wrapper(self, executor, x, timestep, *args, **kwargs):
        """PREDICT_NOISE: hand each step the conditioning encoded by its expert's model class."""
        run = self._run
        if run is None or not run.conds_by_arch:
            return executor(x, timestep, *args, **kwargs)
        guider = executor.class_obj
        index = run.choose(timestep)
        saved, guider.conds = guider.conds, run.conds_by_arch[_arch_key(self.canonical[index].model)]
        try:
            return executor(x, timestep, *args, **kwargs)
        finally:
            guider.conds = saved

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        """APPLY_MODEL: run the network call on the expert whose range holds its σ."""
        if executor.class_obj is not self.primary_module:  # an expert's own apply_model re-entering
            return executor(x, t, *args, **kwargs)
        run = self._active_run()
        index = run.choose(t)
        run.activate(index, x.shape)
        if self.kinds[index] is Kind.DELEGATE:
            return self.canonical[index].model.apply_model(x, t, *args, **kwargs)
        return executor(x, t, *args, **kwargs)


class RoutingRun:
    """One sampler call through a routed model: resolved ends, the active expert, expert loads."""

    def __init__(self, router: SigmaRouter, running, sigmas, choice_mode: str = "exact"):
        self.router = router
        self.running = running
        sampling = _sampling_of(running)
        self._check_sampling(sampling)
        self.ends = resolve_ends(router.boundaries, sigma_scale(sampling))
        schedule = sigmas.detach().cpu()  # the run's one read of the schedule
        check_coverage(self.ends, schedule, router.boundaries)
        if router.node_id is not None:
            remember_sampling(router.node_id, sampling)
        if running.patches_uuid != router.experts[0].model.patches_uuid:
            logger.warning(
                "weight patches (e.g. a LoRA) were added to the routed MODEL after routing: they apply to the "
                "first expert's weights only — apply them to each expert before routing"
            )
        self.choice = ExpertChoice(self, schedule, choice_mode)
        self.active: int | None = None
        self.loads = 0
        self.raw_conds: dict | None = None
        self.conds_by_arch: dict[tuple, dict] = {}

    def _check_sampling(self, sampling) -> None:
        expected = parameterisation(sampling)
        for number, (expert, kind) in enumerate(zip(self.router.experts, self.router.kinds, strict=True), start=1):
            found = parameterisation(_sampling_of(expert.model))
            if kind is not Kind.PRIMARY and found != expected:
                raise ValueError(
                    f"the routed model samples as {expected} but expert {number} predicts {found}: a ModelSampling "
                    "node applied after routing changes only the first expert. Apply it to every expert before "
                    "routing."
                )

    def expert_at(self, sigma: float) -> int:
        index = expert_index(sigma, self.ends)
        if index is None:  # e.g. a solver's intermediate σ below the last end
            raise ValueError(coverage_problem(self.ends, [sigma, 0.0], self.router.boundaries))
        return index

    def choose(self, timestep: torch.Tensor) -> int:
        """The expert serving a network call at ``timestep`` (σ, on the device)."""
        return self.choice.choose(timestep)

    def activate(self, index: int, input_shape=None) -> None:
        """Make expert ``index``'s weights the loaded ones; a no-op while the same expert stays active."""
        if index == self.active:
            return
        router = self.router
        router.weight_sets.restore()  # the loaded expert's own weights back in before anything else
        if router.kinds[index] is Kind.SWAP and self._swap_resident(index, input_shape):
            self.active = index
            return
        target = self.running if router.kinds[index] is Kind.PRIMARY else router.canonical[index]
        if not _is_loaded(target):
            if router.memory_mode == "sequential":
                self.unload_others(target)
            logger.info("σ routing: loading expert %d (%s)", index + 1, router.kinds[index].value)
            mm.load_models_gpu([target])
            self.loads += 1
        self.active = index

    def _swap_resident(self, index: int, input_shape) -> bool:
        """Resident mode: a clone expert's weights from its resident set, when it can have one."""
        if self.router.memory_mode != "resident" or input_shape is None or not _is_loaded(self.running):
            return False
        return self.router.weight_sets.swap_in(self.running, self.router.canonical[index], input_shape)

    def unload_others(self, target) -> None:
        """Sequential mode: free the other experts' modules (all but ``target``'s)."""
        ours = {id(self.running.model)} | {id(p.model) for p in self.router.canonical}
        for loaded in list(mm.current_loaded_models):
            patcher = loaded.model
            if patcher is None or id(patcher.model) not in ours or patcher.model is target.model:
                continue
            loaded.model_unload()
            mm.current_loaded_models.remove(loaded)

    def encode_conds(self, guider, noise, latent_image, denoise_mask, seed) -> None:
        """Conditioning encoded by each other model class (e.g. the SDXL refiner's own ``y``)."""
        self.conds_by_arch = {_arch_key(self.router.primary_module): guider.conds}
        raw_conds = self.raw_conds
        if raw_conds is None:
            raise RuntimeError("routing: the conditioning was not captured before it was encoded")
        device = guider.model_patcher.load_device
        shapes = compat.packed_latent_shapes(guider.inner_model)
        for patcher, kind in zip(self.router.canonical, self.router.kinds, strict=True):
            key = _arch_key(patcher.model)
            if kind is not Kind.DELEGATE or key in self.conds_by_arch:
                continue
            conds = {name: [c.copy() for c in items] for name, items in raw_conds.items()}
            compat.set_latent_shapes(patcher.model, shapes)
            self.conds_by_arch[key] = compat.process_conds(
                patcher.model, noise, conds, device, latent_image, denoise_mask, seed, shapes
            )

    def finish(self) -> None:
        sets = self.router.weight_sets
        sets.restore()
        if self.router.memory_mode == "resident":
            sets.drop_if_memory_is_short(self.running.load_device)
        logger.debug("σ routing: run finished with %d expert load(s) mid-run", self.loads)


class ExpertChoice:
    """Which expert serves each network call of one run, chosen without reading σ from the device.

    ``predict``: from the sampler's reported steps (:func:`~..merging.sampling.schedules.call_windows`); where a
    boundary falls between two reported steps, the schedule point's expert. ``window``: the same, but σ is read for
    the calls made where a boundary falls between steps. ``exact``: σ is read at every call. Predicted choices are
    checked against the calls' real σ once, after the run (:meth:`verdict`).
    """

    def __init__(self, run: RoutingRun, schedule: torch.Tensor, mode: str):
        self.run, self.mode = run, mode
        self.window, self.point = call_windows(run.ends, schedule)
        self.reported = 0  # steps the sampler reported finished
        self.unchecked: list[tuple[torch.Tensor, int, int]] = []  # (σ on the device, expert chosen, steps reported)
        self.reads = 0  # σ read back from the device (each one waits for it)

    def step_reported(self, step) -> None:
        if isinstance(step, numbers.Integral):
            self.reported = min(max(int(step) + 1, 0), len(self.window) - 1)

    def choose(self, timestep: torch.Tensor) -> int:
        if self.mode != "exact":
            index = self.window[self.reported]
            if index is None and self.mode == "predict":
                index = self.point[self.reported]
            if index is not None:
                self.unchecked.append((timestep, index, self.reported))
                return index
        self.reads += 1
        return self.run.expert_at(float(timestep.max()))

    def verdict(self) -> str | None:
        """None when every predicted call's real σ belongs to the chosen expert (one read-back for the whole
        run); else the cheapest choice mode that would have been right for this run's calls."""
        if not self.unchecked:
            return None
        flat = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t, _, _ in self.unchecked])
        values = flat.to("cpu", torch.float64).tolist()
        self.reads += 1
        position, verdict = 0, None
        for timestep, index, reported in self.unchecked:
            expert = expert_index(max(values[position : position + timestep.numel()]), self.run.ends)
            position += timestep.numel()
            if expert != index:
                window = self.window[reported]
                if window is not None and window != expert:
                    return "exact"  # outside even the window of its reported step
                verdict = "window"
        self.unchecked.clear()
        return verdict


def _sampler_key(sampler) -> tuple:
    """What identifies a sampler's calling pattern: its class, its sampler function and its simple options."""
    function = getattr(sampler, "sampler_function", None)
    options = getattr(sampler, "extra_options", None)
    simple = tuple(
        sorted((k, v) for k, v in options.items() if isinstance(v, (bool, int, float, str)))
        if isinstance(options, dict)
        else ()
    )
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return type(sampler).__module__, type(sampler).__qualname__, getattr(function, "__module__", None), name, simple


_learned_choice_modes: OrderedDict[tuple, str] = OrderedDict()


def _remember_choice_mode(key: tuple, mode: str) -> None:
    _learned_choice_modes[key] = mode
    _learned_choice_modes.move_to_end(key)
    while len(_learned_choice_modes) > _REMEMBERED_SAMPLERS:
        _learned_choice_modes.popitem(last=False)


def _copied_conds(conds: dict) -> dict:
    """A guider's conditioning as ``CFGGuider.sample`` hands it to a run (fresh dicts: runs change them)."""
    return {name: [c.copy() for c in items] for name, items in conds.items()}


def _is_loaded(patcher) -> bool:
    """Whether ComfyUI holds ``patcher``'s weights loaded (itself or a clone with the same patches)."""
    for loaded in mm.current_loaded_models:
        other = loaded.model
        if other is not None and other.model is patcher.model and weights_key(other) == weights_key(patcher):
            return True
    return False


def router_of(model) -> SigmaRouter | None:
    """The router installed on a routed MODEL (None for any other MODEL)."""
    wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, ROUTER_KEY)
    return getattr(wrappers[0], "__self__", None) if wrappers else None


def build_routed_model(experts: tuple[Expert, ...], memory_mode: str = "resident", node_id: str | None = None):
    """The routed MODEL (a clone of expert 1 with the router installed) and its router."""
    router = SigmaRouter(experts, memory_mode, node_id)
    routed = experts[0].model.clone()
    router.install(routed)
    if node_id is not None:
        remember_sampling(node_id, _sampling_of(routed))
    return routed, router


# -- the routed guider ------------------------------------------------------------------------------


class RoutedGuider(comfy.samplers.CFGGuider):
    """CFG with each expert's own cfg and (optionally) prompts, over a routed model."""

    def __init__(self, routed, router: SigmaRouter, positive, negative, cfg: float):
        super().__init__(routed)
        self.router = router
        self.cfgs = [expert.cfg if expert.cfg else cfg for expert in router.experts]
        conds = {"positive": positive, "negative": negative}
        for index, expert in enumerate(router.experts):
            if expert.positive is not None:
                conds[f"positive_{index}"] = node_helpers.conditioning_set_values(
                    expert.positive, {"prompt_type": "positive"}
                )
            if expert.negative is not None:
                conds[f"negative_{index}"] = node_helpers.conditioning_set_values(
                    expert.negative, {"prompt_type": "negative"}
                )
        self.inner_set_conds(conds)
        self.set_cfg(cfg)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        index = self.router.current_expert(timestep)
        positive = self.conds.get(f"positive_{index}", self.conds.get("positive"))
        negative = self.conds.get(f"negative_{index}", self.conds.get("negative"))
        return comfy.samplers.sampling_function(
            self.inner_model, x, timestep, negative, positive, self.cfgs[index], model_options=model_options, seed=seed
        )


# -- what the preview route shows -------------------------------------------------------------------

_last_sampling: OrderedDict[str, Any] = OrderedDict()


def remember_sampling(node_id: str, model_sampling) -> None:
    """Keep the model sampling a routing node last used, for the editor's σ preview (bounded)."""
    _last_sampling[str(node_id)] = model_sampling
    _last_sampling.move_to_end(str(node_id))
    while len(_last_sampling) > _REMEMBERED_SAMPLINGS:
        _last_sampling.popitem(last=False)


def remembered_sampling(node_id: str):
    return _last_sampling.get(str(node_id))
