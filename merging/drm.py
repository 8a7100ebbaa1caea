"""Decom-Renorm-Merge (DRM, Chaichana et al. 2025, arXiv 2505.23117) for one weight matrix.

papers.md §4.1: stack the N deltas of a 2-D weight, take one joint SVD, renormalise each model's block of
the basis, trim jointly by magnitude, elect signs and take the disjoint mean of the per-model coordinates,
and map the merged coordinates back through the shared basis. Parameters that are not 2-D weights take the
TIES-like branch in :mod:`merging.merge`. Deviations from the official code (README, "Conventions"):

* a model whose delta of this weight is exactly zero (a layer a LoRA never touched) is left out of the SVD
  — exactly what the SVD of the full stack would give in exact arithmetic, where its basis block is zero —
  and every renormalisation divides by a guarded norm, so no NaN can appear;
* the SVD path is used at every drop rate (official averages raw deltas at drop rate 0, ignoring the
  coefficients and the sign election); per-model coefficients are always honoured;
* a sign sum of exactly zero elects + (see :func:`merging.consensus.elect_signs`).
"""

from __future__ import annotations

import contextlib
import math
import re

import torch

from .chunks import Scratch
from .consensus import disjoint_mean, weighted_sum
from .sparsify import RANK_RULES, trim_is_identity
from .topk import kth_largest_magnitude_dense

DIRECTIONS = ("vertical", "horizontal", "auto")
RANK_CUTOFF = 0.01
"""Components with singular value ≤ 1% of the largest are dropped (fixed in the official code)."""

_EXCLUDED = re.compile(r"(embed_tokens|lm_head|token_embedding|position_embedding)")


def is_linear(key: str, shape: tuple[int, ...], conv: bool) -> bool:
    """Whether DRM's SVD branch merges this key: 2-D ``…weight`` tensors, and conv kernels when ``conv``.

    Like the official ``.*weight.*`` rule without embeddings / output heads. Conv kernels (3-D to 5-D) are
    read as (out, in·k·k) matrices only with ``conv=True`` — an extension neither the paper nor its code
    defines (papers.md §4.4 pitfall 4).
    """
    if "weight" not in key.rsplit(".", 1)[-1] or _EXCLUDED.search(key) or math.prod(shape) == 0:
        return False
    return len(shape) == 2 or (conv and 3 <= len(shape) <= 5)


def transposes(direction: str, rows: int, cols: int) -> bool:
    """Whether to run the horizontal variant (DRM-H) for a (rows × cols) weight.

    "auto" picks vertical (shared row space, basis in ℝ^cols) when cols ≤ rows, else horizontal: the
    orientation whose SVD is cheaper, sharing the basis on the weight's smaller side.
    """
    if direction == "auto":
        return cols > rows
    return direction == "horizontal"


def merge_matrix(
    deltas: torch.Tensor,
    *,
    keep: float,
    sign: str | None,
    weights: torch.Tensor | None,
    horizontal: bool,
    scratch: Scratch,
) -> torch.Tensor:
    """The merged (rows × cols) delta of N stacked deltas (N, rows, cols); DRM-V, or DRM-H if ``horizontal``.

    DRM-H on Δᵢ is DRM-V on Δᵢᵀ (the blocks of Vᵀ with unit rows are the blocks of V with unit columns),
    so one implementation serves both.
    """
    active = (deltas.flatten(1).abs().amax(dim=1) > 0).tolist()
    merged = torch.zeros(deltas.shape[1:], dtype=torch.float32, device=deltas.device)
    if not any(active):
        return merged
    index = torch.tensor([i for i, on in enumerate(active) if on], device=deltas.device)
    stack = deltas.index_select(0, index)
    if weights is not None:
        weights = weights.index_select(0, index)
    if horizontal:
        stack = stack.transpose(1, 2)
    result = _merge_vertical(stack, keep=keep, sign=sign, weights=weights, scratch=scratch)
    return merged.copy_(result.T if horizontal else result)


def _merge_vertical(
    stack: torch.Tensor, *, keep: float, sign: str | None, weights: torch.Tensor | None, scratch: Scratch
) -> torch.Tensor:
    """DRM-V (papers.md §4.1 steps 1–9) on the active models' deltas (N, rows, cols)."""
    tasks, rows, cols = stack.shape
    left, singular, right = torch.linalg.svd(stack.reshape(tasks * rows, cols), full_matrices=False)
    rank = int((singular > RANK_CUTOFF * singular[0]).sum())
    blocks = left[:, :rank].reshape(tasks, rows, rank)
    coordinates = blocks * singular[:rank]
    keep_mask = _joint_trim_mask(blocks, keep)
    coordinates = coordinates.mul_(keep_mask).reshape(tasks, rows * rank)
    out = torch.empty(rows * rank, dtype=torch.float32, device=stack.device)
    if sign is None:
        merged = weighted_sum(coordinates, weights, out)
    else:
        merged = disjoint_mean(coordinates, sign, out, scratch, weights_after_election=weights)
    with _ieee_fp32_matmul():
        return merged.view(rows, rank) @ right[:rank]


def _joint_trim_mask(blocks: torch.Tensor, keep: float) -> torch.Tensor:
    """1/0 mask keeping the top ``keep`` fraction of |Ũ| over all models' renormalised blocks at once.

    Ũᵢ = Uᵢ / νᵢ with νᵢ the column norms of block i (steps 4–5); a zero column stays zero instead of
    becoming NaN. The coordinates Ũᵢ·diag(S⊙νᵢ) equal Uᵢ·diag(S), so only the mask depends on νᵢ.
    """
    rule = RANK_RULES["drm"]
    if trim_is_identity(rule, keep, blocks.numel()):
        return torch.ones_like(blocks)
    norms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)
    normalised = (blocks / torch.where(norms > 0, norms, torch.ones_like(norms))).reshape(1, -1)
    rank = rule.rank(keep, normalised.shape[1])
    threshold = kth_largest_magnitude_dense(normalised, rank)
    return (normalised.abs() >= threshold).reshape(blocks.shape).to(blocks.dtype)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Full fp32 matmuls even where the host (e.g. ComfyUI) enabled TF32, whose 10-bit mantissa would
    make the reconstruction M·Vᵀ visibly lossy."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
