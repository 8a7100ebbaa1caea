"""Shared test set-up: find ComfyUI, import the pack under a fixed name, and build tiny models.

ComfyUI is found through ``COMFYUI_PATH``, else the grandparent of the pack root when the pack sits in
``ComfyUI/custom_nodes/<pack>``, else the newest snapshot in ``../shared`` (``ComfyUI-0.33.0``, then
``ComfyUI`` = 0.3.64); the run fails (never skips) without it.
The pack is imported as the package ``diffusion_merge`` whatever its folder is called. Unit tests use only
``diffusion_merge.merging`` and never put ComfyUI on ``sys.path``; the ``comfyui`` fixture boots ComfyUI in
process for integration tests, with every folder ComfyUI writes redirected into a temporary directory.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffusion_merge"
SNAPSHOTS = ("ComfyUI-0.33.0", "ComfyUI")  # ComfyUI checkouts beside the project, newest first


def find_comfyui() -> tuple[Path, bool]:
    """(ComfyUI root, whether the pack is installed inside it as a custom node)."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append((Path(os.environ["COMFYUI_PATH"]), False))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append((PACK_ROOT.parent.parent, True))
    candidates += [(PACK_ROOT.parent / "shared" / name, False) for name in SNAPSHOTS]
    for root, installed in candidates:
        if (root / "main.py").is_file() and (root / "comfy").is_dir():
            return root.resolve(), installed
    tried = ", ".join(str(root) for root, _ in candidates)
    raise pytest.UsageError(f"ComfyUI not found (tried {tried}); set COMFYUI_PATH to a ComfyUI checkout")


def import_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


COMFYUI_PATH, PACK_INSTALLED_IN_COMFYUI = find_comfyui()
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
sys.dont_write_bytecode = True
import_pack()


# -- the ComfyUI checkout stays pristine ------------------------------------------------------------


def _comfyui_tree_state() -> dict[str, float]:
    """Path → mtime of everything in the ComfyUI checkout except the pack's own folder."""
    state = {}
    for folder, dirs, files in os.walk(COMFYUI_PATH):
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
        print(f"\nFAILED: the tests wrote into the ComfyUI checkout at {COMFYUI_PATH}: {listed}")


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
    work = Path(tempfile.mkdtemp(prefix="dm-comfy-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths
    import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does: `nodes` shadows `utils`)

    for name in ("output", "input", "temp", "user"):
        (work / name).mkdir()
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_user_directory(str(work / "user"))
    for folder in ("checkpoints", "loras", "diffusion_models", "task_vectors"):
        (work / "models" / folder).mkdir(parents=True)
        folder_paths.add_model_folder_path(folder, str(work / "models" / folder), is_default=True)
    _comfy_work_dir = work
    return work


@pytest.fixture(scope="session")
def comfyui_install() -> tuple[Path, bool]:
    """(ComfyUI root, whether this pack sits in its custom_nodes folder and is loaded by it already)."""
    return COMFYUI_PATH, PACK_INSTALLED_IN_COMFYUI


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
    register_pack_nodes(nodes)
    yield work


def register_pack_nodes(nodes_module) -> None:
    """Register the pack's V3 nodes the way ComfyUI's custom-node loader does."""
    import asyncio

    pack = sys.modules[PACKAGE]
    extension = asyncio.run(pack.comfy_entrypoint())
    for node_cls in asyncio.run(extension.get_node_list()):
        schema = node_cls.GET_SCHEMA()
        nodes_module.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        nodes_module.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name


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
