"""diffusion-merge: task vectors, model merging, σ-range routing and SuperDiff for ComfyUI.

ComfyUI imports this file; pytest imports it too while collecting, before ComfyUI is on the path, so
nothing from ComfyUI is imported at module level.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import DiffusionMergeExtension

    return DiffusionMergeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
