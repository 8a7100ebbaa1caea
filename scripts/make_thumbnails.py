"""Write the template-browser thumbnail of every example workflow: ``example_workflows/<name>.jpg``.

Each thumbnail is the workflow as ComfyUI's own editor draws it (headless Chromium, ``scripts/browser.py``),
fitted to the view. The editor's template browser shows it next to the pack's templates.

    .venv-0.33.0/bin/python scripts/make_thumbnails.py            # every workflow
    .venv-0.33.0/bin/python scripts/make_thumbnails.py deme_merge # just these
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from browser import Editor
from comfy_in_process import find_comfyui
from comfy_server import ComfyServer
from PIL import Image

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = PACK_ROOT / "example_workflows"
THUMBNAIL_WIDTH = 768
JPEG_QUALITY = 82


def thumbnail(editor: Editor, workflow: dict) -> bytes:
    """The JPEG bytes of ``workflow`` drawn by the editor and fitted to the view."""
    editor.load_workflow(workflow)
    editor.fit_view()
    editor.settle(1.0)  # the σ preview fetches its schedule after a short delay
    png = editor.page.screenshot(clip=editor.canvas_clip())
    image = Image.open(io.BytesIO(png)).convert("RGB")
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    out = io.BytesIO()
    image.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all)")
    options = parser.parse_args(argv)
    paths = [WORKFLOW_DIR / f"{name}.json" for name in options.names] or sorted(WORKFLOW_DIR.glob("*.json"))
    comfyui, installed = find_comfyui()
    with (
        tempfile.TemporaryDirectory(prefix="dm-thumbnails-") as work,
        ComfyServer(comfyui, Path(work), pack_installed=installed) as server,
        Editor(server.url) as editor,
    ):
        for path in paths:
            target = path.with_suffix(".jpg")
            target.write_bytes(thumbnail(editor, json.loads(path.read_text())))
            print(f"{target.relative_to(PACK_ROOT)}: {target.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
