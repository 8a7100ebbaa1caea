"""Partial files of killed saves are removed by the next save into the folder, and nothing else is."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from diffusion_merge.merging.io import PARTIAL_SUFFIX, remove_stale_partials, write_safetensors

PACK_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.name == "nt", reason="kills a writer with SIGKILL")

# A save that writes its first tensor, then waits (standing for a long merge) until it is killed.
SLOW_SAVE = textwrap.dedent(
    """
    import importlib.util, sys, time
    import torch
    spec = importlib.util.spec_from_file_location("pack", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
    from pack.merging.io import write_safetensors

    def stream():
        yield "a", torch.ones(1000)
        print("writing", flush=True)
        time.sleep(600)
        yield "b", torch.ones(1000)

    write_safetensors(sys.argv[2], [("a", torch.float32, (1000,)), ("b", torch.float32, (1000,))], stream())
    """
)


def start_slow_save(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(PACK_ROOT), str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline().strip() == "writing"
    return process


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def save(folder: Path, name: str = "next.safetensors") -> Path:
    return write_safetensors(folder / name, [("w", torch.float32, (2,))], [("w", torch.zeros(2))])


def test_a_killed_save_leaves_a_partial_file_that_the_next_save_removes(tmp_path, caplog):
    writer = start_slow_save(tmp_path / "merged.safetensors")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (left,) = partials(tmp_path)
    assert left.name.startswith(".merged.safetensors.")
    age(left, 120)  # a partial file is only touched a minute after its last write
    with caplog.at_level(logging.INFO):
        save(tmp_path)
    assert partials(tmp_path) == [] and (tmp_path / "next.safetensors").is_file()
    assert "interrupted" in caplog.text and left.name in caplog.text


def test_a_live_writers_partial_file_is_kept_however_old(tmp_path):
    writer = start_slow_save(tmp_path / "merged.safetensors")
    try:
        (live,) = partials(tmp_path)
        age(live, 3600)
        save(tmp_path)
        assert live.exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert remove_stale_partials(tmp_path) == [live]  # once the writer is gone, it is removed


def test_only_old_partial_files_of_this_writer_are_removed(tmp_path):
    fresh = tmp_path / ".a.safetensors.abcd1234.dm-partial"
    legacy_old = tmp_path / ".b.safetensors.x1y2z3_q.tmp"
    legacy_recent = tmp_path / ".c.safetensors.k9k9k9k9.tmp"
    others = [tmp_path / ".d.tmp", tmp_path / "e.safetensors", tmp_path / ".f.safetensors.abc.dm-partial"]
    for path in [fresh, legacy_old, legacy_recent, *others]:
        path.write_bytes(b"x" * 10)
        age(path, 7200)
    age(fresh, 5)
    age(legacy_old, 3 * 24 * 3600)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / ".g.safetensors.abcd1234.dm-partial").symlink_to(target)
    assert remove_stale_partials(tmp_path) == [legacy_old]
    assert fresh.exists() and legacy_recent.exists() and all(p.exists() for p in others) and target.exists()
