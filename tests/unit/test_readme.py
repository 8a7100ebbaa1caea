"""Every code block of the README runs as written: Python blocks in a fresh interpreter with only the pack's
folder on ``sys.path`` (tiny stand-ins for the files and state dicts they name), shell blocks by checking
each command against the script, option parser or URL it names (running them would start servers, clone
from the network or run this very test suite)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
README = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.DOTALL)
# Blocks that run inside ComfyUI's process (they import the pack's nodes) are run by the integration tests
# (tests/integration/test_mini_family.py runs the mini family's); the others run here, without ComfyUI.
IN_COMFYUI = [code for lang, code in BLOCKS if lang == "python" and "diffusion_merge.nodes" in code]
PYTHON = [code for lang, code in BLOCKS if lang == "python" and code not in IN_COMFYUI]
SHELL = [code for lang, code in BLOCKS if lang in ("bash", "sh", "shell")]

# What the README's Python blocks take as given: checkpoint-layout state dicts and files named as in the text.
STAND_INS = textwrap.dedent(
    """
    import safetensors.torch
    import torch

    def checkpoint(seed, change=0.0):
        generator = torch.Generator().manual_seed(seed)
        keys = ["input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight", "out.2.weight", "out.2.bias"]
        state = {f"model.diffusion_model.{key}": torch.randn(6, 4, generator=generator) for key in keys}
        state = {k: v + change * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        state["first_stage_model.decoder.conv_in.weight"] = torch.ones(3)
        return state

    base_state_dict, finetuned_state_dict = checkpoint(0), checkpoint(0, 0.05)
    for name, state in [("v1-5-pruned-emaonly", base_state_dict), ("dreamshaper_8", finetuned_state_dict),
                        ("base", base_state_dict), ("ft", finetuned_state_dict),
                        ("flux1-dev", checkpoint(1)), ("ft_a", checkpoint(1, 0.05)), ("ft_b", checkpoint(1, 0.07))]:
        safetensors.torch.save_file({k: v.half() for k, v in state.items()}, f"{name}.safetensors")

    def delta(scale):
        generator = torch.Generator().manual_seed(int(scale * 100))
        return {f"diffusion_model.{i}.weight": scale * torch.randn(6, 4, generator=generator) for i in range(3)}

    tau_a, tau_b, tau_c = delta(0.1), delta(0.2), delta(0.3)
    range_experts = [delta(0.01 * i) for i in range(1, 5)]
    task_vectors = [tau_a, tau_b]
    base = {key: torch.zeros(6, 4) for key in tau_a}
    """
)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    program = f"import sys\nsys.path.insert(0, {str(PACK_ROOT)!r})\n{STAND_INS}\n{code}"
    return subprocess.run(
        [sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_the_readme_has_code_blocks():
    assert len(PYTHON) >= 3 and len(SHELL) >= 3
    assert len(IN_COMFYUI) == 1, "a block that needs ComfyUI's process must be run by an integration test"


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_block_runs_as_written(code, tmp_path):
    assert "cuda" not in re.sub(r"#.*", "", code), "a README example must run on a machine without a GPU"
    done = run_python(code, tmp_path)
    assert done.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"


def load_script(name: str):
    sys.path.insert(0, str(PACK_ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(f"readme_{name}", PACK_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(PACK_ROOT / "scripts"))


SCRIPT_VARIABLES = ("COMFYUI_PATH", "VENV")  # what scripts/setup_venv.sh reads from the environment


def names_a_comfyui(value: str) -> bool:
    """A checkout at ``value`` (relative to the pack); where the project's snapshots are not beside the pack (a
    machine without ComfyUI), at least one of the snapshot paths the scripts look for."""
    if (PACK_ROOT / value / "main.py").is_file():
        return True
    snapshots = load_script("comfy_in_process").SNAPSHOTS
    return not (PACK_ROOT.parent / "shared").is_dir() and value in {f"../shared/{name}" for name in snapshots}


def shell_commands() -> list[list[str]]:
    """Each README shell line as words, with leading ``NAME=value`` assignments checked and dropped."""
    lines = [line.split("#", 1)[0].strip() for block in SHELL for line in block.splitlines()]
    commands = []
    for words in (shlex.split(line) for line in lines if line):
        while words and "=" in words[0] and not words[0].startswith("-"):
            name, value = words.pop(0).split("=", 1)
            assert name in SCRIPT_VARIABLES, f"the README sets {name}, which no script reads"
            assert name != "COMFYUI_PATH" or names_a_comfyui(value), f"no ComfyUI at {value}"
        commands.append(words)
    return commands


def test_shell_blocks_name_scripts_options_and_urls_that_exist():
    repository = re.search(r'^Repository = "(.+)"$', (PACK_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    run_examples = load_script("run_examples")
    checked = 0
    for command in shell_commands():
        if command[:2] == ["git", "clone"]:
            assert command[2] == repository, f"the README clones {command[2]}, pyproject.toml says {repository}"
        elif command[:2] == ["bash", "scripts/demo.sh"]:
            run_examples.parse_args(command[2:])  # demo.sh passes its arguments on; SystemExit if one is unknown
        elif command[:2] == ["bash", "scripts/test.sh"]:
            assert all((PACK_ROOT / arg).exists() for arg in command[2:] if not arg.startswith("-"))
        elif command[0] != "cd":
            pytest.fail(f"README command not checked by this test: {shlex.join(command)}")
        if command[0] == "bash":
            assert (PACK_ROOT / command[1]).is_file(), f"{command[1]} does not exist"
        checked += 1
    assert checked >= 5


def section_line(title: str) -> int:
    return next(i for i, line in enumerate(README.splitlines(), start=1) if line.strip() == f"## {title}")


def test_a_new_user_finds_what_they_need_first():
    """The node guide sits right after Install; the feature table spells out its acronyms; the text does not
    promise a LoRA-sized file from Save Task Vector (its help page says a saved τ is as large as its keys) or
    a torch from local wheels (the venv installs the CUDA build from PyPI unless pip is pointed elsewhere); a
    registry/Manager install is mentioned."""
    assert section_line("Install") < section_line("Which node do I use?") < section_line("The two commands")
    assert section_line("Which node do I use?") < 40
    table = README[: README.index("## Install")]
    for explained in ("DRM (Decom-Renorm-Merge", "CLTS curriculum (", "MDLRC (momentum decay"):
        assert explained in table
    for line in README.splitlines():  # a LoRA-sized file comes from the LoRA extractor, not from Save Task Vector
        if "LoRA-sized" in line and "Save Task Vector" in line:
            assert "Extract LoRA" in line and "not LoRA-sized" in line, line
    commands = README[README.index("## The two commands") : README.index("**Main job")]
    assert "PyPI" in commands and "comes from the machine's local wheels" not in commands
    assert "ComfyUI-Manager" in README and "comfy node install" in README
