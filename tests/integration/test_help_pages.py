"""Every node's help page (web/docs/<NodeId>.md, the "?" panel of the node library) has the structure the project
asks for: what the node does, its inputs (every one, by name), a worked example and pitfalls."""

from __future__ import annotations

import re
from pathlib import Path

from diffusion_merge.nodes import ALL_NODES

PACK_ROOT = Path(__file__).resolve().parents[2]
DOCS = PACK_ROOT / "web" / "docs"
SCHEMAS = [node.GET_SCHEMA() for node in ALL_NODES]
REQUIRED_SECTIONS = ("Inputs", "Example", "Pitfalls")


def sections(page: str) -> dict[str, str]:
    """Level-2 heading → the text under it (up to the next level-2 heading); "## Example — …" counts as Example."""
    found: dict[str, str] = {}
    parts = re.split(r"^## +(.+?) *$", page, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        name = re.split(r"\W", heading, maxsplit=1)[0]
        found.setdefault(name, body)
    return found


def page_problems(schema) -> list[str]:
    path = DOCS / f"{schema.node_id}.md"
    if not path.is_file():
        return [f"{schema.node_id}: no help page {path.relative_to(PACK_ROOT)}"]
    found = sections(path.read_text(encoding="utf-8"))
    problems = [f"{schema.node_id}: no '## {name}' section" for name in REQUIRED_SECTIONS if name not in found]
    inputs_text = found.get("Inputs", "")
    for node_input in schema.inputs:  # hidden inputs live in schema.hidden, not here
        if not re.search(rf"(?<!\w){re.escape(node_input.id)}(?!\w)", inputs_text):
            problems.append(f"{schema.node_id}: input '{node_input.id}' is not described under '## Inputs'")
    return problems


def test_every_node_has_a_complete_help_page():
    assert SCHEMAS, "no nodes found"
    problems = [problem for schema in SCHEMAS for problem in page_problems(schema)]
    assert not problems, f"{len(problems)} help-page problem(s):\n" + "\n".join(problems)


def test_sections_are_found_by_their_level_2_headings():
    page = "# Title\nIntro\n## Inputs\n- `a` — x\n### Units\nmore\n## Example — DeMe\nsteps\n## Pitfalls\n- one\n"
    found = sections(page)
    assert list(found) == ["Inputs", "Example", "Pitfalls"]
    assert "### Units" in found["Inputs"] and "`a`" in found["Inputs"]
