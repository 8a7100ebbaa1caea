"""Drive ComfyUI's real frontend in a headless Chromium (Debian's ``chromium``, no browser download).

Used by the browser tests (``tests/e2e/test_browser.py``) and by ``scripts/make_thumbnails.py``:

    with Editor(server.url) as editor:
        editor.load_workflow(workflow)       # app.loadGraphData, like opening the file in the editor
        editor.graph_to_prompt()             # the API prompt the Run button would queue
        editor.screenshot_node(node_id, path)

Playwright (PyPI ``playwright``) talks to the browser; ``chromium_path()`` finds the executable
(``DM_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

EDITOR_SETTINGS = {  # no first-start dialog, no overlays on the canvas, full detail at any zoom
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}
VIEWPORT = {"width": 1920, "height": 1200}
CANVAS_MARGIN = {"left": 70, "top": 80, "right": 10, "bottom": 10}  # side bar and top menu overlay the canvas
READY_TIMEOUT_MS = 60_000


class BrowserError(RuntimeError):
    """The browser or the editor did not come up."""


def chromium_path() -> str:
    """The Chromium executable; raises BrowserError naming the fix when there is none."""
    candidates = [os.environ.get("DM_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise BrowserError("no Chromium found: run scripts/setup_browser.sh (apt chromium) or set DM_CHROMIUM")


@dataclass
class ConsoleMessage:
    kind: str  # console type ("error", "warning", …) or "pageerror" for an uncaught exception
    text: str
    where: str  # the script URL, or the stack of an uncaught exception

    def mentions(self, fragment: str) -> bool:
        return fragment in self.where or fragment in self.text


@dataclass
class Editor:
    """The ComfyUI editor at ``url`` in a fresh headless Chromium page; a context manager."""

    url: str
    messages: list[ConsoleMessage] = field(default_factory=list)

    def __enter__(self) -> Editor:

        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=chromium_path(),
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
            self.page = self._browser.new_page(viewport=VIEWPORT)
            self.page.on("console", self._on_console)
            self.page.on(
                "pageerror",
                lambda error: self.messages.append(ConsoleMessage("pageerror", str(error), error.stack or "")),
            )
            self.page.request.post(f"{self.url}/api/settings", data=EDITOR_SETTINGS)  # before the editor reads them
            self.page.goto(self.url)
            self.page.wait_for_function("() => window.app?.graph && window.LiteGraph", timeout=READY_TIMEOUT_MS)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        browser = getattr(self, "_browser", None)
        if browser is not None:
            browser.close()
        self._playwright.stop()

    def _on_console(self, message) -> None:
        self.messages.append(ConsoleMessage(message.type, message.text, message.location.get("url", "")))

    def errors_from(self, fragment: str) -> list[ConsoleMessage]:
        """Console errors and uncaught exceptions so far whose script URL, stack or text mentions ``fragment``."""
        return [m for m in self.messages if m.kind in ("error", "pageerror") and m.mentions(fragment)]

    # -- the graph

    def evaluate(self, script: str, argument: Any = None) -> Any:
        return self.page.evaluate(script, argument)

    def load_workflow(self, workflow: dict) -> dict:
        """Open a UI-format workflow; returns what the editor would save for it now (``graph.serialize()``)
        and, per node, its id, type and whether that type is registered."""
        return self.evaluate(
            """async (workflow) => {
              await app.loadGraphData(structuredClone(workflow), true, true, null, {
                showMissingModelsDialog: false, showMissingNodesDialog: false,
              });
              return {
                saved: app.graph.serialize(),
                nodes: app.graph.nodes.map((n) => ({
                  id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
                })),
              };
            }""",
            workflow,
        )

    def graph_to_prompt(self) -> dict:
        """The API prompt (``output``) the Run button would queue for the open graph."""
        return self.evaluate("async () => (await app.graphToPrompt()).output")

    def client_id(self) -> str:
        """The editor's websocket client id: prompts queued with it report their results to this page."""
        return self.evaluate("() => window.comfyAPI.api.api.clientId")

    def clear(self) -> None:
        self.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")

    def add_node_from_search(self, query: str) -> list[tuple[str, list[str]]]:
        """Add a node the way a user does: double-click an empty canvas, type, Enter. Clears the graph
        first; returns [(type, widget names)] of the graph's nodes afterwards."""
        self.clear()
        for attempt in range(3):  # a double-click right after the previous search is sometimes lost
            self.page.keyboard.press("Escape")
            self.page.mouse.click(700, 500)  # focus the empty canvas
            self.page.wait_for_timeout(300 * (attempt + 1))
            self.page.mouse.dblclick(800, 600)
            try:
                self.page.wait_for_function("() => document.activeElement?.tagName === 'INPUT'", timeout=3_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
        self.page.keyboard.type(query)
        self.page.wait_for_timeout(400)
        self.page.keyboard.press("Enter")
        return [
            tuple(node)
            for node in self.evaluate(
                "() => app.graph.nodes.map((n) => [n.type, (n.widgets ?? []).map((w) => w.name)])"
            )
        ]

    def fit_view(self, node_ids: list[int] | None = None) -> None:
        """Scale and centre the canvas so the nodes (default: all) fit the part of the window not under
        the menus, at most 1.5× magnified."""
        self.evaluate(
            """([margin, ids]) => {
              const nodes = ids ? ids.map((id) => app.graph.getNodeById(id)) : app.graph.nodes;
              if (!nodes.length) return;
              const title = LiteGraph.NODE_TITLE_HEIGHT;
              const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 20;
              const y0 = Math.min(...nodes.map((n) => n.pos[1] - title)) - 20;
              const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
              const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
              const canvas = app.canvas.canvas;
              const width = canvas.clientWidth - margin.left - margin.right;
              const height = canvas.clientHeight - margin.top - margin.bottom;
              const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1.5);
              const ds = app.canvas.ds;
              ds.scale = scale;
              ds.offset[0] = (margin.left + (width - (x1 - x0) * scale) / 2) / scale - x0;
              ds.offset[1] = (margin.top + (height - (y1 - y0) * scale) / 2) / scale - y0;
              app.canvas.setDirty(true, true);
            }""",
            [CANVAS_MARGIN, node_ids],
        )
        self.settle()

    def node_box(self, node_id: int) -> dict[str, float]:
        """A node's rectangle (title bar included) in page pixels."""
        return self.evaluate(
            """(id) => {
              const node = app.graph.getNodeById(id);
              const title = LiteGraph.NODE_TITLE_HEIGHT;
              const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
              const rect = app.canvas.canvas.getBoundingClientRect();
              const scale = app.canvas.ds.scale;
              return { x: rect.left + x, y: rect.top + y, width: node.size[0] * scale,
                       height: (node.size[1] + title) * scale };
            }""",
            node_id,
        )

    def settle(self, seconds: float = 0.5) -> None:
        """Let the canvas redraw (and debounced fetches such as the σ preview's land)."""
        self.evaluate("() => app.canvas.setDirty(true, true)")
        time.sleep(seconds)

    # -- pictures

    def screenshot(self, path: Path, clip: dict[str, float] | None = None, **options: Any) -> Path:
        self.page.screenshot(path=str(path), clip=clip, **options)
        return path

    def canvas_clip(self) -> dict[str, float]:
        """The canvas area that no menu covers, in page pixels."""
        return {
            "x": CANVAS_MARGIN["left"],
            "y": CANVAS_MARGIN["top"],
            "width": VIEWPORT["width"] - CANVAS_MARGIN["left"] - CANVAS_MARGIN["right"],
            "height": VIEWPORT["height"] - CANVAS_MARGIN["top"] - CANVAS_MARGIN["bottom"],
        }
