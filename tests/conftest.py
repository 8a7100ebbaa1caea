"""Shared test set-up: import the pack under a fixed name, find and boot ComfyUI where a test needs it, build
tiny models.

The pack is imported as the package ``diffusion_merge`` whatever its folder is called. Unit tests use only
``diffusion_merge.merging`` and run without any ComfyUI checkout. Integration and e2e tests find ComfyUI through
``scripts/comfy_in_process.py`` (``COMFYUI_PATH``, else the grandparent of the pack root when the pack sits in
``ComfyUI/custom_nodes/<pack>``, else the newest snapshot in ``../shared``); they fail (never skip) without it.
The ``comfyui`` fixture boots ComfyUI in process for integration tests, with every folder ComfyUI writes
redirected into a temporary directory.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffusion_merge"
MODEL_FOLDERS = ("checkpoints", "loras", "diffusion_models", "task_vectors")


def _load_comfy_in_process() -> ModuleType:
    """``scripts/comfy_in_process.py``: the one ``find_comfyui`` and boot helper (imports no ComfyUI)."""
    name = "dm_scripts_comfy_in_process"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "scripts" / "comfy_in_process.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


comfy_in_process = _load_comfy_in_process()
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
sys.dont_write_bytecode = True
comfy_in_process.import_pack()


@cache
def find_comfyui() -> tuple[Path, bool]:
    """(ComfyUI root, whether the pack is installed inside it as a custom node); a usage error without one."""
    try:
        return comfy_in_process.find_comfyui(PACK_ROOT)
    except comfy_in_process.ComfyUINotFound as error:
        raise pytest.UsageError(str(error)) from None


def _installed_comfyui() -> Path | None:
    """The ComfyUI the tests would use, or None where there is none (unit tests only)."""
    try:
        return find_comfyui()[0]
    except pytest.UsageError:
        return None


# -- the ComfyUI checkout stays pristine ------------------------------------------------------------


def _comfyui_tree_state() -> dict[str, float]:
    """Path → mtime of everything in the ComfyUI checkout except the pack's own folder (empty without one)."""
    root = _installed_comfyui()
    state: dict[str, float] = {}
    if root is None:
        return state
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d).resolve() != PACK_ROOT]
        for name in files + dirs:
            path = os.path.join(folder, name)
            state[path] = os.lstat(path).st_mtime
    return state


def pytest_sessionstart(session):
    session.config.stash[_TREE_KEY] = _comfyui_tree_state()


def pytest_sessionfinish(session, exitstatus):
    changed = {
        path for path, mtime in _comfyui_tree_state().items() if session.config.stash[_TREE_KEY].get(path) != mtime
    }
    if changed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        listed = ", ".join(sorted(changed)[:5])
        print(f"\nFAILED: the tests wrote into the ComfyUI checkout at {_installed_comfyui()}: {listed}")


_TREE_KEY = pytest.StashKey[dict]()


# -- ComfyUI in process (integration) --------------------------------------------------------------


_comfy_work_dir: Path | None = None


def boot_comfyui() -> Path:
    """Put ComfyUI on ``sys.path`` for the CPU, with every folder it writes redirected; idempotent.

    Called before integration test modules are collected, because they import the pack's nodes (which
    import ``comfy_api`` and ``folder_paths``) at module level.
    """
    global _comfy_work_dir
    if _comfy_work_dir is not None:
        return _comfy_work_dir
    comfyui, _ = find_comfyui()
    work = Path(tempfile.mkdtemp(prefix="dm-comfy-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    comfy_in_process.boot(comfyui, work, cpu=True, model_folders=MODEL_FOLDERS)
    _comfy_work_dir = work
    return work


@pytest.fixture(scope="session", name="comfy_in_process")
def comfy_in_process_module() -> ModuleType:
    """``scripts/comfy_in_process.py``: ``find_comfyui``, ``boot``, ``import_pack``, ``register_pack``."""
    return comfy_in_process


@pytest.fixture(scope="session")
def comfyui_install() -> tuple[Path, bool]:
    """(ComfyUI root, whether this pack sits in its custom_nodes folder and is loaded by it already)."""
    return find_comfyui()


def pytest_collectstart(collector):
    if (PACK_ROOT / "tests" / "integration") in Path(str(collector.path)).parents:
        boot_comfyui()


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI in process on the CPU with core, extra and this pack's nodes registered.

    Yields the temporary directory holding ComfyUI's output/input/temp/user folders and the model folders
    (``models/checkpoints``, ``loras``, ``diffusion_models``, ``task_vectors``).
    """
    work = boot_comfyui()
    import asyncio

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    comfy_in_process.register_pack(nodes)
    yield work


@pytest.fixture(scope="session")
def demo(comfyui):
    """The pack's tiny model builders (``build_sd15``, ``build_flux``, ``build_clip``, ``build_vae``)."""
    from diffusion_merge.nodes import demo_models

    return demo_models


@pytest.fixture
def tiny_sd15(demo):
    """Factory: ``tiny_sd15(seed=0, variant="base")`` → a fresh tiny SD1.5 MODEL (deterministic)."""
    return demo.build_sd15


@pytest.fixture
def tiny_flux(demo):
    """Factory: ``tiny_flux(seed=0, variant="base")`` → a fresh tiny Flux MODEL (flow matching)."""
    return demo.build_flux


@pytest.fixture
def conditioning():
    """Factory: seeded CLIP-free conditioning for the tiny SD1.5 UNet (context width 64)."""
    import torch

    def make(seed: int, width: int = 64):
        return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed)), {}]]

    return make


