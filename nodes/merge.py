"""Merge nodes: stack task vectors with weights, merge them onto a base with one method per node.

One node per method keeps each node's widgets meaningful (TIES has k, DARE has p and a seed, DRM a drop
rate and a direction) and lets a method gain an optional input later without shifting the saved widget
values of the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import torch

from ..merging.consensus import SIGN_RULES
from ..merging.drm import DIRECTIONS
from ..merging.key_weights import parse_weight_rules
from ..merging.merge import merge_to_task_vector
from ..merging.methods import COMMON_DEFAULTS, METHODS, TOPK_SCOPES
from ..merging.task_vectors import TaskVector
from . import comfy_bridge as bridge
from .compat import io
from .types import CATEGORY, TaskVectorStackType, TaskVectorType

logger = logging.getLogger(__name__)

MERGE_CATEGORY = f"{CATEGORY}/merging"
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Widget defaults and options come from the library, the one place that defines them.
LAM = COMMON_DEFAULTS["lam"]
TIES, DARE, LAS, DRM = (METHODS[name].defaults for name in ("ties", "dare", "las", "drm"))
NO_SIGN = "none"
"""The DARE node's sign option for no election (the library's ``sign=None``)."""


@dataclass(frozen=True)
class StackEntry:
    vector: TaskVector
    weight: float


class TaskVectorStackNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_TaskVectorStack",
            display_name="Stack Task Vectors",
            category=MERGE_CATEGORY,
            description="Collect task vectors for a merge: each Stack node adds one task vector with its weight to "
            "the stack coming in, so any number of them chain left to right.",
            inputs=[
                TaskVectorType.Input("task_vector", tooltip="The task vector to add to the stack."),
                io.Float.Input(
                    "weight",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Its coefficient in the merge (free, not normalised: DeMe uses 0.1, 0.1, 0.2, 0.5).",
                ),
                TaskVectorStackType.Input("stack", optional=True, tooltip="Optional: the stack to extend."),
            ],
            outputs=[TaskVectorStackType.Output(display_name="stack", tooltip="The stack, this entry last.")],
        )

    @classmethod
    def execute(cls, task_vector: TaskVector, weight=1.0, stack=None):
        return io.NodeOutput((*(stack or ()), StackEntry(task_vector, float(weight))))


def _common_inputs() -> list[io.Input]:
    return [
        io.Model.Input("base", tooltip="The base model every task vector was taken from."),
        TaskVectorStackType.Input("task_vectors", tooltip="The task vectors and their weights (Stack Task Vectors)."),
    ]


def _lam_input(default: float = LAM) -> io.Input:
    return io.Float.Input(
        "lam",
        default=default,
        min=-10.0,
        max=10.0,
        step=0.01,
        tooltip="λ: global scale of the merged change (1 = as merged, 0 = the base unchanged).",
    )


def _rules_input() -> io.Input:
    return io.String.Input(
        "weight_rules",
        default="",
        multiline=True,
        optional=True,
        tooltip="Optional per-key multipliers, one per line: 'regex = 0.5' or a named block '@IN04 = 0.5' "
        "(embed, IN00…, M00, OUT00… for SD1/SDXL; J00… SD3; D00…, S00… Flux; B00… Wan; T00… Qwen-Image; final; "
        "or the coarse @input, @middle, @output, @double, @single). Rules multiply. The 'block weights' "
        "button edits the named blocks with one slider each.",
    )


_OUTPUTS = [
    io.Model.Output(display_name="MODEL", tooltip="The base with the merged change as patches (input untouched)."),
    TaskVectorType.Output(display_name="merged", tooltip="The merged task vector, e.g. to save it small."),
]


def run_merge(base, stack, method: str, weight_rules: str = "", **params):
    """Merge the stack's task vectors onto a clone of ``base``; returns (patched MODEL, merged τ)."""
    if not stack:
        raise ValueError("the task-vector stack is empty: connect at least one Stack Task Vectors node")
    vectors = [entry.vector for entry in stack]
    for index, vector in enumerate(vectors, start=1):
        bridge.check_compatible(base, vector, what=f"base model (task vector {index})")
    warn_on_other_bases(base, vectors)
    key_weights, block_weights = parse_weight_rules(weight_rules or "")
    bar = comfy.utils.ProgressBar(1)
    merged = merge_to_task_vector(
        vectors,
        method,
        weights=[entry.weight for entry in stack],
        key_weights=key_weights,
        block_weights=block_weights,
        storage_dtype=storage_dtype(base),
        storage_device=base.offload_device,
        device=mm.get_torch_device(),
        progress=lambda done, total: bar.update_absolute(done, total),
        should_stop=mm.throw_exception_if_processing_interrupted,
        **params,
    )
    patched, _ = bridge.apply_to_model(base, merged, 1.0)
    return io.NodeOutput(patched, merged)


