"""Every feature of the pack on a real ComfyUI server with dynamic VRAM, compared with the classic loader.

    bash scripts/gpu_check.sh                                  # on a GPU machine, with the kit carried
    python scripts/gpu_check.py --dry-run --out report.json    # on the CPU with tiny models (a test runs it)

1. Writes random-weight models with ComfyUI's own classes, in a child process: an SD1.5-size UNet, a
   fine-tune of it that changes every weight, and a CLIP-L text encoder (tiny UNet in the dry run).
2. Starts ComfyUI (``main.py``) as users get it (dynamic VRAM on an NVIDIA GPU), then again with
   ``--disable-dynamic-vram`` (the classic loader) where ComfyUI has that flag; both with ``--cache-none``,
   so every prompt runs from scratch.
3. Queues one prompt per feature: a task vector applied, routed clone experts (base → base + τ, resident and
   sequential), SuperDiff OR (base and fine-tune) and AND (two prompts), 5 range-expert training steps, a
   streamed checkpoint save. The dynamic
   server runs each twice (run-to-run noise); every latent, LoRA and checkpoint is kept.
4. Compares. A sampled latent must match the classic server's within a tenth of what the feature itself
   changes (its distance from the base model's sample), or three times the run-to-run noise or what separates
   the two loaders on the base model alone; the trained LoRA within 5 % (relative L2) or three times the
   noise; the streamed checkpoint must hold base + ½τ (fp16). The dry run skips the repeat and trains 2 steps.
5. Writes a JSON report (environment, whether dynamic VRAM was on and how many models it loaded, per feature:
   status, seconds, differences, errors) and exits 1 if a feature failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comfy_server import ComfyServer, Prompt, ServerError, execution_error

PACK_ROOT = Path(__file__).resolve().parents[1]
DYNAMIC_ON = "DynamicVRAM support detected and enabled"
DYNAMIC_LOAD = re.compile(r"prepared for dynamic VRAM loading")
DYNAMIC_WORDS = re.compile(r"aimdo|dynamic ?vram|ModelPatcherDynamic|non.dynamic", re.IGNORECASE)
SEED = 42


@dataclass(frozen=True)
class Sizes:
    """What one mode samples: the UNet config name, latent side in pixels, steps and training dtype."""

    unet: str
    pixels: int
    steps: int
    superdiff_steps: int
    training_steps: int
    training_dtype: str
    repeat: bool  # run every feature twice on the dynamic server (run-to-run noise)
    timeout: float


FULL = Sizes("sd15", 512, 20, 20, 5, "bf16", True, 240.0)
DRY = Sizes("tiny", 64, 3, 4, 2, "fp32", False, 300.0)


# -- models (child process: ComfyUI in process) ---------------------------------------------------------


def make_models(folder: Path, size: str) -> None:
    """Write ``diffusion_models/{base,finetune}.safetensors`` and ``text_encoders/clip_l.safetensors``."""
    import comfy_in_process

    comfy_in_process.boot(Path(os.environ["COMFYUI_PATH"]), Path(tempfile.mkdtemp(prefix="dm-gpu-models-")))
    comfy_in_process.import_pack()
    sys.path.insert(0, str(PACK_ROOT / "bench"))  # bench_common: the SD1.5 UNet config the benchmarks use too
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import safetensors.torch
    import torch
    from bench_common import SD15_UNET

    from diffusion_merge.nodes import compat, demo_models

    config = SD15_UNET if size == "sd15" else {k: v for k, v in demo_models.SD15_DETECTABLE.items()}
    (folder / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (folder / "text_encoders").mkdir(parents=True, exist_ok=True)
    for name, variant in (("base", "base"), ("finetune", "finetune-d")):  # finetune-d changes every weight
        model = demo_models.build_sd15(0, variant, dtype=torch.float16, **config)
        state = {k: v.to(torch.float16).contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
        safetensors.torch.save_file(state, str(folder / "diffusion_models" / f"{name}.safetensors"))
        del model, state
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float16})
    encoder = clip.cond_stage_model
    compat.assign_parameters(encoder, demo_models.seeded_values(compat.parameter_shapes(encoder), 1))
    text_model = encoder.clip_l.transformer
    state = {k: v.to(torch.float16).contiguous() for k, v in text_model.state_dict().items() if v.is_floating_point()}
    safetensors.torch.save_file(state, str(folder / "text_encoders" / "clip_l.safetensors"))


# -- prompts ----------------------------------------------------------------------------------------------


def _common(prompt: Prompt, sizes: Sizes, batch: int = 1) -> dict[str, list]:
    base = prompt.add("UNETLoader", unet_name="base.safetensors", weight_dtype="default")
    finetune = prompt.add("UNETLoader", unet_name="finetune.safetensors", weight_dtype="default")
    clip = prompt.add("CLIPLoader", clip_name="clip_l.safetensors", type="stable_diffusion")
    positive = prompt.add("CLIPTextEncode", clip=Prompt.out(clip), text="a lighthouse on a rocky coast at sunset")
    other = prompt.add("CLIPTextEncode", clip=Prompt.out(clip), text="a red bicycle leaning on a wall")
    negative = prompt.add("CLIPTextEncode", clip=Prompt.out(clip), text="blurry, low quality")
    latent = prompt.add("EmptyLatentImage", width=sizes.pixels, height=sizes.pixels, batch_size=batch)
    vector = prompt.add("DM_TaskVectorFromModels", finetuned=Prompt.out(finetune), base=Prompt.out(base))
    return {
        "base": Prompt.out(base),
        "finetune": Prompt.out(finetune),
        "clip": Prompt.out(clip),
        "positive": Prompt.out(positive),
        "other": Prompt.out(other),
        "negative": Prompt.out(negative),
        "latent": Prompt.out(latent),
        "vector": Prompt.out(vector),
    }


def _ksampler(prompt: Prompt, sizes: Sizes, model: list, c: dict) -> list:
    node = prompt.add(
        "KSampler",
        model=model,
        seed=SEED,
        steps=sizes.steps,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        positive=c["positive"],
        negative=c["negative"],
        latent_image=c["latent"],
        denoise=1.0,
    )
    return Prompt.out(node)


def _apply(prompt: Prompt, c: dict, strength: float) -> list:
    return Prompt.out(prompt.add("DM_TaskVectorApply", model=c["base"], task_vector=c["vector"], strength=strength))


def build_prompt(feature: str, sizes: Sizes, prefix: str) -> Prompt:
    """The prompt of one feature; its outputs are saved under ``output/<prefix>…``."""
    prompt = Prompt()
    c = _common(prompt, sizes, batch=2 if feature == "training" else 1)
    if feature == "base":
        latent = _ksampler(prompt, sizes, c["base"], c)
    elif feature == "task_vector":
        latent = _ksampler(prompt, sizes, _apply(prompt, c, 0.5), c)
    elif feature.startswith("routed_clone_experts"):
        first = prompt.add("DM_RouteExpert", model=c["base"], end=1.0, unit="sigma", cfg=0.0)
        second = prompt.add(
            "DM_RouteTaskVectorExpert",
            base=c["base"],
            task_vector=c["vector"],
            strength=1.0,
            end=0.0,
            unit="sigma",
            cfg=0.0,
            experts=Prompt.out(first),
        )
        mode = feature.rsplit("_", 1)[-1]
        routed = prompt.add("DM_RoutedModel", experts=Prompt.out(second), memory_mode=mode)
        latent = _ksampler(prompt, sizes, Prompt.out(routed), c)
    elif feature.startswith("superdiff"):
        mode = feature.rsplit("_", 1)[-1].upper()
        if mode == "OR":  # two models (the fine-tune from its own file), one prompt
            second_model, second_prompt = c["finetune"], c["positive"]
        else:  # one model, two prompts
            second_model, second_prompt = c["base"], c["other"]
        first = prompt.add(
            "DM_SuperDiffComponent", model=c["base"], positive=c["positive"], cfg=7.5, negative=c["negative"]
        )
        second = prompt.add(
            "DM_SuperDiffComponent",
            model=second_model,
            positive=second_prompt,
            cfg=7.5,
            negative=c["negative"],
            components=Prompt.out(first),
        )
        sampler = prompt.add(
            "DM_SuperDiffKSampler",
            components=Prompt.out(second),
            latent_image=c["latent"],
            seed=SEED,
            steps=sizes.superdiff_steps,
            scheduler="normal",
            denoise=1.0,
            mode=mode,
            temperature=1.0,
            bias="",
        )
        latent = Prompt.out(sampler)
    elif feature == "training":
        trainer = prompt.add(
            "DM_TrainRangeExpertLoRA",
            model=c["base"],
            latents=c["latent"],
            positive=c["positive"],
            range_unit="timestep",
            range_min=0.0,
            range_max=1000.0,
            global_probability=0.0,
            antithetic=False,
            consistency_weight=0.0,
            loss_space="x0",
            loss_function="MSE",
            steps=sizes.training_steps,
            batch_size=2,
            grad_accumulation=1,
            learning_rate=1e-3,
            optimizer="AdamW",
            rank=8,
            algorithm="LoRA",
            seed=SEED,
            training_dtype=sizes.training_dtype,
            lora_dtype="fp32",
            gradient_checkpointing=True,
            channel_projection=False,
            grad_clip=1.0,
        )
        prompt.add("DM_SaveRangeExpertLoRA", lora=Prompt.out(trainer, 1), filename_prefix=f"{prefix}_lora")
        c["latent"] = Prompt.out(prompt.add("EmptyLatentImage", width=sizes.pixels, height=sizes.pixels, batch_size=1))
        latent = _ksampler(prompt, sizes, Prompt.out(trainer), c)
    elif feature == "streaming_save":
        prompt.add(
            "DM_SaveCheckpointStreaming",
            model=_apply(prompt, c, 0.5),
            filename_prefix=f"{prefix}_ckpt",
            dtype="fp16",
            clip=c["clip"],
        )
        return prompt
    else:
        raise ValueError(f"unknown feature {feature}")
    prompt.add("SaveLatent", samples=latent, filename_prefix=f"{prefix}_latent")
    return prompt


FEATURES = (
    "base",  # the reference every sampled feature is measured against
    "task_vector",
    "routed_clone_experts_resident",
    "routed_clone_experts_sequential",
    "superdiff_or",
    "superdiff_and",
    "training",
    "streaming_save",
)


# -- running and comparing ---------------------------------------------------------------------------------


@dataclass
class FeatureResult:
    name: str
    status: str = "not run"  # ok | mismatch | error
    seconds: dict[str, float] = field(default_factory=dict)  # per run: dynamic, dynamic_repeat, classic
    numbers: dict[str, float] = field(default_factory=dict)
    error: str = ""


def run_feature(server: ComfyServer, feature: str, sizes: Sizes, run: str) -> tuple[float, str]:
    """(seconds, error or "") of one feature's prompt on one server."""
    prefix = f"gpu_check/{run}/{feature}"
    started = time.monotonic()
    try:
        entry = server.wait(server.post_prompt(build_prompt(feature, sizes, prefix).nodes), timeout=sizes.timeout)
    except ServerError as error:
        return time.monotonic() - started, str(error)[:3000]
    failure = execution_error(entry)
    if failure or entry["status"]["status_str"] != "success":
        message = failure.get("exception_message", "") if failure else entry["status"]["status_str"]
        return time.monotonic() - started, f"{(failure or {}).get('node_type')}: {message}"[:3000]
    return time.monotonic() - started, ""


