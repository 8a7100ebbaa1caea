"""Write the template-browser thumbnail of every example workflow from what it makes: ``example_workflows/<name>.jpg``.

Each example runs as shipped in a real ComfyUI server on the CPU (the built-in mini family; the same code path
as the demo, ``run_examples.py``), and its thumbnail shows its output, as ComfyUI's own templates do: the
pictures of every node that saved pictures, one labelled panel per node (a workflow that compares models
shows each), and for a workflow that saves no picture, the previews its nodes showed (e.g. training plots).

    .venv-0.33.0/bin/python scripts/make_thumbnails.py            # every workflow
    .venv-0.33.0/bin/python scripts/make_thumbnails.py deme_merge # just these
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from comfy_in_process import find_comfyui
from comfy_server import ComfyServer
from PIL import Image, ImageDraw, ImageFont
from run_examples import Result, run_workflow

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = PACK_ROOT / "example_workflows"
THUMBNAIL_WIDTH = 768
JPEG_QUALITY = 90
PICTURE_COLUMNS = 4  # pictures per row in a panel
PANEL_COLUMNS = 3  # panels side by side at most
LABEL_HEIGHT, GAP = 28, 6
BACKGROUND, LABEL_COLOUR = (24, 24, 27), (235, 235, 235)
# Labels for panels whose saving node has no title of its own, by workflow.
WORKFLOW_LABELS = {"routing_wan22": "Wan 2.2's graph on tiny built-in Wan experts (random weights): noise"}


def panels_of(result: Result, workflow: dict) -> list[tuple[str, list[Path]]]:
    """(label, picture files) per node that saved pictures, in node order; else per node that showed previews."""
    titles = {str(node["id"]): node.get("title", "") for node in workflow["nodes"]}
    sources = result.images or result.previews
    panels = []
    for node_id, files in sorted(sources.items(), key=lambda item: int(item[0])):
        label = titles.get(node_id, "").removeprefix("Save: ") or WORKFLOW_LABELS.get(result.name, "")
        panels.append((label, [Path(file) for file in files]))
    return panels


def first_frame(path: Path) -> Image.Image:
    """A picture (the first frame of an animation) as RGB."""
    with Image.open(path) as image:
        image.seek(0)
        return image.convert("RGB")


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def compose(panels: list[tuple[str, list[Path]]]) -> Image.Image:
    """The thumbnail: panels side by side (``PANEL_COLUMNS`` at most per row), each a labelled grid of its
    pictures scaled up by whole pixels (nearest neighbour keeps the 32×32 pictures sharp)."""
    if not panels:
        raise ValueError("the workflow saved and showed no picture")
    per_row = min(len(panels), PANEL_COLUMNS)
    panel_width = (THUMBNAIL_WIDTH - GAP * (per_row + 1)) // per_row
    layouts = []
    for label, files in panels:
        pictures = [first_frame(path) for path in files]
        columns = min(len(pictures), PICTURE_COLUMNS) if len(pictures) > 1 else 1
        rows = -(-len(pictures) // columns)
        cell = panel_width // columns
        if len(panels) == 1 and len(pictures) == 1:
            cell = min(cell, 384)
        layouts.append((label, pictures, columns, rows, cell))
    row_heights = []
    for start in range(0, len(layouts), per_row):
        row = layouts[start : start + per_row]
        labelled = any(label for label, *_ in row)
        row_heights.append(max(rows * cell for _, _, _, rows, cell in row) + (LABEL_HEIGHT if labelled else 0))
    canvas = Image.new("RGB", (THUMBNAIL_WIDTH, sum(row_heights) + GAP * (len(row_heights) + 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_font = font(18)
    top = GAP
    for index, (label, pictures, columns, _rows, cell) in enumerate(layouts):
        row, column = divmod(index, per_row)
        if column == 0 and row > 0:
            top += row_heights[row - 1] + GAP
        left = GAP + column * (panel_width + GAP)
        width = columns * cell
        offset = left + (panel_width - width) // 2
        picture_top = top
        if any(lbl for lbl, *_ in layouts[row * per_row : (row + 1) * per_row]):
            draw.text((left, top + 4), label, fill=LABEL_COLOUR, font=text_font)
            picture_top += LABEL_HEIGHT
        for number, picture in enumerate(pictures):
            r, c = divmod(number, columns)
            scaled = picture.resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(scaled, (offset + c * cell, picture_top + r * cell))
    return canvas


def write_thumbnail(result: Result, workflow: dict, target: Path) -> None:
    if result.status != "success":
        raise RuntimeError(f"{result.name}: {result.status}: {result.error}")
    compose(panels_of(result, workflow)).save(target, "JPEG", quality=JPEG_QUALITY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all)")
    options = parser.parse_args(argv)
    paths = [WORKFLOW_DIR / f"{name}.json" for name in options.names] or sorted(WORKFLOW_DIR.glob("*.json"))
    comfyui, installed = find_comfyui(PACK_ROOT)
    env = {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with (
        tempfile.TemporaryDirectory(prefix="dm-thumbnails-") as work,
        ComfyServer(comfyui, Path(work), pack_installed=installed, env=env) as server,
    ):
        object_info = server.get("/object_info")
        for path in paths:
            result = run_workflow(server, path, object_info, 600.0, Path(work) / "previews" / path.stem)
            target = path.with_suffix(".jpg")
            write_thumbnail(result, json.loads(path.read_text(encoding="utf-8")), target)
            print(f"{target.relative_to(PACK_ROOT)}: {target.stat().st_size // 1024} KiB ({result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
