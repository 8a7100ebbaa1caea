"""Finding ComfyUI, and ComfyUI imported in this process with this pack registered.

The one place that knows where ComfyUI is (:func:`find_comfyui`) and how to boot it in process (:func:`boot`),
for the tests (``tests/conftest.py``), the scripts (``comfy_server.py``, ``build_workflows.py``, …) and the
benchmarks. Every folder ComfyUI writes (output, input, temp, user) is redirected into a work directory, so
the ComfyUI checkout is never written to. The pack is imported as the package ``diffusion_merge`` whatever its
folder is called. This module imports nothing from ComfyUI until :func:`boot` is called.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_PACKAGE = "diffusion_merge"
SNAPSHOTS = ("ComfyUI-0.33.0", "ComfyUI")  # ComfyUI checkouts beside the project, newest first (0.3.64 last)


class ComfyUINotFound(RuntimeError):
    """No ComfyUI checkout where one was looked for."""


def comfyui_candidates(pack_root: Path = PACK_ROOT) -> list[Path]:
    """Where ComfyUI is looked for, in order: ``$COMFYUI_PATH``, the grandparent when the pack sits in
    ``ComfyUI/custom_nodes/``, then the snapshots in ``../shared`` (newest first)."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if pack_root.parent.name == "custom_nodes":
        candidates.append(pack_root.parent.parent)
    return candidates + [pack_root.parent / "shared" / name for name in SNAPSHOTS]


def is_comfyui(root: Path) -> bool:
    return (root / "main.py").is_file() and (root / "comfy").is_dir()


def find_comfyui(pack_root: Path = PACK_ROOT) -> tuple[Path, bool]:
    """(ComfyUI root, whether the pack is installed in its ``custom_nodes``); raises :class:`ComfyUINotFound`."""
    candidates = comfyui_candidates(pack_root)
    for root in candidates:
        if is_comfyui(root):
            return root.resolve(), is_installed_in(root, pack_root)
    tried = ", ".join(map(str, candidates))
    raise ComfyUINotFound(f"ComfyUI not found (tried {tried}); set COMFYUI_PATH to a ComfyUI checkout")


def is_installed_in(comfyui: Path, pack_root: Path = PACK_ROOT) -> bool:
    """Whether ComfyUI loads the pack by itself (the pack is a folder of ``<comfyui>/custom_nodes``)."""
    return pack_root.resolve().parent == (comfyui / "custom_nodes").resolve()


def boot(comfyui: Path, work: Path, cpu: bool = True, model_folders: Iterable[str] = ()) -> None:
    """Put ComfyUI on ``sys.path`` (on the CPU unless ``cpu`` is False) and redirect its writable folders.

    ``model_folders`` (e.g. ``"checkpoints"``) get a default folder ``work/models/<name>`` each.
    """
    sys.dont_write_bytecode = True
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args

    args.cpu = cpu
    import folder_paths
    import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does: `nodes` shadows `utils`)

    for name in ("output", "input", "temp", "user"):
        (work / name).mkdir(exist_ok=True)
        getattr(folder_paths, f"set_{name}_directory")(str(work / name))
    for folder in model_folders:
        (work / "models" / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(work / "models" / folder), is_default=True)


def import_pack() -> ModuleType:
    """The pack as ``diffusion_merge`` (imported once)."""
    if PACK_PACKAGE in sys.modules:
        return sys.modules[PACK_PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACK_PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    assert spec is not None and spec.loader is not None
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_PACKAGE] = pack
    spec.loader.exec_module(pack)
    return pack


def register_pack(nodes_module) -> None:
    """Register the pack's V3 nodes in ComfyUI's ``nodes`` module as its custom-node loader does."""
    extension = asyncio.run(import_pack().comfy_entrypoint())
    for node_cls in asyncio.run(extension.get_node_list()):
        schema = node_cls.GET_SCHEMA()
        nodes_module.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        nodes_module.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
