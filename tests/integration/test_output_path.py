"""Where the save nodes write: ComfyUI's own naming (counters, %year%-style tokens), never outside the output folder."""

from __future__ import annotations

import time

import pytest

from diffusion_merge.nodes import comfy_bridge as bridge


def test_date_tokens_are_filled_in_as_for_images(comfyui):
    before = time.localtime()
    path = bridge.output_path("dated/%year%-%month%/tau_%day%", "task_vectors")
    after = time.localtime()
    days = {(t.tm_year, t.tm_mon, t.tm_mday) for t in (before, after)}
    expected = {comfyui / "output" / "dated" / f"{y}-{m:02d}" / f"tau_{d:02d}_00001_.safetensors" for y, m, d in days}
    assert path in expected and path.parent.is_dir()


def test_counters_continue_after_existing_files_and_a_bare_name_goes_to_the_default_folder(comfyui):
    first = bridge.output_path("counted", "task_vectors")
    assert first == comfyui / "output" / "task_vectors" / "counted_00001_.safetensors"
    first.write_bytes(b"")
    assert bridge.output_path("task_vectors/counted", "loras").name == "counted_00002_.safetensors"


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/absolute", "a/../../escape", ""])
def test_prefixes_outside_the_output_folder_are_refused(comfyui, prefix):
    with pytest.raises(ValueError, match=r"output folder|relative name"):
        bridge.output_path(prefix, "task_vectors")


def test_a_link_out_of_the_output_folder_is_refused(comfyui, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (comfyui / "output" / "link_out").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the output folder"):
        bridge.output_path("link_out/tau", "task_vectors")
    assert not any(outside.iterdir())