@pytest.fixture
def sample(comfyui):
    """``sample(model, steps=3, cfg=5.0, seed=42)`` → the latent ComfyUI's KSampler path produces."""
    import comfy.sample
    import torch

    def run(model, steps=3, cfg=5.0, seed=42, positive=None, negative=None, sampler="euler", scheduler="normal"):
        gen = torch.Generator().manual_seed
        positive = positive or [[torch.randn(1, 77, 64, generator=gen(1)), {}]]
        negative = negative or [[torch.randn(1, 77, 64, generator=gen(2)), {}]]
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler,
            scheduler,
            positive,
            negative,
            latent,
            seed=seed,
            disable_pbar=True,
        )

    return run


@pytest.fixture
def sd15_file(comfyui, demo):
    """Factory: ``sd15_file(name, variant="base", dtype=torch.float16, folder="checkpoints")`` writes a
    loader-detectable SD1.5 checkpoint (``model.diffusion_model.`` keys) into a model folder; returns its path.
    ``folder="diffusion_models"`` writes bare UNet keys instead."""
    import safetensors.torch
    import torch

    def write(name, variant="base", dtype=torch.float16, folder="checkpoints", seed=0):
        model = demo.build_sd15(seed, variant, **demo.SD15_DETECTABLE)
        prefix = "model.diffusion_model." if folder == "checkpoints" else ""
        state = {prefix + k: v.to(dtype) for k, v in model.model.diffusion_model.state_dict().items()}
        path = comfyui / "models" / folder / name
        safetensors.torch.save_file(state, str(path))
        return path

    return write


class _StubServer:
    """The little of PromptServer that PromptExecutor touches."""

    def __init__(self):
        self.client_id, self.last_node_id, self.last_prompt_id = None, None, None
        self.sockets_metadata = {}
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


def new_prompt_executor():
    """A ComfyUI PromptExecutor with a stub server and the classic cache (reuse one to keep its cache)."""
    from diffusion_merge.nodes import compat

    return compat.prompt_executor(_StubServer())


@pytest.fixture
def run_prompt(comfyui):
    """Run an API-format prompt in process; returns ``history_result["outputs"]`` (raises on failure)."""
    import asyncio
    import uuid

    import execution

    def run(prompt: dict) -> dict:
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"invalid prompt: {valid[1]} {valid[3]}")
        executor = new_prompt_executor()
        executor.execute(prompt, prompt_id, {"client_id": "tests"}, valid[2])
        if not executor.success:
            errors = [data for event, data in executor.server.events if event == "execution_error"]
            raise AssertionError(f"prompt failed: {errors}")
        return executor.history_result["outputs"]

    return run


# ComfyUI's scripts/app.js as the pack's web extensions use it: registering an extension only records it
JS_APP = "export const app = { registerExtension(extension) { globalThis.extension = extension; } };"


@pytest.fixture
def run_web_extension(tmp_path):
    """Run one of the pack's web extensions in Node.js against stand-ins of ComfyUI's frontend modules.

    Returns ``run(script, harness, **stand_ins) -> dict``: ``web/js/<script>`` is copied to
    ``extensions/pack/js/<script>`` under ``tmp_path``, ``scripts/app.js`` records the registered extension,
    ``scripts/<name>.js`` holds each further stand-in, and ``harness`` (an ES module) runs from ``tmp_path``; the
    result is the JSON on the last line it prints.
    """
    import json
    import subprocess

    def run(script: str, harness: str, **stand_ins: str) -> dict:
        pack_js = tmp_path / "extensions" / "pack" / "js"
        pack_js.mkdir(parents=True)
        shutil.copy(PACK_ROOT / "web" / "js" / script, pack_js / script)
        (tmp_path / "scripts").mkdir()
        for name, source in {"app": JS_APP, **stand_ins}.items():
            (tmp_path / "scripts" / f"{name}.js").write_text(source)
        (tmp_path / "run.mjs").write_text(harness)
        command = ["node", "run.mjs"]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
