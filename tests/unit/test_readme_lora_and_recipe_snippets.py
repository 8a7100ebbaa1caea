"""The README's Python snippets for LoRA extraction and recipes run as written (in a folder holding the files they
name, with the pack's folder on ``sys.path`` as the README says), and do what their comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

PACK_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("### LoRA from a task vector", "## Recipes")


def snippet_after(heading: str) -> str:
    """The first ```python block after a README heading (before the next heading of any level)."""
    text = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    section = re.split(r"\n#{2,3} ", text[start + len(heading) + 2 :], maxsplit=1)[0]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, f"no python snippet under '{heading}'"
    return match.group(1)


def write_models(folder: Path) -> None:
    """A base and fine-tunes of it (checkpoint layout, fp16): a linear layer, a 3×3 convolution, a bias."""
    g = torch.Generator().manual_seed(0)
    base = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(16, 4, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(16, generator=g),
        "model.diffusion_model.out.2.weight": torch.randn(32, 80, generator=g),
    }
    safetensors.torch.save_file({k: v.half() for k, v in base.items()}, folder / "base.safetensors")
    for name, seed in (("ft", 1), ("ft_a", 2), ("ft_b", 3)):
        g = torch.Generator().manual_seed(seed)
        tuned = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).half() for k, v in base.items()}
        safetensors.torch.save_file(tuned, folder / f"{name}.safetensors")


def test_readme_snippets_run_as_written(tmp_path):
    write_models(tmp_path)
    lora_checks = """
assert 0 < report.totals()["energy"] <= 1
assert sorted(lora.keys()) == sorted(tau.keys())
"""
    recipe_checks = """
assert recipe["rerunnable"] and recipe["result"]["kind"] == "checkpoint"
import safetensors.torch
a, b = safetensors.torch.load_file("merged.safetensors"), safetensors.torch.load_file("merged_again.safetensors")
assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
assert merging.read_recipe("merged_again.safetensors") == recipe
base = safetensors.torch.load_file("base.safetensors")
for key, delta in tau.items("cpu"):  # base + the re-run merge = the merged checkpoint, up to its fp16 rounding
    assert (base["model." + key].float() + delta - a["model." + key].float()).abs().max() < 1e-2, key
"""
    program = snippet_after(SECTIONS[0]) + lora_checks + snippet_after(SECTIONS[1]) + recipe_checks
    env = {**os.environ, "PYTHONPATH": str(PACK_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "of the task vector's energy kept" in done.stdout and "'dmh1'" in done.stdout
    assert (tmp_path / "merged.json").is_file() and (tmp_path / "ft_r64.safetensors").is_file()
