"""Every node of the pack follows the house rules: id, category, description, tooltips, help page."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_merge.nodes import ALL_NODES

PACK_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = [node.GET_SCHEMA() for node in ALL_NODES]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.node_id)
def test_node_schema_is_documented(schema):
    assert schema.node_id.startswith("DM_")
    assert schema.category.startswith("diffusion_merge/")
    assert schema.description and len(schema.description) > 20
    assert schema.display_name
    for node_input in schema.inputs:
        assert node_input.tooltip, f"{schema.node_id}.{node_input.id} has no tooltip"
    assert (PACK_ROOT / "web" / "docs" / f"{schema.node_id}.md").is_file()


def test_node_ids_are_unique():
    ids = [schema.node_id for schema in SCHEMAS]
    assert len(ids) == len(set(ids))


def test_pyproject_version_matches_the_library():
    import tomllib

    from diffusion_merge import merging

    project = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == merging.__version__
    assert project["tool"]["comfy"]["requires-comfyui"] == ">=0.3.64"
