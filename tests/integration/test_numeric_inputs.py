"""Every FLOAT input of every node refuses NaN and ±Inf, naming the node and the input (ComfyUI's min/max
checks let NaN through, and linked values are not checked at all)."""

from __future__ import annotations

import math
import re

import pytest

from diffusion_merge.nodes import ALL_NODES
from diffusion_merge.nodes.validation import float_inputs


def float_cases() -> list[tuple[type, str]]:
    return [(node, name) for node in ALL_NODES for name in float_inputs(node)[0]]


def test_the_pack_has_float_inputs_to_check():
    names = {name for _, name in float_cases()}
    assert {"factor", "strength", "lam", "grad_clip", "consistency_weight", "learning_rate"} <= names


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("node", "name"), float_cases(), ids=[f"{node.__name__}.{name}" for node, name in float_cases()]
)
def test_a_nonfinite_float_input_is_refused_before_the_node_runs(comfyui, node, name, bad):
    display_name = node.define_schema().display_name
    with pytest.raises(ValueError, match=re.escape(f"{display_name}: input '{name}' is {bad}")) as raised:
        node.execute(**{name: bad})
    assert "must be finite" in str(raised.value)


def test_nan_through_a_prompt_fails_naming_the_input(run_prompt):
    prompt = {
        "1": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "base", "seed": 0}},
        "2": {"class_type": "DM_DemoCheckpointLoader", "inputs": {"variant": "finetune-a", "seed": 0}},
        "3": {"class_type": "DM_TaskVectorFromModels", "inputs": {"finetuned": ["2", 0], "base": ["1", 0]}},
        "4": {
            "class_type": "DM_TaskVectorApply",
            "inputs": {"model": ["1", 0], "task_vector": ["3", 0], "strength": "nan"},
        },
        "5": {
            "class_type": "DM_SaveCheckpointStreaming",
            "inputs": {"model": ["4", 0], "filename_prefix": "nan/x", "dtype": "fp16"},
        },
    }
    with pytest.raises(AssertionError, match=r"prompt failed: .*Apply Task Vector: input 'strength' is nan"):
        run_prompt(prompt)


def test_finite_values_still_run(comfyui):
    from diffusion_merge.nodes.merge import TaskVectorStackNode

    stack = TaskVectorStackNode.execute(task_vector="τ", weight=0.5).result[0]
    assert stack[0].weight == 0.5