def saved(output: Path, run: str, feature: str, kind: str) -> Path | None:
    found = sorted((output / "gpu_check" / run).glob(f"{feature}_{kind}_*"))
    return found[0] if found else None


def _tensors(path: Path) -> dict:
    import safetensors.torch

    return {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items() if v.is_floating_point()}


def _latent(path: Path):
    return _tensors(path)["latent_tensor"]


def compare_latents(result: FeatureResult, output: Path, reference, loader_difference: float) -> None:
    """Dynamic vs classic: within a tenth of the feature's own effect, or of what separates the two loaders
    with no feature at all (the base model), or of the run-to-run noise."""
    runs = {run: saved(output, run, result.name, "latent") for run in ("dynamic", "dynamic_repeat", "classic")}
    missing = [run for run, path in runs.items() if path is None and run != "dynamic_repeat"]
    if missing:
        result.status, result.error = "error", f"no latent saved by the {', '.join(missing)} run"
        return
    dynamic, classic = _latent(runs["dynamic"]), _latent(runs["classic"])
    repeat = _latent(runs["dynamic_repeat"]) if runs["dynamic_repeat"] is not None else dynamic
    finite = all(bool(t.isfinite().all()) for t in (dynamic, repeat, classic))
    difference = float((dynamic - classic).abs().max())
    noise = float((dynamic - repeat).abs().max())
    result.numbers.update(max_abs_vs_classic=difference, max_abs_run_to_run=noise, finite=float(finite))
    if reference is None:  # the base model itself: what the two loaders differ by, for the others' bounds
        result.status = "ok" if finite else "mismatch"
        return
    effect = float((classic - reference).abs().max())
    allowed = max(0.1 * effect, 3 * noise, 3 * loader_difference)
    result.numbers.update(max_abs_feature_effect=effect, allowed=allowed)
    result.status = "ok" if finite and difference <= allowed else "mismatch"


