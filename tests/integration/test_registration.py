"""What the pack adds to ComfyUI besides nodes happens in the extension's load hook, not when it is imported."""

from __future__ import annotations

import asyncio

import folder_paths

from diffusion_merge.nodes import DiffusionMergeExtension, recipes


def test_the_load_hook_registers_the_pack_folders(comfyui, monkeypatch):
    monkeypatch.delitem(folder_paths.folder_names_and_paths, recipes.RECIPE_FOLDER, raising=False)
    asyncio.run(DiffusionMergeExtension().on_load())
    paths, suffixes = folder_paths.folder_names_and_paths[recipes.RECIPE_FOLDER]
    assert str(comfyui / "output" / "recipes") in paths and ".json" in suffixes


def test_listing_the_nodes_registers_them_too_for_loaders_without_the_hook(comfyui, monkeypatch):
    monkeypatch.delitem(folder_paths.folder_names_and_paths, recipes.RECIPE_FOLDER, raising=False)
    nodes = asyncio.run(DiffusionMergeExtension().get_node_list())
    assert nodes and recipes.RECIPE_FOLDER in folder_paths.folder_names_and_paths
