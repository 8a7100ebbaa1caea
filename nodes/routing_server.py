"""The editor's σ preview: ``GET /diffusion_merge/sigmas`` computes a schedule and which expert serves each step.

The browser cannot compute ComfyUI's schedules, so the routing nodes' canvas widget asks this route.
Query parameters:

- ``scheduler`` (a ComfyUI scheduler name) and ``steps`` (1…1000);
- ``ends`` and ``units``: comma-separated, one per expert in sampling order (units ``sigma``, ``percent``,
  ``timestep``);
- ``model``: ``auto`` (the model sampling this node used last, else ``sd``), ``sd`` (SD1.x/SDXL ε/v table),
  ``flow`` (SD3/Wan, with ``shift``), ``flux`` (with ``shift``); ``node``: the routing node's id (for ``auto``).

The answer holds the σ schedule, each expert's end in σ, the expert of every step and the step spans, or
``error`` (the schedule is still returned when only the experts are invalid). Bad parameters get HTTP 400.
"""

from __future__ import annotations

import logging

import comfy.model_sampling
import comfy.samplers

from ..merging.sampling.schedules import Boundary, Unit, assign_steps, resolve_ends, step_spans
from .common import add_get_route, parameterisation, sigma_scale
from .routing_runtime import remembered_sampling

logger = logging.getLogger(__name__)

ROUTE = "/diffusion_merge/sigmas"
MAX_STEPS = 1000
PREVIEW_MODELS = ("auto", "sd", "flow", "flux")
_registered = False


class _DiscreteEps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    pass


class _DiscreteFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    pass


class _Flux(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
    pass


def preview_sampling(model: str, shift: float, node_id: str | None = None):
    """(model sampling, description) for a preview: the node's last one, or a family's default."""
    if model == "auto" and node_id and remembered_sampling(node_id) is not None:
        sampling = remembered_sampling(node_id)
        return sampling, f"this node's model ({parameterisation(sampling)})"
    if model in ("auto", "sd"):
        return _DiscreteEps(), "SD1.x/SDXL schedule (ε/v)"
    if model == "flow":
        sampling = _DiscreteFlow()
        sampling.set_parameters(shift=shift)
        return sampling, f"flow schedule, shift {shift:g}"
    if model == "flux":
        sampling = _Flux()
        sampling.set_parameters(shift=shift)
        return sampling, f"Flux schedule, shift {shift:g}"
    raise ValueError(f"model '{model}' is not one of {', '.join(PREVIEW_MODELS)}")


def preview_schedule(query) -> dict:
    """The preview for one set of query parameters (see the module docstring); ValueError on bad ones."""
    scheduler = query.get("scheduler", "normal")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler '{scheduler}'")
    steps = int(query.get("steps", 20))
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be within 1…{MAX_STEPS}")
    sampling, source = preview_sampling(query.get("model", "auto"), float(query.get("shift", 1.0)), query.get("node"))
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps).tolist()
    answer = {"sigmas": sigmas, "source": source, "scheduler": scheduler, "steps": steps}
    try:
        boundaries = _boundaries(query.get("ends", ""), query.get("units", ""))
        ends = resolve_ends(boundaries, sigma_scale(sampling))
    except ValueError as error:
        return {**answer, "error": str(error)}
    assignment = assign_steps(sigmas, ends)
    spans = [{"expert": expert, "first": first, "last": last} for expert, first, last in step_spans(assignment)]
    return {**answer, "ends_sigma": ends, "step_experts": assignment, "spans": spans}


def _boundaries(ends: str, units: str) -> list[Boundary]:
    values = [v for v in ends.split(",") if v.strip()]
    names = [u.strip() for u in units.split(",") if u.strip()]
    if len(values) != len(names):
        raise ValueError(f"{len(values)} ends but {len(names)} units")
    return [Boundary(float(value), Unit(name)) for value, name in zip(values, names, strict=True)]


async def sigmas_route(request):
    """aiohttp handler for :data:`ROUTE`."""
    from aiohttp import web

    try:
        return web.json_response(preview_schedule(request.query))
    except (ValueError, TypeError) as error:
        return web.json_response({"error": str(error)}, status=400)


def register_routes() -> bool:
    """Add :data:`ROUTE` to ComfyUI's server when one is running (not in in-process tests); idempotent."""
    global _registered
    _registered = _registered or add_get_route(ROUTE, sigmas_route)
    return _registered