def compare_lora(result: FeatureResult, output: Path) -> None:
    paths = {run: saved(output, run, "training", "lora") for run in ("dynamic", "dynamic_repeat", "classic")}
    if paths["dynamic"] is None or paths["classic"] is None:
        result.status, result.error = "error", "a run saved no LoRA"
        return
    paths["dynamic_repeat"] = paths["dynamic_repeat"] or paths["dynamic"]
    loras = {run: _tensors(path) for run, path in paths.items()}

    def relative(a: dict, b: dict) -> float:
        num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
        den = sum(float(b[k].pow(2).sum()) for k in b)
        return math.sqrt(num / den) if den > 0 else math.inf

    keys_match = loras["dynamic"].keys() == loras["classic"].keys() == loras["dynamic_repeat"].keys()
    difference = relative(loras["dynamic"], loras["classic"]) if keys_match else math.inf
    noise = relative(loras["dynamic"], loras["dynamic_repeat"]) if keys_match else math.inf
    finite = all(bool(t.isfinite().all()) for lora in loras.values() for t in lora.values())
    result.numbers.update(
        lora_rel_l2_vs_classic=difference, lora_rel_l2_run_to_run=noise, lora_tensors=len(loras["classic"])
    )
    if result.status == "ok" and not (finite and keys_match and difference <= max(0.05, 3 * noise)):
        result.status = "mismatch"


