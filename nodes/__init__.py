"""The pack's ComfyUI nodes (V3): thin glue between ComfyUI objects and the ``merging`` library."""

from . import (
    blocks,
    checkpoints,
    demo,
    demo_wan,
    lora_extract,
    merge,
    recipes,
    routing,
    superdiff,
    task_vectors,
    training,
)
from .comfy_bridge import register_task_vector_folder
from .compat import ComfyExtension, io

register_task_vector_folder()
recipes.register_recipe_folder()

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


class DiffusionMergeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(ALL_NODES)
