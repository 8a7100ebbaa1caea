"""ComfyUI imported in this process on the CPU, with this pack registered: for scripts and benchmarks.

Every folder ComfyUI writes (output, input, temp, user) is redirected into a work directory, so the
ComfyUI checkout is never written to. The pack is imported as the package ``diffusion_merge`` whatever its
folder is called.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_PACKAGE = "diffusion_merge"


def boot(comfyui: Path, work: Path, cpu: bool = True) -> None:
    """Put ComfyUI on ``sys.path`` (on the CPU unless ``cpu`` is False) and redirect its writable folders."""
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args

    args.cpu = cpu
    import folder_paths
    import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does: `nodes` shadows `utils`)

    for name in ("output", "input", "temp", "user"):
        (work / name).mkdir(exist_ok=True)
        getattr(folder_paths, f"set_{name}_directory")(str(work / name))


def import_pack() -> ModuleType:
    """The pack as ``diffusion_merge`` (imported once)."""
    if PACK_PACKAGE in sys.modules:
        return sys.modules[PACK_PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACK_PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
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