def check_checkpoint(result: FeatureResult, output: Path, models: Path) -> None:
    """The streamed file holds base + ½ (fine-tune − base) under ComfyUI's checkpoint names (fp16)."""
    from safetensors import safe_open

    files = {run: saved(output, run, "streaming_save", "ckpt") for run in ("dynamic", "classic")}
    if any(path is None for path in files.values()):
        result.status, result.error = "error", "a run saved no checkpoint"
        return
    prefix = "model.diffusion_model."
    worst, keys = 0.0, 0
    with (
        safe_open(str(models / "diffusion_models" / "base.safetensors"), "pt") as base,
        safe_open(str(models / "diffusion_models" / "finetune.safetensors"), "pt") as finetune,
        safe_open(str(files["dynamic"]), "pt") as dynamic,
        safe_open(str(files["classic"]), "pt") as classic,
    ):
        names = [k for k in dynamic.keys() if k.startswith(prefix)]
        for name in names:
            key = name[len(prefix) :]
            b, f = base.get_tensor(key).float(), finetune.get_tensor(key).float()
            expected = b + 0.5 * (f - b)
            tolerance = expected.abs() * 2**-10 + 1e-6  # fp16 rounding of the saved value
            for got in (dynamic.get_tensor(name).float(), classic.get_tensor(name).float()):
                worst = max(worst, float(((got - expected).abs() / tolerance).max()))
            keys += 1
        unet_keys = len(base.keys())
    result.numbers.update(unet_keys_saved=keys, unet_keys=unet_keys, worst_error_over_fp16_rounding=worst)
    result.status = "ok" if keys == unet_keys and worst <= 1.0 else "mismatch"


def server_flags(comfyui: Path) -> dict[str, bool]:
    """Which optional command-line flags this ComfyUI has (read from its argument parser's source)."""
    source = (comfyui / "comfy" / "cli_args.py").read_text()
    return {flag: f'"{flag}"' in source for flag in ("--disable-dynamic-vram", "--cache-none")}


def start_server(comfyui: Path, work: Path, models: Path, gpu: bool, extra: tuple[str, ...]) -> ComfyServer:
    front_end = work / "frontend"  # nobody opens the editor: an empty web root spares the frontend package
    front_end.mkdir(parents=True, exist_ok=True)
    (front_end / "index.html").write_text("<!doctype html><title>gpu check</title>\n")
    server = ComfyServer(
        comfyui,
        work,
        cpu=not gpu,
        extra_args=("--front-end-root", str(front_end), *extra),
        model_folders={"diffusion_models": models / "diffusion_models", "text_encoders": models / "text_encoders"},
        env={"PYTHONUNBUFFERED": "1"},
    )
    server.start()
    try:
        server.wait_ready(300.0)
    except ServerError:
        server.stop()
        raise
    return server


def run_server(comfyui, work, models, gpu, extra, runs, sizes, results) -> dict:
    """Start one server, run every feature once per run label, stop it; returns what its log says."""
    try:
        server = start_server(comfyui, work, models, gpu, extra)
    except ServerError as error:
        for result in results.values():
            result.status, result.error = "error", f"{runs[0]} server did not start"
        return {"flags": list(extra), "error": str(error)[-3000:]}
    try:
        for run in runs:
            for name in FEATURES:
                seconds, error = run_feature(server, name, sizes, run)
                results[name].seconds[run] = round(seconds, 2)
                if error and not results[name].error:
                    results[name].status, results[name].error = "error", f"{run}: {error}"
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    return {
        "flags": list(extra),
        "dynamic_vram_enabled": DYNAMIC_ON in log,
        "dynamic_vram_loads": len(DYNAMIC_LOAD.findall(log)),
        "dynamic_vram_lines": [line for line in log.splitlines() if DYNAMIC_WORDS.search(line)][:25],
        "log_tail": log.splitlines()[-15:],
    }


