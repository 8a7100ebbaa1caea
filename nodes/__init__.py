"""The pack's ComfyUI nodes (V3): thin glue between ComfyUI objects and the ``merging`` library."""

from . import (
    blocks,
    blocks_server,
    checkpoints,
    demo,
    demo_wan,
    lora_extract,
    merge,
    recipes,
    routing,
    routing_server,
    superdiff,
    task_vectors,
    training,
)
from .comfy_bridge import register_task_vector_folder
from .compat import ComfyExtension, io
from .validation import refuse_nonfinite_numbers

ALL_NODES: list[type[io.ComfyNode]] = [
    *task_vectors.NODES,
    *lora_extract.NODES,
    *merge.NODES,
    *blocks.NODES,
    *checkpoints.NODES,
    *recipes.NODES,
    *routing.NODES,
    *superdiff.NODES,
    *training.NODES,
    *demo.NODES,
    *demo_wan.NODES,
]
for _node in ALL_NODES:  # every FLOAT input of every node must be a finite number (see validation.py)
    refuse_nonfinite_numbers(_node)


def register() -> None:
    """What the pack adds to ComfyUI besides nodes: its model folders and its server routes (idempotent)."""
    register_task_vector_folder()
    recipes.register_recipe_folder()
    blocks_server.register_routes()
    routing_server.register_routes()


class DiffusionMergeExtension(ComfyExtension):
    async def on_load(self) -> None:
        register()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # A loader that does not call on_load (ComfyUI 0.3.64's) still lists the nodes first: register here too.
        register()
        return list(ALL_NODES)
