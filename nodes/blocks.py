"""Block groups of a model: which architecture it is and which named blocks the merge nodes' rules can scale.

The merge nodes' block-weight editor (``web/js/block_weights.js``) gets the same groups from
``blocks_server``'s route; this node shows them for any MODEL, after LoRAs, merges or custom loaders.
"""

from __future__ import annotations

import json
import math

from ..merging.blocks import describe_groups, group_keys
from . import comfy_bridge as bridge
from .compat import io, ui
from .types import CATEGORY


class ModelBlocksNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_ModelBlocks",
            display_name="Model Blocks",
            category=f"{CATEGORY}/merging",
            description="Detects a model's architecture (SD1.x/SD2, SDXL, SD3/SD3.5, Flux, Wan 2.1/2.2, Qwen-Image) "
            "and lists its block groups with their key and parameter counts: the names a merge node's "
            "weight_rules accept as '@NAME = 0.5' (embed, IN04, M00, OUT03, J12, D05, S20, B17, T30, final …) "
            "and the sliders of the merge nodes' block-weight editor.",
            inputs=[io.Model.Input("model", tooltip="Any MODEL (a loader's, or one with LoRAs or merges applied).")],
            outputs=[
                io.String.Output(
                    display_name="blocks",
                    tooltip="JSON: architecture, label, and per group its keys and parameters (in slider order).",
                )
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model):
        weights = bridge.model_weights(model)
        groups = group_keys(list(weights))
        sizes = {
            name: {
                "keys": len(paths),
                "parameters": sum(math.prod(weights.shape_of("diffusion_model." + p)) for p in paths),
            }
            for name, paths in groups.groups.items()
        }
        summary = {
            "architecture": groups.architecture.id,
            "label": groups.architecture.label,
            "groups": sizes,
            "ungrouped": groups.ungrouped,
        }
        return io.NodeOutput(json.dumps(summary), ui=ui.PreviewText(format_blocks(summary)))


def format_blocks(summary: dict) -> str:
    """The node's text: the architecture, the groups as rule names, then one line per group."""
    groups = summary["groups"]
    lines = [
        f"{summary['label']}: {len(groups)} block groups",
        f"  {describe_groups(list(groups))}",
        "rule: '@NAME = 0.5' in a merge node's weight_rules",
    ]
    lines += [f"  {name:<6} {row['keys']:>5} keys {row['parameters'] / 1e6:>10.2f} M" for name, row in groups.items()]
    if summary["ungrouped"]:
        lines.append(
            f"  in no group (use a regex rule): {len(summary['ungrouped'])} keys, e.g. {summary['ungrouped'][0]}"
        )
    return "\n".join(lines)


NODES = [ModelBlocksNode]
