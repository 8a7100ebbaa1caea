"""σ-range routing nodes: N expert models over noise ranges as ONE MODEL (or one GUIDER) any sampler accepts.

Experts are chained node to node as a ``DM_EXPERT_LIST`` (first = highest noise); each Route Expert node
says where its expert stops. The machinery lives in ``routing_runtime``; the range maths in
``merging.sampling.schedules``.
"""

from __future__ import annotations

from ..merging.sampling.schedules import UNITS, Boundary
from . import comfy_bridge as bridge
from . import routing_runtime as runtime
from .common import hidden_input
from .compat import io
from .types import CATEGORY, ExpertListType, TaskVectorType

ROUTING_CATEGORY = f"{CATEGORY}/routing"


# -- shared inputs ----------------------------------------------------------------------------------


def _experts_input(optional: bool) -> io.Input:
    tooltip = (
        "Experts that run before this one (higher noise), from another Route Expert node. Leave empty for the "
        "first expert."
        if optional
        else "The experts in sampling order (first = highest noise), from a chain of Route Expert nodes."
    )
    return ExpertListType.Input("experts", optional=optional, tooltip=tooltip)


def _range_inputs() -> list[io.Input]:
    return [
        io.Float.Input(
            "end",
            default=0.0,
            min=0.0,
            max=10000.0,
            step=0.001,
            round=0.0001,
            tooltip="Where this expert stops; the next expert takes over from here. In σ: the noise level "
            "(higher = earlier in sampling; 0 = the end). In percent: 0–1 of sampling (1 = the end). In "
            "timestep: 0–1000 training timesteps (higher = earlier; 0 = the end; flow models: 1000·σ, so Wan "
            "2.2's boundary 875 is σ 0.875). A step exactly at the boundary belongs to the next expert.",
        ),
        io.Combo.Input(
            "unit",
            options=list(UNITS),
            default="sigma",
            tooltip="Unit of 'end': sigma (noise level), percent (ComfyUI's percent_to_sigma: 0 = start, "
            "1 = end) or timestep (0–1000). Percent and timestep follow the routed model's sampling, "
            "shift included.",
        ),
        io.Float.Input(
            "cfg",
            default=0.0,
            min=0.0,
            max=100.0,
            step=0.1,
            round=0.01,
            tooltip="CFG scale while this expert runs — used by the Routed Guider only (0 = the guider's cfg). "
            "A routed MODEL samples with the sampler's cfg.",
        ),
        io.Conditioning.Input(
            "positive",
            optional=True,
            tooltip="Optional prompt for this expert's range (Routed Guider only); default: the guider's positive.",
        ),
        io.Conditioning.Input(
            "negative",
            optional=True,
            tooltip="Optional negative prompt for this expert's range (Routed Guider only); default: the "
            "guider's negative.",
        ),
    ]


def _experts_output() -> io.Output:
    return ExpertListType.Output(
        display_name="experts", tooltip="All experts so far, in sampling order (first = highest noise)."
    )


def _memory_input() -> io.Combo.Input:
    return io.Combo.Input(
        "memory_mode",
        options=list(runtime.MEMORY_MODES),
        default="resident",
        tooltip="resident: load every expert before sampling, and keep the weights of experts that share a model "
        "(base + task vector, a LoRA) while they fit (fastest; VRAM ≈ sum of the experts). "
        "sequential: load only the active expert and swap at each boundary, once per run (VRAM ≈ the "
        "largest expert, like chained samplers).",
    )


def _expert(model, end, unit, cfg, positive, negative) -> runtime.Expert:
    return runtime.Expert(model, Boundary(float(end), unit), float(cfg) or None, positive, negative)


# -- nodes ------------------------------------------------------------------------------------------


class RouteExpertNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_RouteExpert",
            display_name="Route Expert",
            category=ROUTING_CATEGORY,
            description="Adds one expert to a σ-routing chain: a MODEL and where it stops (σ, percent or "
            "timestep). Chain these from high noise to low noise, then feed the list to Route Experts by σ "
            "or to the Routed Guider.",
            inputs=[io.Model.Input("model", tooltip="This expert's model."), _experts_input(True), *_range_inputs()],
            outputs=[_experts_output()],
        )

    @classmethod
    def execute(cls, model, end=0.0, unit="sigma", cfg=0.0, experts=None, positive=None, negative=None):
        return io.NodeOutput(runtime.append_expert(experts, _expert(model, end, unit, cfg, positive, negative)))


class RouteTaskVectorExpertNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_RouteTaskVectorExpert",
            display_name="Route Expert from Task Vector",
            category=ROUTING_CATEGORY,
            description="Adds an expert base + strength · τ to a σ-routing chain (lazy patches on a clone, as "
            "Apply Task Vector does): four of these on one base make a DeMe-style range-expert ensemble.",
            inputs=[
                io.Model.Input("base", tooltip="The base model the task vector belongs to."),
                TaskVectorType.Input("task_vector", tooltip="The expert's task vector (e.g. a range-trained τ)."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier on τ: 1 = the full expert, 0 = the base.",
                ),
                _experts_input(True),
                *_range_inputs(),
            ],
            outputs=[_experts_output()],
        )

    @classmethod
    def execute(
        cls, base, task_vector, strength=1.0, end=0.0, unit="sigma", cfg=0.0, experts=None, positive=None, negative=None
    ):
        bridge.check_compatible(base, task_vector)
        model, _ = bridge.apply_to_model(base, task_vector, strength)
        return io.NodeOutput(runtime.append_expert(experts, _expert(model, end, unit, cfg, positive, negative)))


class RoutedModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_RoutedModel",
            display_name="Route Experts by σ (one MODEL)",
            category=ROUTING_CATEGORY,
            description="N expert models over σ ranges as ONE MODEL: any sampler (KSampler, KSamplerAdvanced, "
            "SamplerCustom…) runs it in one call, switching experts at the boundaries with no re-noising and "
            "the solver's history kept. It reports the first expert's model sampling.",
            inputs=[_experts_input(False), _memory_input()],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The routed model.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, experts, memory_mode="resident"):
        routed, router = runtime.build_routed_model(tuple(experts or ()), memory_mode, hidden_input(cls, "unique_id"))
        router.warn_about_ignored_settings(uses_guider=False)
        return io.NodeOutput(routed)


class RoutedGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_RoutedGuider",
            display_name="Routed Guider (per-expert CFG)",
            category=ROUTING_CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that routes experts by σ like Route Experts by σ and "
            "gives each expert its own cfg and, optionally, its own prompts (set on its Route Expert node).",
            inputs=[
                _experts_input(False),
                io.Conditioning.Input("positive", tooltip="Prompt for experts that set none of their own."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for experts that set none of their own."),
                io.Float.Input(
                    "cfg",
                    default=8.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="CFG scale for experts whose own cfg is 0.",
                ),
                _memory_input(),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="The routed guider.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, experts, positive, negative, cfg=8.0, memory_mode="resident"):
        routed, router = runtime.build_routed_model(tuple(experts or ()), memory_mode, hidden_input(cls, "unique_id"))
        router.warn_about_ignored_settings(uses_guider=True)
        return io.NodeOutput(runtime.RoutedGuider(routed, router, positive, negative, cfg))


NODES = [RouteExpertNode, RouteTaskVectorExpertNode, RoutedModelNode, RoutedGuiderNode]
