"""The block-weight editor's source of truth: ``GET /diffusion_merge/blocks`` lists a model's block groups.

The merge nodes' web editor (``web/js/block_weights.js``) shows one slider per block group of the model
feeding the merge. The browser cannot read model files, so it asks this route. Query parameters, one of:

- ``folder`` (``checkpoints`` or ``diffusion_models``) and ``file``: a loader's file; only its safetensors
  header is read;
- ``demo``: the node type of one of the pack's built-in loaders (the tiny demo models are built in code; the
  mini family's UNet keys are read from its committed file's header);
- ``architecture`` and ``preset``: a named model of a supported family, for graphs whose model the route
  cannot read (the editor's architecture menu);
- nothing: the menu itself, every architecture with its presets.

The answer holds ``architecture`` (id), ``label``, ``groups`` ([{``name``, ``keys``}], in slider order; ``keys``
is null for a preset), ``ungrouped`` (keys no group holds) and ``source``; or ``error`` with HTTP 400 (bad
parameters), 404 (no such file) or 422 (a model without named blocks).
"""

from __future__ import annotations

import functools
import logging

from ..merging.blocks import ARCHITECTURES, BlockGroups, UnknownArchitecture, group_keys
from ..merging.io import SafetensorsFile
from . import comfy_bridge as bridge
from .common import add_get_route

logger = logging.getLogger(__name__)

ROUTE = "/diffusion_merge/blocks"
FOLDERS = ("checkpoints", "diffusion_models")
_registered = False


class NotFound(LookupError):
    """The named file is not in the model folder."""


def menu() -> dict:
    """Every architecture with its presets, for the editor's menu."""
    return {
        "architectures": [
            {"id": arch.id, "label": arch.label, "presets": list(arch.presets)} for arch in ARCHITECTURES.values()
        ]
    }


def groups_answer(groups: BlockGroups, source: str) -> dict:
    return {
        "architecture": groups.architecture.id,
        "label": groups.architecture.label,
        "groups": [{"name": name, "keys": len(paths)} for name, paths in groups.groups.items()],
        "ungrouped": len(groups.ungrouped),
        "source": source,
    }


def file_groups(folder: str, name: str) -> dict:
    """The block groups of a model file, from its safetensors header alone."""
    if folder not in FOLDERS:
        raise ValueError(f"folder must be one of {', '.join(FOLDERS)}, not '{folder}'")
    try:
        path = bridge.resolve_model_file(name, folder)
    except FileNotFoundError as error:
        raise NotFound(str(error)) from None
    keys = list(SafetensorsFile(path))
    return groups_answer(group_keys(keys), name)


@functools.cache
def demo_keys(node_type: str) -> tuple[str, ...]:
    """The diffusion-model keys of a built-in loader's model: a demo loader's tiny model (built once, in code) or
    the mini family's UNet (every variant has base's keys)."""
    from . import demo_models

    if node_type == "DM_LoadMiniModel":
        return mini_family_keys()
    builders = {"DM_DemoCheckpointLoader": demo_models.build_sd15}
    builders.update(getattr(demo_models, "DEMO_BUILDERS", {}))
    if node_type not in builders:
        raise ValueError(f"'{node_type}' is not one of the pack's demo loaders ({', '.join(sorted(builders))})")
    return tuple(builders[node_type]().model.state_dict())


def mini_family_keys() -> tuple[str, ...]:
    """The mini family's UNet keys as its MODEL holds them (``diffusion_model.…``), from base's file header."""
    from . import mini_models

    path = mini_models.FAMILY_DIR / mini_models.variants()["base"].unet
    return tuple(key.removeprefix("model.") for key in SafetensorsFile(path) if key.startswith(mini_models.UNET_PREFIX))


def preset_groups(architecture: str, preset: str) -> dict:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{architecture}' (known: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[architecture]
    names = arch.preset_groups(preset or next(iter(arch.presets)))
    return {
        "architecture": arch.id,
        "label": arch.label,
        "groups": [{"name": name, "keys": None} for name in names],
        "ungrouped": 0,
        "source": preset or next(iter(arch.presets)),
    }


def blocks_for(query) -> dict:
    """The answer for one set of query parameters (see the module docstring)."""
    if query.get("file"):
        return file_groups(query.get("folder", "checkpoints"), query["file"])
    if query.get("demo"):
        return groups_answer(group_keys(demo_keys(query["demo"])), f"{query['demo']} (built in)")
    if query.get("architecture"):
        return preset_groups(query["architecture"], query.get("preset", ""))
    return menu()


async def blocks_route(request):
    """aiohttp handler for :data:`ROUTE`."""
    from aiohttp import web

    try:
        return web.json_response(blocks_for(request.query))
    except NotFound as error:
        return web.json_response({"error": str(error)}, status=404)
    except UnknownArchitecture as error:
        return web.json_response({"error": str(error)}, status=422)
    except (ValueError, OSError) as error:
        return web.json_response({"error": str(error)}, status=400)


def register_routes() -> bool:
    """Add :data:`ROUTE` to ComfyUI's server when one is running (not in in-process tests); idempotent."""
    global _registered
    _registered = _registered or add_get_route(ROUTE, blocks_route)
    return _registered
