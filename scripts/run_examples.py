"""Run every shipped example workflow through a real ComfyUI server, as shipped (they load the built-in mini family).

Starts ComfyUI on the CPU with this pack loaded (all its folders under ``demo_out/``), checks that every
node of the pack is registered, converts each ``example_workflows/*.json`` to an API prompt, runs it, and
writes ``demo_out/summary.json``. A workflow given on the command line that names checkpoints or Wan files
(an older or a user's workflow) runs with the tiny built-in demo models swapped in (``use_demo_models``).
Exits 1 if a node is missing or a workflow fails. ``--serve`` keeps the server (and its UI) running
afterwards. Normally started through ``bash scripts/demo.sh``.

``summary.json`` lists, per workflow, every file it wrote into the output folder and every image its nodes
showed — previews such as the training plots live in ComfyUI's temp folder, which ComfyUI empties when it
stops, so they are copied to ``demo_out/previews/<workflow>/`` — all as absolute paths, the pictures each
saving node wrote and the text each node showed, keyed by node id (titles repeat: a workflow may hold four
"Save Range Expert LoRA" nodes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comfy_in_process import ComfyUINotFound, find_comfyui, is_installed_in
from comfy_server import ComfyServer, ServerError, execution_error, port_is_free
from workflows import WorkflowError, needs_demo_models, use_demo_models, workflow_to_prompt

PACK_ROOT = Path(__file__).resolve().parents[1]
SERVE_PORT = 8188


@dataclass
class Result:
    """What happened to one example workflow; every path is absolute."""

    name: str
    status: str = "not run"  # success | error (ran and failed) | rejected (by the server) | invalid (conversion)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # every file it wrote into the output folder
    previews: dict[str, list[str]] = field(default_factory=dict)  # node id → copies of the previews it showed
    images: dict[str, list[str]] = field(default_factory=dict)  # node id → the pictures it saved (output folder)
    messages: dict[str, dict] = field(default_factory=dict)  # node id → {"node", "title", "text"} it showed
    error: str = ""


def pack_node_ids() -> list[str]:
    """The node ids the pack declares (``node_id="DM_…"`` in ``nodes/``), read without importing it."""
    pattern = re.compile(r"""node_id\s*=\s*["'](DM_\w+)["']""")
    return sorted({m for path in (PACK_ROOT / "nodes").rglob("*.py") for m in pattern.findall(path.read_text())})


def output_files(output_dir: Path) -> set[Path]:
    return {p.resolve() for p in output_dir.rglob("*") if p.is_file()}


def shown_previews(server: ComfyServer, ui: dict) -> list[Path]:
    """The temp-folder images (previews) a node showed: ``{"filename", "subfolder", "type": "temp"}`` entries."""
    return [
        server.temp_dir / image.get("subfolder", "") / image["filename"]
        for image in ui.get("images") or []
        if isinstance(image, dict) and image.get("type") == "temp" and image.get("filename")
    ]


def saved_images(server: ComfyServer, ui: dict) -> list[str]:
    """The output-folder pictures a node saved (``"type": "output"`` entries), as absolute paths."""
    return [
        str((server.output_dir / image.get("subfolder", "") / image["filename"]).resolve())
        for image in ui.get("images") or []
        if isinstance(image, dict) and image.get("type") == "output" and image.get("filename")
    ]


def keep_previews(paths: list[Path], folder: Path, node_id: str) -> list[str]:
    """Copy previews out of the temp folder (emptied when ComfyUI stops); returns the copies' absolute paths."""
    kept = []
    for path in paths:
        if path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            copy = folder / f"node{node_id}_{path.name}"
            shutil.copyfile(path, copy)
            kept.append(str(copy.resolve()))
    return kept


def run_workflow(server: ComfyServer, path: Path, object_info: dict, timeout: float, previews: Path) -> Result:
    """Convert, queue and wait for one workflow file; never raises for a failing workflow. The previews its
    nodes show are copied into ``previews``."""
    result = Result(path.stem)
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
        prompt = workflow_to_prompt(workflow, object_info)
        if needs_demo_models(prompt):  # not a shipped example: it names files this machine may not have
            prompt = use_demo_models(prompt)
    except (WorkflowError, ValueError) as error:
        result.status, result.error = "invalid", f"{type(error).__name__}: {error}"
        return result
    before = output_files(server.output_dir)
    start = time.monotonic()
    try:
        entry = server.wait(server.post_prompt(prompt), timeout=timeout)
    except ServerError as error:
        result.status, result.error = "rejected", str(error)
        return result
    finally:
        result.seconds = round(time.monotonic() - start, 2)
    result.outputs = sorted(str(path) for path in output_files(server.output_dir) - before)
    for node_id, ui in sorted(entry.get("outputs", {}).items(), key=lambda item: _node_order(item[0])):
        node = prompt.get(node_id, {})
        if "text" in ui:
            title = node.get("_meta", {}).get("title", "")
            result.messages[node_id] = {"node": node.get("class_type", ""), "title": title, "text": ui["text"]}
        if kept := keep_previews(shown_previews(server, ui), previews, node_id):
            result.previews[node_id] = kept
        if saved := saved_images(server, ui):
            result.images[node_id] = saved
    failure = execution_error(entry)
    result.status = "error" if failure or entry["status"]["status_str"] != "success" else "success"
    if failure:
        result.error = f"{failure.get('node_type')} (node {failure.get('node_id')}): {failure.get('exception_message')}"
    return result


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)


