"""Start a throw-away ComfyUI server with this pack loaded, and talk to it over HTTP (standard library only).

Every folder ComfyUI writes to (user, input, output, temp) lives under one work directory, the database
is in memory, and no bytecode is written, so the ComfyUI checkout stays untouched. Used by
``run_examples.py`` (the demo) and by the e2e tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from comfy_in_process import find_comfyui as find_comfyui  # re-exported: scripts import it from here

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER_NAME = "diffusion-merge"
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "loras")  # under <work>/models, searched after ComfyUI's own


class ServerError(RuntimeError):
    """The server did not start, died, refused a request, or a prompt did not finish in time."""


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether nothing listens on the loopback port (connections in TIME_WAIT do not count, as for aiohttp)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ComfyServer:
    """A ComfyUI server process on ``127.0.0.1:<port>`` with all its writable folders under ``work``.

    The pack is added through ``--extra-model-paths-config`` (a ``custom_nodes`` folder holding a
    ``diffusion-merge`` symlink to the pack root) unless ComfyUI already loads it from its own
    ``custom_nodes``; the same file adds ``work/models/{checkpoints,diffusion_models,loras}`` (``models_dir``)
    and ``model_folders`` ({"checkpoints": path, …}) as model folders. The server runs with ``--cpu`` unless
    ``cpu`` is False; ``extra_args`` are appended to its command line. Use as a context manager, or call
    ``start()``, ``wait_ready()`` and ``stop()``.
    """

    def __init__(
        self,
        comfyui: Path,
        work: Path,
        *,
        pack_installed: bool = False,
        port: int | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        cpu: bool = True,
        extra_args: tuple[str, ...] = (),
        model_folders: dict[str, Path] | None = None,
    ):
        self.comfyui, self.work, self.python = Path(comfyui), Path(work), python
        self.pack_installed = pack_installed
        self.cpu, self.extra_args = cpu, tuple(extra_args)
        self.model_folders = {name: Path(path) for name, path in (model_folders or {}).items()}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pack_folder = PACK_ROOT.name if pack_installed else PACK_FOLDER_NAME
        self.output_dir = self.work / "output"
        self.models_dir = self.work / "models"
        self.temp_dir = self.work / "temp" / "temp"  # ComfyUI uses <--temp-directory>/temp and empties it at start
        self.log_path = self.work / "comfyui.log"
        self.env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    # -- life cycle

    def command(self) -> list[str]:
        """The ``main.py`` command line (folders must exist; see ``prepare``)."""
        cmd = [self.python, str(self.comfyui / "main.py"), *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes"]
        cmd += ["--extra-model-paths-config", str(self.work / "extra_model_paths.yaml")]
        for name in ("user", "input", "output", "temp"):
            cmd += [f"--{name}-directory", str(self.work / name)]
        return [*cmd, "--database-url", "sqlite:///:memory:", *self.extra_args]

    def prepare(self) -> None:
        """Create the work folders, model folders under ``work/models`` and, unless ComfyUI loads the pack by
        itself, a custom_nodes folder linking to it; all named in the extra model paths file."""
        for name in ("user", "input", "output", "temp"):
            (self.work / name).mkdir(parents=True, exist_ok=True)
        lines = ["diffusion_merge:", f"  base_path: {json.dumps(str(self.work))}"]
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
            if name not in self.model_folders:  # a YAML key names one folder: the caller's wins
                lines.append(f"  {name}: models/{name}")
        lines += [f"  {name}: {json.dumps(str(path))}" for name, path in self.model_folders.items()]
        if not self.pack_installed:
            nodes_dir = self.work / "custom_nodes"
            nodes_dir.mkdir(exist_ok=True)
            link = nodes_dir / PACK_FOLDER_NAME
            if link.is_symlink() and link.resolve() != PACK_ROOT:
                link.unlink()
            if not link.exists():
                link.symlink_to(PACK_ROOT, target_is_directory=True)
            lines.append(f"  custom_nodes: {json.dumps(str(nodes_dir))}")
        (self.work / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def start(self) -> ComfyServer:
        self.prepare()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.comfyui, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll ``/system_stats`` until the server answers; raise with the log tail if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, ServerError):
                time.sleep(0.25)
        raise ServerError(f"ComfyUI did not answer {self.url}/system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the server (kill it after ``grace`` seconds) and remove the pack symlink."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        link = self.work / "custom_nodes" / PACK_FOLDER_NAME
        if not self.pack_installed and link.is_symlink():
            link.unlink()  # a link back to the pack inside the pack's own demo_out/ would trip tree walkers

    def __enter__(self) -> ComfyServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- HTTP

    def fetch(self, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        """(HTTP status, body bytes) of a GET, or of a JSON POST when ``body`` is given."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """The JSON a GET returns; ``ServerError`` for a non-200 answer."""
        status, content = self.fetch(path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {content[:2000].decode(errors='replace')}")
        return json.loads(content)

    def post_prompt(self, prompt: dict, extra_data: dict | None = None, client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt id. A rejected prompt raises ``ServerError``
        carrying the server's error and per-node errors. ``client_id``: the websocket client (an open
        editor) that receives the run's progress and node results."""
        body = {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())}
        if extra_data:
            body["extra_data"] = extra_data
        status, content = self.fetch("/prompt", body)
        if status != 200:
            raise ServerError(f"prompt rejected (HTTP {status}): {content[:4000].decode(errors='replace')}")
        return json.loads(content)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll ``/history/<id>`` until the prompt has finished (successfully or not); returns its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")


class Prompt:
    """An API-format prompt built node by node; ``add`` returns the node id, ``out(id, slot)`` a link."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, slot: int = 0) -> list:
        return [node_id, slot]


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a finished history entry, or None when it succeeded."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None
