"""Bad input through a real ComfyUI server, as a careless or hostile user would send it: damaged and hostile
model files, NaN/±Inf numbers, values a save cannot hold, escaping save names, key sets that do not meet,
empty expert ranges, a training run that diverges.

Every case must fail with an error that names the problem (the node, input, file or tensor), and after all
of them: the server still serves, nothing was written outside its output folder, the input files are
byte-identical, the server's peak memory grew by less than a bound, and a good prompt still succeeds.
One server for the whole module (the session's); every file is tiny.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch

pytestmark = pytest.mark.server

PACK_ROOT = Path(__file__).resolve().parents[2]
# the prompt builder scripts/gpu_check.py uses too (comfy_server imports only the standard library)
if str(PACK_ROOT / "scripts") not in sys.path:
    sys.path.append(str(PACK_ROOT / "scripts"))
from comfy_server import Prompt  # noqa: E402

PEAK_RSS_GROWTH_LIMIT = 1 << 30
NAN, INF = float("nan"), float("inf")


# -- prompts ----------------------------------------------------------------------------------------------


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """Fill every required widget input a node was not given with its default, as the editor would."""
    for node in prompt.values():
        info = object_info[node["class_type"]]
        for name, spec in info["input"].get("required", {}).items():
            if name in node["inputs"]:
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(spec[0], list):
                node["inputs"][name] = options.get("default", spec[0][0] if spec[0] else "")
            elif spec[0] == "COMBO":
                node["inputs"][name] = options.get("default", (options.get("options") or [""])[0])
            elif "default" in options:
                node["inputs"][name] = options["default"]
    return prompt


def demo_pair(p: Prompt) -> tuple[str, str]:
    """Two demo loaders (base, finetune-a), same seed."""
    return (
        p.add("DM_DemoCheckpointLoader", variant="base", seed=0),
        p.add("DM_DemoCheckpointLoader", variant="finetune-a", seed=0),
    )


def tau_of_models(p: Prompt, key_filter: str = "") -> tuple[str, str]:
    """(τ node, base loader node) for the demo pair."""
    base, finetuned = demo_pair(p)
    tau = p.add("DM_TaskVectorFromModels", finetuned=p.out(finetuned), base=p.out(base), key_filter=key_filter)
    return tau, base


def info_of(p: Prompt, tau: str) -> dict:
    p.add("DM_TaskVectorInfo", task_vector=p.out(tau))
    return p.nodes


def save_model(p: Prompt, model: list, dtype: str = "fp16", prefix: str = "reliability/never") -> dict:
    p.add("DM_SaveCheckpointStreaming", model=model, filename_prefix=prefix, dtype=dtype)
    return p.nodes


def load_file_tau(name: str) -> dict:
    p = Prompt()
    return info_of(p, p.add("DM_TaskVectorLoad", name=name))


def scaled(p: Prompt, tau: str, factor: float, times: int = 1) -> str:
    for _ in range(times):
        tau = p.add("DM_TaskVectorScale", task_vector=p.out(tau), factor=factor)
    return tau


def apply_nan_strength() -> dict:
    p = Prompt()
    tau, base = tau_of_models(p)
    applied = p.add("DM_TaskVectorApply", model=p.out(base), task_vector=p.out(tau), strength=NAN)
    return save_model(p, p.out(applied))


def merge(method: str, weight: float = 1.0, **params) -> dict:
    p = Prompt()
    tau, base = tau_of_models(p)
    stack = p.add("DM_TaskVectorStack", task_vector=p.out(tau), weight=weight)
    merged = p.add(method, base=p.out(base), task_vectors=p.out(stack), **params)
    return save_model(p, p.out(merged))


def routed(*ends: tuple[float, str]) -> dict:
    p = Prompt()
    base, finetuned = demo_pair(p)
    experts = None
    for index, (end, unit) in enumerate(ends):
        model = p.out(base if index % 2 == 0 else finetuned)
        inputs = {"model": model, "end": end, "unit": unit, **({"experts": p.out(experts)} if experts else {})}
        experts = p.add("DM_RouteExpert", **inputs)
    router = p.add("DM_RoutedModel", experts=p.out(experts))
    return save_model(p, p.out(router))


def training(**settings) -> dict:
    p = Prompt()
    base = p.add("DM_DemoCheckpointLoader", variant="base", seed=0)
    text = p.add("CLIPTextEncode", clip=p.out(base, 1), text="a church")
    latents = p.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    quick = dict(steps=3, batch_size=2, training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
    trainer = p.add(
        "DM_TrainRangeExpertLoRA", model=p.out(base), latents=p.out(latents), positive=p.out(text), **quick | settings
    )
    p.add("DM_SaveRangeExpertLoRA", lora=p.out(trainer, 1), filename_prefix="reliability/never")
    return p.nodes


def superdiff(**settings) -> dict:
    p = Prompt()
    base = p.add("DM_DemoCheckpointLoader", variant="base", seed=0)
    text = p.add("CLIPTextEncode", clip=p.out(base, 1), text="a flamingo")
    component = p.add("DM_SuperDiffComponent", model=p.out(base), positive=p.out(text), cfg=1.0)
    latent = p.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampler = p.add(
        "DM_SuperDiffKSampler", components=p.out(component), latent_image=p.out(latent), steps=4, **settings
    )
    decoded = p.add("VAEDecode", samples=p.out(sampler), vae=p.out(base, 2))
    p.add("PreviewImage", images=p.out(decoded))
    return p.nodes


def save_tau(prefix: str = "reliability/tau", dtype: str = "fp16", factor: float = 1.0, times: int = 0) -> dict:
    p = Prompt()
    tau, _ = tau_of_models(p)
    p.add("DM_TaskVectorSave", task_vector=p.out(scaled(p, tau, factor, times)), filename_prefix=prefix, dtype=dtype)
    return p.nodes


def save_huge_checkpoint() -> dict:
    p = Prompt()
    tau, base = tau_of_models(p)
    applied = p.add("DM_TaskVectorApply", model=p.out(base), task_vector=p.out(scaled(p, tau, 10.0, 7)), strength=1.0)
    return save_model(p, p.out(applied))


def foreign_tau(p: Prompt) -> str:
    return p.add(
        "DM_TaskVectorFromFiles", finetuned_file="rl_foreign_ft.safetensors", base_file="rl_foreign.safetensors"
    )


def apply_foreign() -> dict:
    p = Prompt()
    base = p.add("DM_DemoCheckpointLoader", variant="base", seed=0)
    applied = p.add("DM_TaskVectorApply", model=p.out(base), task_vector=p.out(foreign_tau(p)), strength=1.0)
    return save_model(p, p.out(applied))


def add_foreign() -> dict:
    p = Prompt()
    tau, _ = tau_of_models(p)
    return info_of(p, p.add("DM_TaskVectorAdd", a=p.out(tau), b=p.out(foreign_tau(p))))


def merge_rules(rules: str) -> dict:
    return merge("DM_MergeTaskArithmetic", lam=1.0, weight_rules=rules)


def demo_loader(**inputs) -> dict:
    p = Prompt()
    loader = p.add("DM_DemoCheckpointLoader", **inputs)
    return save_model(p, p.out(loader))


def unknown_file(name: str) -> dict:
    p = Prompt()
    tau = p.add("DM_TaskVectorFromFiles", finetuned_file=name, base_file="rl_foreign.safetensors")
    return info_of(p, tau)


# -- damaged files ----------------------------------------------------------------------------------------


def raw_file(header, data: bytes = bytes(16), length: int | None = None, raw: bytes | None = None) -> bytes:
    encoded = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


KEY = "diffusion_model.input_blocks.0.0.diff"
DAMAGED = {
    # 1.6 GB claimed by a 1 kB file: refused at open, nothing sized from it
    "rl_huge_claim": raw_file({KEY: entry(shape=(20000, 20000), offsets=(0, 20000 * 20000 * 4))}, bytes(1024)),
    "rl_unknown_dtype": raw_file({KEY: entry(dtype="F128")}),
    "rl_negative_dim": raw_file({KEY: entry(shape=(-4, 4))}),
    "rl_span_mismatch": raw_file({KEY: entry(shape=(4, 4))}),
    "rl_overlap": raw_file({KEY: entry(shape=(4,), offsets=(0, 16)), "diffusion_model.b.diff": entry(offsets=(8, 16))}),
    "rl_begin_after_end": raw_file({KEY: entry(offsets=(8, 0))}),
    "rl_truncated": raw_file({KEY: entry()}, length=1 << 20),
    "rl_not_a_table": raw_file([1, 2]),
    "rl_duplicate_key": raw_file(None, raw=f'{{"{KEY}":{json.dumps(entry())},"{KEY}":{json.dumps(entry())}}}'.encode()),
    "rl_garbage": os.urandom(4096),
    "rl_empty": b"",
}


def write_inputs(models: Path) -> list[Path]:
    """The model files the cases read; returns every path (their bytes must not change)."""
    paths = []
    for name, content in DAMAGED.items():
        path = models / "loras" / f"{name}.safetensors"
        path.write_bytes(content)
        paths.append(path)
    pickled = models / "loras" / "rl_pickle.safetensors"
    torch.save({"x": torch.zeros(3)}, pickled)
    generator = torch.Generator().manual_seed(0)
    foreign = {
        f"model.diffusion_model.foreign_net.{i}.weight": torch.randn(4, 4, generator=generator) for i in range(6)
    }
    safetensors.torch.save_file(foreign, models / "checkpoints" / "rl_foreign.safetensors")
    foreign_ft = {k: v + 0.1 for k, v in foreign.items()}
    safetensors.torch.save_file(foreign_ft, models / "checkpoints" / "rl_foreign_ft.safetensors")
    return [
        *paths,
        pickled,
        models / "checkpoints" / "rl_foreign.safetensors",
        models / "checkpoints" / "rl_foreign_ft.safetensors",
    ]


# -- the cases --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    prompt: object  # a callable → API prompt (built when the case runs: the files exist by then)
    message: str  # regex the error must match
    node: str | None = None  # the node type that must report it (execution errors)
    rejected: bool = False  # refused when queued (ComfyUI's own validation) instead of failing while running
    or_rejected: str | None = None  # regex: refusing it when queued is fine too (ComfyUI versions differ)


def file_case(name: str, message: str) -> Case:
    return Case(
        name, lambda: load_file_tau(f"{name}.safetensors"), rf"'{name}\.safetensors'.*{message}", "DM_TaskVectorLoad"
    )


CASES = [
    # damaged or hostile files: refused at open, naming file (and tensor)
    file_case("rl_huge_claim", rf"'{re.escape(KEY)}'.*ends at byte"),
    file_case("rl_unknown_dtype", "unsupported dtype 'F128'"),
    file_case("rl_negative_dim", r"shape \[-4, 4\]"),
    file_case("rl_span_mismatch", r"\(64 bytes\) but its data_offsets span 8 bytes"),
    file_case("rl_overlap", "overlap"),
    file_case("rl_begin_after_end", "end before they begin"),
    file_case("rl_truncated", "is truncated"),
    file_case("rl_not_a_table", "header is not a table"),
    file_case("rl_duplicate_key", "twice"),
    file_case("rl_garbage", "not a safetensors file"),
    file_case("rl_empty", r"not a safetensors file \(too short\)"),
    file_case("rl_pickle", "not a safetensors file"),
    # what ComfyUI's own validation refuses when the prompt is queued
    # names no model folder holds (ComfyUI 0.3.64 does not check V3 combo values when queuing; newer may)
    Case(
        "missing_file",
        lambda: unknown_file("rl_absent.safetensors"),
        "'rl_absent.safetensors' was not found in the checkpoints / diffusion_models model folders",
        "DM_TaskVectorFromFiles",
        or_rejected="rl_absent.safetensors",
    ),
    Case(
        "traversal_name",
        lambda: unknown_file("../../../etc/passwd"),
        r"'\.\./\.\./\.\./etc/passwd' is not a \.safetensors file",
        "DM_TaskVectorFromFiles",
        or_rejected="etc/passwd",
    ),
    Case(
        "traversal_safetensors",
        lambda: unknown_file("../../../../../tmp/rl_outside.safetensors"),
        "rl_outside.safetensors' was not found",
        "DM_TaskVectorFromFiles",
        or_rejected="rl_outside.safetensors",
    ),
    # what ComfyUI's own validation refuses when the prompt is queued
    Case("seed_not_a_number", lambda: demo_loader(variant="base", seed="abc"), "seed", rejected=True),
    Case(
        "missing_input", lambda: {"1": {"class_type": "DM_TaskVectorInfo", "inputs": {}}}, "task_vector", rejected=True
    ),
    Case("lam_too_big", lambda: merge("DM_MergeTaskArithmetic", lam=1e9), "bigger than max", rejected=True),
    Case("factor_minus_inf", lambda: save_tau(factor=-INF, times=1), "smaller than min", rejected=True),
    # NaN / ±Inf numbers: refused by the node, naming the input
    Case("scale_nan", lambda: save_tau(factor=NAN, times=1), "input 'factor' is nan", "DM_TaskVectorScale"),
    Case("apply_nan", apply_nan_strength, "input 'strength' is nan", "DM_TaskVectorApply"),
    Case(
        "stack_weight_nan",
        lambda: merge("DM_MergeTaskArithmetic", weight=NAN),
        "input 'weight' is nan",
        "DM_TaskVectorStack",
    ),
    Case("ties_k_nan", lambda: merge("DM_MergeTIES", k=NAN), "input 'k' is nan", "DM_MergeTIES"),
    Case("dare_p_nan", lambda: merge("DM_MergeDARE", p=NAN), "input 'p' is nan", "DM_MergeDARE"),
    Case("drm_drop_nan", lambda: merge("DM_MergeDRM", drop_rate=NAN), "input 'drop_rate' is nan", "DM_MergeDRM"),
    Case("route_end_nan", lambda: routed((NAN, "sigma"), (0.0, "sigma")), "input 'end' is nan", "DM_RouteExpert"),
    Case("grad_clip_nan", lambda: training(grad_clip=NAN), "input 'grad_clip' is nan", "DM_TrainRangeExpertLoRA"),
    Case(
        "consistency_nan",
        lambda: training(consistency_weight=NAN),
        "input 'consistency_weight' is nan",
        "DM_TrainRangeExpertLoRA",
    ),
    Case(
        "superdiff_temperature_nan",
        lambda: superdiff(temperature=NAN),
        "input 'temperature' is nan",
        "DM_SuperDiffKSampler",
    ),
    Case(
        "superdiff_bias_text", lambda: superdiff(bias="0, zz"), "bias '0, zz': expected numbers", "DM_SuperDiffKSampler"
    ),
    Case("weight_rule_nan", lambda: merge_rules("attn = nan"), "must be a finite number", "DM_MergeTaskArithmetic"),
    Case(
        "weight_rule_block", lambda: merge_rules("@nowhere = 0.5"), "unknown block 'nowhere'", "DM_MergeTaskArithmetic"
    ),
    # saves
    Case("prefix_escapes", lambda: save_tau(prefix="../rl_escape"), "output folder", "DM_TaskVectorSave"),
    Case("prefix_absolute", lambda: save_tau(prefix="/tmp/rl_absolute"), "output folder", "DM_TaskVectorSave"),
    Case("prefix_empty", lambda: save_tau(prefix=" "), "relative name inside the output folder", "DM_TaskVectorSave"),
    Case(
        "tau_fp16_overflow",
        lambda: save_tau(factor=10.0, times=7),
        "beyond the largest fp16 value",
        "DM_TaskVectorSave",
    ),
    Case(
        "checkpoint_fp16_overflow", save_huge_checkpoint, "beyond the largest fp16 value", "DM_SaveCheckpointStreaming"
    ),
    # keys that do not meet, filters, ranges, training
    Case(
        "key_filter_regex",
        lambda: info_of(*_tau_only(key_filter="([")),
        "not a valid regular expression",
        "DM_TaskVectorFromModels",
    ),
    Case(
        "key_filter_nothing",
        lambda: info_of(*_tau_only(key_filter="zzz_nothing")),
        "matches no key",
        "DM_TaskVectorFromModels",
    ),
    Case(
        "apply_foreign_keys",
        apply_foreign,
        "does not fit this model: .*'diffusion_model.foreign_net.0.weight'",
        "DM_TaskVectorApply",
    ),
    Case("add_foreign_keys", add_foreign, r"share 0 of their keys .*foreign_net", "DM_TaskVectorAdd"),
    Case(
        "first_expert_empty",
        lambda: routed((1000.0, "timestep"), (0.0, "sigma")),
        "expert 1 stops at timestep 1000",
        "DM_RoutedModel",
    ),
    Case(
        "experts_overlap",
        lambda: routed((0.6, "percent"), (0.3, "percent")),
        r"expert 2 stops at percent 0\.3",
        "DM_RoutedModel",
    ),
    Case(
        "training_diverges",
        lambda: training(steps=20, learning_rate=1.0, optimizer="SGD", grad_clip=0.0),
        r"training diverged at step \d+ of 20: the loss is nan",
        "DM_TrainRangeExpertLoRA",
    ),
]


def _tau_only(**kw) -> tuple[Prompt, str]:
    p = Prompt()
    return p, tau_of_models(p, **kw)[0]


# -- the module's server, inputs and invariants -------------------------------------------------------------


def tree_state(root: Path, skip: set[str]) -> dict[str, tuple[int, int]]:
    """relative path → (size, mtime_ns) of every file under ``root`` except the top-level names in ``skip``."""
    state = {}
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        if relative.parts and relative.parts[0] in skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if (relative / d).parts[0] not in skip and not (Path(folder) / d).is_symlink()]
        for name in files:
            if not relative.parts and name in skip:
                continue
            stat = (Path(folder) / name).lstat()
            state[(relative / name).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return state


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Battery:
    inputs: dict[Path, str]
    work_before: dict
    pack_before: dict
    peak_before: int


WORK_SKIP = {"output", "temp", "comfyui.log", "user"}
PACK_SKIP = {".git", "test-artifacts", "demo_out", ".venv", ".pytest_cache", ".ruff_cache"}


@pytest.fixture(scope="module")
def battery(server) -> Battery:
    paths = write_inputs(server.models_dir)
    return Battery(
        inputs={path: digest(path) for path in paths},
        work_before=tree_state(server.work, WORK_SKIP),
        pack_before=tree_state(PACK_ROOT, PACK_SKIP),
        peak_before=peak_rss(server.process.pid),
    )


def test_there_are_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_fails_with_an_error_that_names_the_problem(case, battery, server, object_info, comfy_server):
    prompt = with_defaults(case.prompt(), object_info)
    if case.rejected:
        with pytest.raises(comfy_server.ServerError) as raised:
            server.post_prompt(prompt)
        assert re.search(case.message, str(raised.value)), str(raised.value)[:3000]
    else:
        try:
            prompt_id = server.post_prompt(prompt)
        except comfy_server.ServerError as refused:
            assert case.or_rejected and re.search(case.or_rejected, str(refused)), str(refused)[:3000]
            return
        entry = server.wait(prompt_id, timeout=300)
        error = comfy_server.execution_error(entry)
        assert entry["status"]["status_str"] == "error" and error is not None, "the bad input ran to success"
        assert error["node_type"] == case.node, error
        assert re.search(case.message, error["exception_message"], flags=re.DOTALL), error["exception_message"]
        assert "Traceback" not in error["exception_message"]
    assert server.get("/system_stats", timeout=10)  # still serving


def test_after_every_bad_input_the_server_is_intact(battery, server, object_info, comfy_server):
    assert server.process.poll() is None, "the server died"
    good = with_defaults(save_tau(prefix="reliability/still_works", dtype="fp16"), object_info)
    entry = server.wait(server.post_prompt(good), timeout=120)
    assert entry["status"]["status_str"] == "success", comfy_server.execution_error(entry)
    assert list((server.output_dir / "reliability").glob("still_works_*.safetensors"))

    assert tree_state(server.work, WORK_SKIP) == battery.work_before, "something was written outside output/"
    assert not list(server.work.parent.glob("rl_escape*")) and not Path("/tmp/rl_absolute_00001_.safetensors").exists()
    assert tree_state(PACK_ROOT, PACK_SKIP) == battery.pack_before, "something was written into the pack"
    assert {path: digest(path) for path in battery.inputs} == battery.inputs, "an input file changed"
    assert not list((server.output_dir / "reliability").glob("never*")), "a refused save wrote a file"
    partial = [p.name for p in server.output_dir.rglob("*") if p.name.endswith((".dm-partial", ".tmp"))]
    assert not partial, f"partial files left behind: {partial}"
    grown = peak_rss(server.process.pid) - battery.peak_before
    assert grown < PEAK_RSS_GROWTH_LIMIT, f"the server's peak memory grew by {grown / 2**20:.0f} MiB"


def test_a_file_overwritten_under_a_cached_task_vector_is_read_anew(battery, server, object_info, comfy_server):
    """Queue, overwrite the fine-tune file in place (other bytes, tensors at other offsets), queue again: the
    second save holds the new file's deltas, not old offsets read in the new bytes."""
    folder = server.models_dir / "checkpoints"
    generator = torch.Generator().manual_seed(1)
    base = {f"model.diffusion_model.block.{i}.weight": torch.randn(8, 8, generator=generator) for i in range(4)}
    safetensors.torch.save_file(base, folder / "rl_stale_base.safetensors")
    path = folder / "rl_stale_ft.safetensors"
    safetensors.torch.save_file({k: v + 0.01 for k, v in base.items()}, path)

    def run(prefix: str) -> Path:
        p = Prompt()
        tau = p.add("DM_TaskVectorFromFiles", finetuned_file=path.name, base_file="rl_stale_base.safetensors")
        p.add("DM_TaskVectorSave", task_vector=p.out(tau), filename_prefix=f"reliability/{prefix}", dtype="fp32")
        entry = server.wait(server.post_prompt(with_defaults(p.nodes, object_info)))
        assert entry["status"]["status_str"] == "success", comfy_server.execution_error(entry)
        return next((server.output_dir / "reliability").glob(f"{prefix}_*.safetensors"))

    run("stale_before")
    time.sleep(0.05)
    replacement = folder / "rl_stale_new.safetensors"
    safetensors.torch.save_file({k: v - 0.5 for k, v in base.items()}, replacement, metadata={"pad": "x" * 999})
    with open(path, "r+b") as handle:  # in place: same inode, so an open reader would see the new bytes
        handle.write(replacement.read_bytes())
        handle.truncate()
    replacement.unlink()
    saved = safetensors.torch.load_file(run("stale_after"))
    assert saved
    for value in saved.values():
        torch.testing.assert_close(value, torch.full_like(value, -0.5), rtol=0, atol=1e-6)