def storage_dtype(model) -> torch.dtype:
    """Keep merged deltas in the model's own precision (bf16 for fp8 models: fp8 deltas lose too much)."""
    dtype = model.model_dtype()
    return dtype if dtype in STORAGE_DTYPES else torch.bfloat16


def warn_on_other_bases(base, vectors: list[TaskVector]) -> None:
    """Log a warning for task vectors taken from a different base (same architecture, other weights)."""
    known = [(i, v.base_fingerprint) for i, v in enumerate(vectors, start=1) if v.base_fingerprint]
    if not known:
        return
    base_print = bridge.model_fingerprint(base)
    for index, vector_print in known:
        if vector_print != base_print:
            logger.warning(
                "task vector %d was extracted from another base model (fingerprint %s, this base %s); "
                "the merge adds its change to this base anyway",
                index,
                vector_print,
                base_print,
            )


class MergeTaskArithmeticNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MergeTaskArithmetic",
            display_name="Merge: Task Arithmetic",
            category=MERGE_CATEGORY,
            description="θ = θ_base + λ·Σ wᵢτᵢ (task arithmetic; DeMe's merge of range experts with free weights).",
            inputs=[*_common_inputs(), _lam_input(), _rules_input()],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, base, task_vectors, lam=LAM, weight_rules=""):
        return run_merge(base, task_vectors, "weighted", weight_rules, lam=lam)


class MergeTIESNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MergeTIES",
            display_name="Merge: TIES",
            category=MERGE_CATEGORY,
            description="TIES-Merging: trim each task vector to its largest-magnitude entries, elect a sign per "
            "entry, average the agreeing entries (disjoint mean), scale by λ. The trim is over the whole model "
            "(as in the paper) unless 'per tensor' is chosen.",
            inputs=[
                *_common_inputs(),
                io.Float.Input(
                    "k",
                    default=TIES["k"],
                    min=0.0001,
                    max=1.0,
                    step=0.01,
                    tooltip="Kept fraction of each task vector's entries (0.2 = the largest 20%).",
                ),
                io.Combo.Input(
                    "topk_scope",
                    options=list(TOPK_SCOPES),
                    default=TIES["topk_scope"],
                    tooltip="global: top-k over the whole model (the paper); per_tensor: within each tensor "
                    "(what most other tools do).",
                ),
                io.Combo.Input(
                    "sign",
                    options=list(SIGN_RULES),
                    default=TIES["sign"],
                    tooltip="Sign election: by summed values (the paper) or by majority count.",
                ),
                _lam_input(),
                _rules_input(),
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(
        cls,
        base,
        task_vectors,
        k=TIES["k"],
        topk_scope=TIES["topk_scope"],
        sign=TIES["sign"],
        lam=LAM,
        weight_rules="",
    ):
        return run_merge(base, task_vectors, "ties", weight_rules, k=k, topk_scope=topk_scope, sign=sign, lam=lam)


class MergeDARENode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MergeDARE",
            display_name="Merge: DARE",
            category=MERGE_CATEGORY,
            description="DARE: drop each task-vector entry with probability p and rescale the rest by 1/(1−p), "
            "then sum — or, with sign election on, DARE-TIES (elect signs, disjoint mean).",
            inputs=[
                *_common_inputs(),
                io.Float.Input(
                    "p",
                    default=DARE["p"],
                    min=0.0,
                    max=0.999,
                    step=0.01,
                    tooltip="Drop rate: the share of entries set to zero (0.9 keeps 10%).",
                ),
                io.Boolean.Input(
                    "rescale",
                    default=DARE["rescale"],
                    tooltip="Rescale kept entries by 1/(1−p) so the expected change is unchanged (the paper).",
                ),
                io.Combo.Input(
                    "sign",
                    options=[NO_SIGN, *SIGN_RULES],
                    default=DARE["sign"] or NO_SIGN,
                    tooltip="none: weighted sum (DARE); mass/count: TIES-style election + disjoint mean (DARE-TIES).",
                ),
                io.Int.Input(
                    "seed",
                    default=DARE["seed"],
                    min=0,
                    max=2**31 - 1,
                    tooltip="Seed of the random drop masks (results do not depend on key order or device).",
                ),
                _lam_input(),
                _rules_input(),
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(
        cls,
        base,
        task_vectors,
        p=DARE["p"],
        rescale=DARE["rescale"],
        sign=DARE["sign"] or NO_SIGN,
        seed=DARE["seed"],
        lam=LAM,
        weight_rules="",
    ):
        election = None if sign == NO_SIGN else sign
        return run_merge(
            base, task_vectors, "dare", weight_rules, p=p, rescale=rescale, sign=election, seed=seed, lam=lam
        )


class MergeLocalizeAndStitchNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MergeLocalizeAndStitch",
            display_name="Merge: Localize-and-Stitch",
            category=MERGE_CATEGORY,
            description="Localize-and-Stitch (dataless): each task keeps only its top-k share of entries over "
            "the whole model; entries one task selected get its full change, entries several selected get "
            "their average. No scaling needed (λ = 1).",
            inputs=[
                *_common_inputs(),
                io.Float.Input(
                    "k",
                    default=LAS["k"],
                    min=0.0001,
                    max=1.0,
                    step=0.01,
                    tooltip="Share of each task vector's entries it keeps (0.05 = its largest 5%, the paper's).",
                ),
                _lam_input(),
                _rules_input(),
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, base, task_vectors, k=LAS["k"], lam=LAM, weight_rules=""):
        return run_merge(base, task_vectors, "las", weight_rules, k=k, lam=lam)


class MergeDRMNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MergeDRM",
            display_name="Merge: DRM (Decom-Renorm-Merge)",
            category=MERGE_CATEGORY,
            description="DRM: per weight matrix, a joint SVD of all task vectors gives a shared basis; each "
            "model's coordinates are renormalised, trimmed jointly, sign-elected and averaged there. Biases and "
            "norms take a TIES-like path.",
            inputs=[
                *_common_inputs(),
                io.Float.Input(
                    "drop_rate",
                    default=DRM["drop_rate"],
                    min=0.0,
                    max=0.999,
                    step=0.01,
                    tooltip="Share of the renormalised basis entries dropped, over all models together "
                    "(0.8 keeps the largest 20%, the paper's default).",
                ),
                io.Combo.Input(
                    "direction",
                    options=list(DIRECTIONS),
                    default=DRM["direction"],
                    tooltip="vertical: stack deltas by rows (shared input space); horizontal: by columns; "
                    "auto: per layer, the cheaper SVD.",
                ),
                io.Boolean.Input(
                    "conv",
                    default=DRM["conv"],
                    tooltip="Also merge conv kernels as (out, in·k·k) matrices — our extension; off = the paper.",
                ),
                _lam_input(),
                _rules_input(),
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(
        cls,
        base,
        task_vectors,
        drop_rate=DRM["drop_rate"],
        direction=DRM["direction"],
        conv=DRM["conv"],
        lam=LAM,
        weight_rules="",
    ):
        return run_merge(
            base, task_vectors, "drm", weight_rules, drop_rate=drop_rate, direction=direction, conv=conv, lam=lam
        )


NODES = [
    TaskVectorStackNode,
    MergeTaskArithmeticNode,
    MergeTIESNode,
    MergeDARENode,
    MergeLocalizeAndStitchNode,
    MergeDRMNode,
]
