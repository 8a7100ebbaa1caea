"""CPU-visible proxies for GPU speed: host reads and launches per sampling step, weight computations per swap.

On a GPU, every read of a device value on the host (``.item()``, ``float(t)``, a branch on a tensor, a copy
from pageable memory) makes the host wait until the device has finished all queued work, so the next network
call is queued late. These counts are taken with ``torch.profiler`` on the CPU, per step (a run of 2n steps
minus a run of n steps, which cancels the per-run set-up), so a per-step read or a per-component loop of
launches cannot come back unnoticed.
"""

from __future__ import annotations

import collections

import comfy.sample
import comfy.samplers
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diffusion_merge.merging.sampling import superdiff as sd
from diffusion_merge.nodes import routing, routing_runtime
from diffusion_merge.nodes import superdiff_runtime as runtime
from diffusion_merge.nodes import task_vectors as tv_nodes

SEED = 42
LATENT = torch.zeros(1, 4, 8, 8)
# Ops that read a device value on the host (or turn host data into a tensor: a host→device copy on a GPU).
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::lift_fresh")
# CPU-only internals: the CPU LU solver reads its pivots on the host; on CUDA `linalg.solve_ex` does not
# synchronise (PyTorch documents it) and there is nothing to read.
CPU_ONLY_PARENTS = ("aten::linalg_lu_solve",)


def cond(seed: int):
    return [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(seed)), {}]]


POSITIVE, NEGATIVE, OTHER = cond(1), cond(2), cond(3)


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def profile_run(run) -> tuple[collections.Counter, int]:
    """(host reads by op, top-level aten ops) of one call of ``run`` (after a warm-up call)."""
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.events()
    reads = collections.Counter(
        event.name
        for event in events
        if event.name in HOST_READS and not any(name in CPU_ONLY_PARENTS for name in _ancestors(event))
    )
    top_level = sum(
        1
        for event in events
        if event.name.startswith("aten::")
        and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))
    )
    return reads, top_level


def per_step(make_run, steps: int = 3) -> tuple[dict[str, float], float]:
    """Host reads and top-level ops per sampling step: a run of 2·steps minus a run of ``steps``."""
    (reads_short, ops_short), (reads_long, ops_long) = profile_run(make_run(steps)), profile_run(make_run(2 * steps))
    reads = {name: (reads_long[name] - reads_short[name]) / steps for name in set(reads_short) | set(reads_long)}
    return {name: value for name, value in reads.items() if value}, (ops_long - ops_short) / steps


def progress(*args) -> None:
    pass


def sigmas_for(model, steps: int):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def cfg_run(model, sampler="euler"):
    """A factory of KSampler-path runs (CFG guider, cond + uncond) over a precomputed schedule."""
    noise = comfy.sample.prepare_noise(LATENT, SEED)

    def make(steps):
        sigmas = sigmas_for(model, steps)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(POSITIVE, NEGATIVE)
        guider.set_cfg(5.0)
        sampler_object = comfy.samplers.sampler_object(sampler)
        # with a progress callback, as every sampler node runs (it makes Euler index σ once more per step)
        return lambda: guider.sample(
            noise, LATENT, sampler_object, sigmas, callback=progress, disable_pbar=True, seed=SEED
        )

    return make


def routed(first, second, boundary_step=3, steps=6, memory_mode="resident"):
    boundary = float(sigmas_for(first, steps)[boundary_step])
    expert = routing.RouteExpertNode.execute
    chain = expert(second, 0.0, "sigma", 0.0, expert(first, boundary, "sigma", 0.0, None).result[0]).result[0]
    return routing.RoutedModelNode.execute(chain, memory_mode).result[0]


# -- routing ---------------------------------------------------------------------------------------------


