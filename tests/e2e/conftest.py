"""A real ComfyUI server for the end-to-end tests, shared by the whole session.

It runs ``main.py --cpu`` on a free loopback port with every folder it writes in a temporary directory
and the database in memory; the pack is added through ``--extra-model-paths-config`` unless ComfyUI
already loads it from its own ``custom_nodes``. Nothing from ComfyUI is imported in the test process:
the tests talk HTTP through ``scripts/comfy_server.py`` and convert workflows with ``scripts/workflows.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
BROWSER_ARTIFACTS = PACK_ROOT / "test-artifacts" / "browser"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (scripts are not a package) as ``dm_scripts_<name>``; ``scripts/`` goes on
    ``sys.path`` so the scripts import each other as they do when run."""
    module_name = f"dm_scripts_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if str(PACK_ROOT / "scripts") not in sys.path:
        sys.path.append(str(PACK_ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(module_name, PACK_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def comfy_server() -> ModuleType:
    """``scripts/comfy_server.py``: ``ComfyServer``, ``ServerError``, ``execution_error``."""
    return load_script("comfy_server")


@pytest.fixture(scope="session")
def workflows() -> ModuleType:
    """``scripts/workflows.py``: ``workflow_to_prompt`` and ``use_demo_models``."""
    return load_script("workflows")


@pytest.fixture(scope="session")
def browser_script() -> ModuleType:
    """``scripts/browser.py``: ``Editor`` (ComfyUI's frontend in headless Chromium) and ``chromium_path``."""
    return load_script("browser")


@pytest.fixture(scope="module")
def editor(server, browser_script):
    """The ComfyUI editor of ``server`` in headless Chromium (one per test module); screenshots go to
    ``BROWSER_ARTIFACTS``."""
    BROWSER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_script.Editor(server.url) as opened:
        yield opened


@pytest.fixture(scope="session")
def server(tmp_path_factory, comfyui_install, comfy_server):
    """A started ComfyUI server: ``url``, ``output_dir``, ``pack_folder`` (the pack's folder name as
    ComfyUI sees it), ``model_folders`` (writable ``checkpoints`` and ``diffusion_models`` folders it
    searches besides its own), ``get(path)``, ``fetch(path)``, ``post_prompt(prompt) -> prompt_id`` and
    ``wait(prompt_id) -> history entry``. Start-up failures raise with the tail of the server log."""
    comfyui, installed = comfyui_install
    work = tmp_path_factory.mktemp("comfyui-server")
    folders = {name: work / "models" / name for name in ("checkpoints", "diffusion_models")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    instance = comfy_server.ComfyServer(
        comfyui,
        work,
        pack_installed=installed,
        env={"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        model_folders=folders,
    )
    instance.start()
    try:
        instance.wait_ready(STARTUP_TIMEOUT_S)
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def object_info(server) -> dict:
    """The server's ``/object_info`` (every registered node), fetched once."""
    return server.get("/object_info")
