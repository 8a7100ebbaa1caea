"""SuperDiff nodes: superpose N models and/or prompts during sampling (OR: a mixture, AND: equal densities).

Components (MODEL, positive, optional negative, cfg) are chained node to node as a ``DM_SUPERDIFF_COMPONENTS``
list. The modular path is Guider + Sampler → SamplerCustomAdvanced (→ Trace); the all-in-one KSampler hides
both. The loop and guider live in ``superdiff_runtime``; the maths in ``merging.sampling.superdiff``.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..merging.sampling import superdiff as sd
from . import superdiff_runtime as runtime
from .compat import io
from .types import CATEGORY, ComponentsType, TraceType

SUPERDIFF_CATEGORY = f"{CATEGORY}/superdiff"
UI_KEY = "superdiff_trace"


# -- shared inputs ----------------------------------------------------------------------------------


def _components_input(optional: bool) -> io.Input:
    tooltip = (
        "Components added before this one, from another SuperDiff Component node. Leave empty for the first."
        if optional
        else "The components to superpose, from a chain of SuperDiff Component nodes (at least one)."
    )
    return ComponentsType.Input("components", optional=optional, tooltip=tooltip)


def _settings_inputs() -> list[io.Input]:
    return [
        io.Combo.Input(
            "mode",
            options=list(sd.MODES),
            default="OR",
            tooltip="OR: sample from the mixture of the components (each image follows the component that "
            "explains it best; weights via bias). AND: keep the image equally likely under every component "
            "(concept blending, e.g. 'a flamingo' AND 'a candy cane').",
        ),
        io.Float.Input(
            "temperature",
            default=1.0,
            min=0.0,
            max=1000.0,
            step=0.1,
            tooltip="OR only: T in κ = softmax(T·log q + bias). 1 = the exact mixture; larger = each image commits "
            "to one component sooner (the paper also uses 100); 0 = fixed weights softmax(bias).",
        ),
        io.String.Input(
            "bias",
            default="",
            tooltip="One number per component in chain order, in nats (comma-separated, empty = all 0). OR: "
            "log-weights, e.g. '0, -0.85' for weights 0.7/0.3 (bias = log ω). AND: the final log-density of "
            "component i exceeds the others' by its bias (spread evenly over the steps).",
        ),
        io.Float.Input(
            "kappa_clamp",
            default=0.0,
            min=0.0,
            max=1000.0,
            step=0.1,
            optional=True,
            tooltip="Guard, off by default. 0 = κ unbounded (the reference: AND κ can reach ±35). c ≥ 1 shrinks "
            "κ toward equal weights until every κ lies in [1 − c, c] (1 = a convex mix, 2 = [−1, 2]).",
        ),
        io.Float.Input(
            "and_epsilon",
            default=0.0,
            min=0.0,
            max=10.0,
            step=0.001,
            optional=True,
            tooltip="AND guard, off by default. 0 = the exact κ system (reference). ε > 0 (e.g. 0.01) adds ε times "
            "its scale to the system's diagonal, keeping κ finite when the components' predictions nearly "
            "coincide (pulls κ toward equal weights).",
        ),
        io.Float.Input(
            "flow_sigma_max",
            default=sd.DEFAULT_FLOW_SIGMA_MAX,
            min=0.5,
            max=0.9999,
            step=0.001,
            optional=True,
            tooltip="Flow models (SD3, Flux, Wan) only: sampling starts at the schedule's first σ below this "
            "(the SDE is singular at σ = 1). VE models (SD1.x, SDXL) ignore it.",
        ),
    ]


def _settings(mode, temperature, bias, kappa_clamp, and_epsilon, flow_sigma_max) -> sd.SuperDiffSettings:
    return sd.SuperDiffSettings(
        mode=mode,
        temperature=float(temperature),
        bias=sd.parse_bias(bias or ""),
        kappa_clamp=float(kappa_clamp),
        and_epsilon=float(and_epsilon),
        flow_sigma_max=float(flow_sigma_max),
    )


def _trace_output() -> io.Output:
    return TraceType.Output(
        display_name="trace",
        tooltip="κ per step and the log-density estimate of every component per step, per sample (DM_SUPERDIFF_TRACE).",
    )


def _ui(trace: sd.SuperDiffTrace) -> dict:
    return {UI_KEY: [trace.plot_data()]}


# -- nodes ------------------------------------------------------------------------------------------


class SuperDiffComponentNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SuperDiffComponent",
            display_name="SuperDiff Component",
            category=SUPERDIFF_CATEGORY,
            description="Adds one component to a SuperDiff chain: a MODEL with its prompt (and optional negative "
            "prompt and CFG). N prompts on one model and N models with one prompt each both work.",
            inputs=[
                io.Model.Input("model", tooltip="This component's model (all components: one latent family)."),
                io.Conditioning.Input(
                    "positive", tooltip="This component's prompt; its unguided prediction is the density tracked."
                ),
                _components_input(True),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Optional negative prompt for CFG. A negative shared by components of one model is "
                    "evaluated once per step.",
                ),
                io.Float.Input(
                    "cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="CFG scale of this component (the paper uses 7.5 on SD); it steers the sample only, "
                    "never the density estimate. 1 = no CFG (no negative needed; Flux uses 1).",
                ),
            ],
            outputs=[
                ComponentsType.Output(display_name="components", tooltip="All components so far, in chain order.")
            ],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, positive, components=None, negative=None, cfg=7.5):
        component = runtime.Component(model, positive, negative, float(cfg))
        return io.NodeOutput(runtime.append_component(components, component))


class SuperDiffGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SuperDiffGuider",
            display_name="SuperDiff Guider",
            category=SUPERDIFF_CATEGORY,
            description="A GUIDER holding N SuperDiff components for SamplerCustomAdvanced with the SuperDiff "
            "Sampler: every model is loaded together and evaluated once per step with all its prompts batched.",
            inputs=[_components_input(False)],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="The SuperDiff guider.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, components):
        return io.NodeOutput(runtime.SuperDiffGuider(tuple(components or ())))


class SuperDiffSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SuperDiffSampler",
            display_name="SuperDiff Sampler",
            category=SUPERDIFF_CATEGORY,
            description="A SAMPLER running SuperDiff's reverse SDE with the Itô log-density estimator (OR / AND); "
            "use it with the SuperDiff Guider in SamplerCustomAdvanced. It draws its own noise from the seed.",
            inputs=_settings_inputs(),
            outputs=[io.Sampler.Output(display_name="SAMPLER", tooltip="The SuperDiff sampler.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, mode="OR", temperature=1.0, bias="", kappa_clamp=0.0, and_epsilon=0.0, flow_sigma_max=0.995):
        settings = _settings(mode, temperature, bias, kappa_clamp, and_epsilon, flow_sigma_max)
        return io.NodeOutput(runtime.SuperDiffSampler(settings))


class SuperDiffKSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SuperDiffKSampler",
            display_name="SuperDiff KSampler (all-in-one)",
            category=SUPERDIFF_CATEGORY,
            description="Samples a latent from N superposed components (models and/or prompts) with SuperDiff: "
            "OR draws from their mixture, AND blends concepts so the image is equally likely under each. Shows κ "
            "and the log-densities per step on the node.",
            inputs=[
                _components_input(False),
                io.Latent.Input(
                    "latent_image", tooltip="The latent to sample (an Empty Latent Image for text-to-image)."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the initial noise and of the SDE's noise at every step (same seed = same image).",
                ),
                io.Int.Input(
                    "steps",
                    default=100,
                    min=1,
                    max=10000,
                    tooltip="Reverse-SDE steps. SuperDiff needs many (the paper: 100–1000); each step evaluates "
                    "every component once.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=list(comfy.samplers.KSampler.SCHEDULERS),
                    default="normal",
                    tooltip="How σ is spaced over the steps (the first component's model sampling sets the range).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule to run: 1 = from pure noise; < 1 = image-to-image from the "
                    "latent.",
                ),
                *_settings_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The sampled latent."),
                _trace_output(),
            ],
            is_experimental=True,
        )

    @classmethod
    def execute(
        cls,
        components,
        latent_image,
        seed=0,
        steps=100,
        scheduler="normal",
        denoise=1.0,
        mode="OR",
        temperature=1.0,
        bias="",
        kappa_clamp=0.0,
        and_epsilon=0.0,
        flow_sigma_max=0.995,
    ):
        guider = runtime.SuperDiffGuider(tuple(components or ()))
        sampler = runtime.SuperDiffSampler(_settings(mode, temperature, bias, kappa_clamp, and_epsilon, flow_sigma_max))
        latent = _sample(guider, sampler, latent_image, seed, steps, scheduler, denoise)
        trace = guider.last_trace
        return io.NodeOutput(latent, trace, ui=_ui(trace) if trace is not None else None)


def _sample(guider, sampler, latent, seed: int, steps: int, scheduler: str, denoise: float) -> dict:
    """What SamplerCustomAdvanced does with a BasicScheduler schedule, for the all-in-one node."""
    model = guider.model_patcher
    sigmas = comfy.samplers.KSampler(model, steps, "cpu", scheduler=scheduler, denoise=denoise).sigmas
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    out = latent.copy()
    if sigmas.shape[-1] == 0:
        out["samples"] = samples
        return out
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    result = guider.sample(
        noise,
        samples,
        sampler,
        sigmas,
        denoise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    out["samples"] = result.to(mm.intermediate_device())
    return out


class SuperDiffTraceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SuperDiffTrace",
            display_name="SuperDiff Trace",
            category=SUPERDIFF_CATEGORY,
            description="The κ and log-density traces of a SuperDiff run made with SamplerCustomAdvanced, found "
            "by the latent it returned; plots them on the node and outputs them for other nodes.",
            inputs=[
                io.Guider.Input("guider", tooltip="The SuperDiff Guider the run used."),
                io.Latent.Input("latent", tooltip="The 'output' latent of that SamplerCustomAdvanced."),
            ],
            outputs=[_trace_output()],
            is_output_node=True,
            is_experimental=True,
        )

    @classmethod
    def execute(cls, guider, latent):
        if not isinstance(guider, runtime.SuperDiffGuider):
            raise ValueError(f"the guider input is a {type(guider).__name__}, not a SuperDiff Guider")
        trace = guider.trace_for(latent["samples"])
        return io.NodeOutput(trace, ui=_ui(trace))


NODES = [SuperDiffComponentNode, SuperDiffGuiderNode, SuperDiffSamplerNode, SuperDiffKSamplerNode, SuperDiffTraceNode]
