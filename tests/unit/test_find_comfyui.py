"""The one place that finds ComfyUI (scripts/comfy_in_process.py): where it looks, and what it says without one."""

from __future__ import annotations

from pathlib import Path

import pytest


def fake_comfyui(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


def test_without_comfyui_the_error_names_every_place_tried(comfy_in_process, tmp_path, monkeypatch):
    finder = comfy_in_process
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    pack = tmp_path / "projects" / "pack"
    pack.mkdir(parents=True)
    with pytest.raises(finder.ComfyUINotFound, match=r"nowhere.*shared/ComfyUI-0\.33\.0.*shared/ComfyUI"):
        finder.find_comfyui(pack)


def test_comfyui_path_comes_first_then_the_custom_nodes_parent(comfy_in_process, tmp_path, monkeypatch):
    finder = comfy_in_process
    host = fake_comfyui(tmp_path / "ComfyUI")
    pack = host / "custom_nodes" / "pack"
    pack.mkdir(parents=True)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert finder.find_comfyui(pack) == (host.resolve(), True)
    other = fake_comfyui(tmp_path / "other")
    monkeypatch.setenv("COMFYUI_PATH", str(other))
    assert finder.find_comfyui(pack) == (other.resolve(), False)