def print_summary(results: list[Result], missing: list[str], summary_path: Path) -> None:
    print()
    if missing:
        print(f"MISSING NODES (not in /object_info): {', '.join(missing)}")
    for result in results:
        mark = "ok  " if result.status == "success" else "FAIL"
        print(f"{mark} {result.name}: {result.status} in {result.seconds:.1f} s")
        for output in result.outputs:
            print(f"       {output}")
        for node_id, images in result.previews.items():
            print(f"       node {node_id} showed {len(images)} preview(s): {images[0]}")
        for node_id, message in result.messages.items():
            texts = message["text"]
            first_line = (texts[0].splitlines() or [""])[0] if texts else ""
            print(f"       node {node_id} ({message['title']}): {first_line}")
        if result.error:
            print("       " + result.error.strip().replace("\n", "\n       "))
    passed = sum(r.status == "success" for r in results)
    print(f"\n{passed}/{len(results)} workflows succeeded; summary: {summary_path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "demo_out", help="work folder (default demo_out/)")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH or found nearby)")
    parser.add_argument("--port", type=int, help=f"server port (default: a free one; {SERVE_PORT} with --serve)")
    parser.add_argument("--serve", action="store_true", help="keep ComfyUI running afterwards (Ctrl+C stops it)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per workflow")
    parser.add_argument("workflows", nargs="*", type=Path, help="workflow files (default example_workflows/*.json)")
    return parser.parse_args(argv)


def start_server(options: argparse.Namespace) -> ComfyServer:
    if options.comfyui:
        comfyui, installed = options.comfyui.resolve(), is_installed_in(options.comfyui)
    else:
        comfyui, installed = find_comfyui(PACK_ROOT)
    port = options.port or (SERVE_PORT if options.serve else None)
    if port and not port_is_free(port):
        raise ServerError(f"port {port} is in use (another ComfyUI?); pick another with --port")
    server = ComfyServer(comfyui, options.out.resolve(), pack_installed=installed, port=port)
    print(f"starting ComfyUI from {comfyui} on {server.url} (log: {server.log_path})")
    if options.serve:
        skip_welcome_dialog(server.work / "user")
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def skip_welcome_dialog(user_dir: Path) -> None:
    """Mark the editor's first-run tutorial as done in the demo's own user folder."""
    settings = user_dir / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}) + "\n")


def run(options: argparse.Namespace, server: ComfyServer) -> int:
    object_info = server.get("/object_info")
    missing = [node_id for node_id in pack_node_ids() if node_id not in object_info]
    if missing:
        print(server.log_tail(60))
    paths = options.workflows or sorted((PACK_ROOT / "example_workflows").glob("*.json"))
    results = []
    for path in paths:
        print(f"running {path.name} …", flush=True)
        previews = options.out.resolve() / "previews" / path.stem
        shutil.rmtree(previews, ignore_errors=True)
        results.append(run_workflow(server, path, object_info, options.timeout, previews))
    ok = not missing and bool(results) and all(r.status == "success" for r in results)
    summary = {
        "ok": ok,
        "server": server.url,
        "comfyui": str(server.comfyui),
        "paths": "every path in this file is absolute",
        "output_dir": str(server.output_dir.resolve()),
        "previews_dir": str((options.out / "previews").resolve()),
        "pack_nodes": sorted(n for n in object_info if n.startswith("DM_")),
        "missing_nodes": missing,
        "workflows": [asdict(r) for r in results],
    }
    summary_path = options.out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_summary(results, missing, summary_path)
    return 0 if ok else 1


def serve(server: ComfyServer) -> None:
    print(f"\nComfyUI is running with the pack loaded: open {server.url} in a browser.")
    print("Load an example from the side bar's Templates button → diffusion-merge: each runs as it is on the")
    print("built-in mini model family. Ctrl+C stops it.")
    try:
        server.process.wait()
    except KeyboardInterrupt:
        print("\nstopping ComfyUI")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally` (stop ComfyUI) on kill too
    try:
        server = start_server(options)
    except (ServerError, ComfyUINotFound) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        code = run(options, server)
        if options.serve:
            serve(server)
        return code
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