def test_routed_sampling_reads_nothing_from_the_device_per_step(tiny_sd15):
    a, b = tiny_sd15(0), tiny_sd15(1)
    plain_reads, plain_ops = per_step(cfg_run(a))
    reads, ops = per_step(cfg_run(routed(a, b)))
    assert plain_reads == {} and reads == {}  # was one float(σ) per network call
    assert ops <= plain_ops  # the router dispatches in Python: no launches of its own


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "dpmpp_sde"])
def test_routed_sampling_reads_sigma_at_most_a_few_times_per_run(tiny_sd15, sampler):
    """σ is read once after the run to check the choices; midpoint samplers also where a boundary is near."""
    a, b = tiny_sd15(0), tiny_sd15(1)
    model = routed(a, b)
    runs = []
    original = routing_runtime.RoutingRun.finish

    def spy(run):
        runs.append(run.choice.reads)
        return original(run)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routing_runtime.RoutingRun, "finish", spy)
        cfg_run(model, sampler)(6)()
    assert len(runs) == 1  # no second run: the sampler's calls followed its reported steps
    # one check after the run; a midpoint sampler (2 calls per step) also reads in the 2 windows around the boundary
    assert runs[0] <= (1 if sampler != "dpmpp_sde" else 2 * 2 + 1)


def test_clone_expert_swaps_read_nothing_and_compute_weights_once(tiny_sd15):
    base, finetuned = tiny_sd15(0), tiny_sd15(0, "finetune-a")
    vector = tv_nodes.TaskVectorFromModelsNode.execute(finetuned, base).result[0]
    patched = tv_nodes.TaskVectorApplyNode.execute(base, vector, 1.0).result[0]
    model = routed(base, patched)
    sets = routing_runtime.router_of(model).weight_sets
    reads, _ = per_step(cfg_run(model))
    assert reads == {}
    computed = sets.computed_weights
    assert computed == len(patched.patches)  # every τ key once, for the first run that needed them
    cfg_run(model)(6)()
    assert sets.computed_weights == computed  # later runs swap tensors: no patch computation


# -- SuperDiff -------------------------------------------------------------------------------------------


class FloorGuider(comfy.samplers.CFGGuider):
    """The same conditionings in one batched call per step, their mean driving an Euler step: the floor."""

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        conds = [self.conds[name] for name in sorted(self.conds)]
        return torch.stack(comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)).mean(0)


def superdiff_run(components, mode):
    noise = comfy.sample.prepare_noise(LATENT, SEED)

    def make(steps):
        guider = runtime.SuperDiffGuider(components)
        sampler = runtime.SuperDiffSampler(sd.SuperDiffSettings(mode=mode))
        sigmas = sigmas_for(components[0].model, steps)
        return lambda: guider.sample(noise, LATENT, sampler, sigmas, disable_pbar=True, seed=SEED)

    return make


def floor_run(model, conds):
    noise = comfy.sample.prepare_noise(LATENT, SEED)

    def make(steps):
        guider = FloorGuider(model)
        guider.inner_set_conds({f"c{index}": c for index, c in enumerate(conds)})
        sigmas = sigmas_for(model, steps)
        sampler = comfy.samplers.sampler_object("euler")
        return lambda: guider.sample(noise, LATENT, sampler, sigmas, disable_pbar=True, seed=SEED)

    return make


# Top-level ops per step beyond the floor's (scores, noise, one float64 product, κ, the SDE move, the Itô update):
# measured 41 (OR) and 59 / 61 (AND, two / three components), down from 55 and 105. A per-component loop of
# launches or a per-step read adds more.
EXTRA_OPS = {"OR": 50, "AND": 72}


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("mode", ["OR", "AND"])
def test_superdiff_step_reads_nothing_from_the_device_and_launches_few_ops(tiny_sd15, mode, count):
    model = tiny_sd15(0)
    prompts = [POSITIVE, OTHER, cond(4)][:count]
    components = tuple(runtime.Component(model, prompt, NEGATIVE, 7.5) for prompt in prompts)
    _, floor_ops = per_step(floor_run(model, [*prompts, NEGATIVE]))
    reads, ops = per_step(superdiff_run(components, mode))
    # was 2 (OR) and 5 (AND) per step on the CPU: σ read per schedule entry, bias and AND system from host
    # numbers, the singular-κ count (and, on a GPU, a blocking copy of the step's noise)
    assert reads == {}
    assert ops - floor_ops <= EXTRA_OPS[mode]