def environment(comfyui: Path, gpu: bool) -> dict:
    import torch

    info = {
        "mode": "gpu" if gpu else "dry-run (cpu, tiny)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "comfyui_path": str(comfyui),
        "comfyui_version": _comfyui_version(comfyui),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for package in ("comfy_aimdo", "comfy_kitchen"):
        try:
            from importlib.metadata import version

            info[package] = version(package.replace("_", "-"))
        except Exception:
            info[package] = None
    return info


def _comfyui_version(comfyui: Path) -> str | None:
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (comfyui / "comfyui_version.py").read_text())
    return match.group(1) if match else None


def check(comfyui: Path, work: Path, sizes: Sizes, gpu: bool, out: Path) -> dict:
    """Run everything; ``out`` gets the report so far after each server (a run cut short still reports)."""
    models = work / "models"
    started = time.monotonic()
    env = {**os.environ, "COMFYUI_PATH": str(comfyui), "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(
        [sys.executable, str(Path(__file__)), "--make-models", str(models), "--size", sizes.unet], env=env, check=True
    )
    report = {"environment": environment(comfyui, gpu), "model_seconds": round(time.monotonic() - started, 1)}
    flags = server_flags(comfyui)
    cache = ("--cache-none",) if flags["--cache-none"] else ()
    results = {name: FeatureResult(name) for name in FEATURES}
    servers = [("dynamic", ("dynamic", "dynamic_repeat") if sizes.repeat else ("dynamic",), cache)]
    classic_flag = ("--disable-dynamic-vram",) if flags["--disable-dynamic-vram"] else ()
    servers.append(("classic", ("classic",), (*cache, *classic_flag)))
    report["servers"] = {}
    for label, runs, extra in servers:
        report["servers"][label] = run_server(comfyui, work / label, models, gpu, extra, runs, sizes, results)
        report["features"] = {name: asdict(result) for name, result in results.items()}
        write_report(out, {**report, "passed": None, "note": "interim: comparisons not done yet"})
    merged = work / "outputs"  # one tree: gpu_check/<run>/…
    for label in report["servers"]:
        for path in (work / label / "output" / "gpu_check").glob("*"):
            target = merged / "gpu_check" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    base = results["base"]
    if base.status != "error":
        compare_latents(base, merged, None, 0.0)
    reference_path = saved(merged, "classic", "base", "latent")
    reference = _latent(reference_path) if reference_path is not None else None
    loader_difference = base.numbers.get("max_abs_vs_classic", 0.0)
    for name, result in results.items():
        if result.status == "error" or name == "base":
            continue
        if name == "streaming_save":
            check_checkpoint(result, merged, models)
            continue
        if reference is None:
            result.status, result.error = "error", "no base sample to compare with"
            continue
        compare_latents(result, merged, reference, loader_difference)
        if name == "training":
            compare_lora(result, merged)
    report["features"] = {name: asdict(result) for name, result in results.items()}
    report["passed"] = all(r.status == "ok" for r in results.values())
    report["dynamic_vram_exercised"] = report["servers"]["dynamic"].get("dynamic_vram_loads", 0) > 0
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models (what the test runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--make-models", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="sd15", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.make_models is not None:
        make_models(options.make_models, options.size)
        return 0
    comfyui = Path(os.environ.get("COMFYUI_PATH") or PACK_ROOT.parent / "shared" / "ComfyUI-0.33.0").resolve()
    work = options.work or Path(tempfile.mkdtemp(prefix="dm-gpu-check-"))
    try:
        report = check(comfyui, work, DRY if options.dry_run else FULL, not options.dry_run, options.out)
        write_report(options.out, report)
        for label in report["servers"]:  # the full server logs beside the report
            log = work / label / "comfyui.log"
            if log.is_file():
                shutil.copyfile(log, options.out.with_name(f"{options.out.stem}_{label}_server.log"))
    finally:
        if options.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for name, result in report["features"].items():
        print(f"{result['status']:>8}  {name:<34} {json.dumps(result['numbers'])[:150]} {result['error'][:300]}")
    dynamic = report["servers"]["dynamic"]
    print(f"dynamic VRAM enabled: {dynamic.get('dynamic_vram_enabled')}, loads: {dynamic.get('dynamic_vram_loads')}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']} s; report: {options.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
