"""Where the README says the example workflows are, in ComfyUI's real frontend (headless Chromium).

A module (and browser page) of its own: opening the template browser leaves state behind in frontend 1.49.6
that upsets the canvas tests of ``test_browser.py``, and one process can drive only one Playwright at a time.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


def test_the_examples_open_from_the_side_bar_templates_button(server, browser_script):
    """README: "the **Templates** button of the left side bar, in the category named after the pack's folder"."""
    with browser_script.Editor(server.url) as editor:
        page = editor.page
        page.get_by_role("button", name="Templates", exact=True).first.click()
        page.get_by_text(server.pack_folder, exact=True).first.click(timeout=15_000)
        page.wait_for_function(
            "() => document.querySelector('[role=dialog]')?.innerText.includes('merge_ties')", timeout=15_000
        )
