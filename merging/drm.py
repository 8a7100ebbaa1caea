"""Decom-Renorm-Merge (DRM, Chaichana et al. 2025, arXiv 2505.23117) for one weight matrix.

The paper's algorithm (``docs/methods.md``, Merging note 4): stack the N deltas of a 2-D weight, take one
joint SVD, renormalise each model's block of
the basis, trim jointly by magnitude, elect signs and take the disjoint mean of the per-model coordinates,
and map the merged coordinates back through the shared basis. Parameters that are not 2-D weights take the
TIES-like branch in :mod:`merging.merge`. Deviations from the official code (README, "Conventions"):

* a model whose delta of this weight is exactly zero (a layer a LoRA never touched) is left out of the SVD
  — exactly what the SVD of the full stack would give in exact arithmetic, where its basis block is zero —
  and every renormalisation divides by a guarded norm, so no NaN can appear;
* the SVD path is used at every drop rate (official averages raw deltas at drop rate 0, ignoring the
  coefficients and the sign election); per-model coefficients are always honoured;
* a sign sum of exactly zero elects + (see :func:`merging.consensus.elect_signs`), and singular vectors get
  a fixed sign (:func:`_canonical_signs`) so that this choice does not depend on the SVD routine.

On accelerators the SVD comes from the Gram matrix in float64 (:func:`_gram_svd`) and every size is fixed in
advance (:func:`_merge_vertical_on_device`), so a weight costs no host synchronisation beyond ``eigh``'s own.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch

from . import device as devices
from .chunks import Scratch
from .consensus import disjoint_mean, weighted_sum
from .sparsify import RANK_RULES, trim_is_identity
from .topk import kth_largest_in_segments, kth_largest_magnitude_dense

DIRECTIONS = ("vertical", "horizontal", "auto")
RANK_CUTOFF = 0.01
"""Components with singular value ≤ 1% of the largest are dropped (fixed in the official code)."""

_EXCLUDED = re.compile(r"(embed_tokens|lm_head|token_embedding|position_embedding)")


def is_linear(key: str, shape: tuple[int, ...], conv: bool) -> bool:
    """Whether DRM's SVD branch merges this key: 2-D ``…weight`` tensors, and conv kernels when ``conv``.

    Like the official ``.*weight.*`` rule without embeddings / output heads. Conv kernels (3-D to 5-D) are
    read as (out, in·k·k) matrices only with ``conv=True`` — an extension neither the paper nor its code
    defines (docs/methods.md, Merging note 4).
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
    so one implementation serves both. On accelerators (:func:`merging.device.batched_kernels`) the joint
    SVD comes from the Gram matrix (see :func:`_gram_svd`) and nothing is read back to the host but
    ``eigh``'s own convergence check; on the CPU from ``torch.linalg.svd``.
    """
    if devices.batched_kernels(deltas.device):
        stack = deltas.transpose(1, 2) if horizontal else deltas
        active = deltas.flatten(1).abs().amax(dim=1) > 0
        result = _merge_vertical_on_device(stack, active, keep=keep, sign=sign, weights=weights, scratch=scratch)
        return result.T if horizontal else result
    active_models = (deltas.flatten(1).abs().amax(dim=1) > 0).tolist()
    merged = torch.zeros(deltas.shape[1:], dtype=torch.float32, device=deltas.device)
    if not any(active_models):
        return merged
    index = torch.tensor([i for i, on in enumerate(active_models) if on], device=deltas.device)
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
    """DRM-V (arXiv 2505.23117, steps 1–9 of the algorithm) on the active models' deltas (N, rows, cols)."""
    tasks, rows, cols = stack.shape
    left, singular, right = _canonical_signs(*torch.linalg.svd(stack.reshape(tasks * rows, cols), full_matrices=False))
    rank = int((singular > RANK_CUTOFF * singular[0]).sum())
    blocks = left[:, :rank].reshape(tasks, rows, rank)
    keep_mask = _joint_trim_mask(blocks, keep)
    return _combine(blocks, singular[:rank], right[:rank], keep_mask, sign=sign, weights=weights, scratch=scratch)


def _merge_vertical_on_device(
    stack: torch.Tensor,
    active: torch.Tensor,
    *,
    keep: float,
    sign: str | None,
    weights: torch.Tensor | None,
    scratch: Scratch,
) -> torch.Tensor:
    """DRM-V with every size fixed in advance, so that no decision has to reach the host.

    Components past the rank cutoff are zeroed instead of sliced off, and an inactive model's rows of U are
    exactly zero (they are A's zero rows times V), so they contribute nothing to the election, the mean or
    the product with Vᵀ; only the trim's rank must count the real entries (active models × rows × rank),
    which it does on the device.
    """
    tasks, rows, cols = stack.shape
    left, singular, right = _canonical_signs(*_gram_svd(stack.reshape(tasks * rows, cols)))
    kept = singular > RANK_CUTOFF * singular[0]
    blocks = left.reshape(tasks, rows, -1).mul_(kept)
    entries = active.sum() * rows * kept.sum()
    keep_mask = _joint_trim_mask_on_device(blocks, keep, entries, scratch)
    return _combine(blocks, singular, right, keep_mask, sign=sign, weights=weights, scratch=scratch)


def _gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vᵀ) of a tall or wide matrix from the eigendecomposition of its smaller Gram matrix.

    GPU SVDs of tall stacked matrices are slow; ``eigh`` of the (k × k) Gram matrix, k = the smaller side,
    plus two products, is not. The Gram matrix squares the condition number, so it is formed and decomposed
    in float64: components down to DRM's 1 % cutoff (λ down to 10⁻⁴·λ_max) keep ~12 digits. U is always
    recomputed as A·V/S, so a zero row of A (a model that left this weight unchanged) gives an exactly zero
    row of U. Returns fp32 tensors; S descending, components with S = 0 have zero vectors.
    """
    wide = matrix.double()
    tall = wide.shape[0] >= wide.shape[1]
    gram = wide.T @ wide if tall else wide @ wide.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    singular = eigenvalues.flip(0).clamp_(min=0).sqrt_()
    inverse = torch.where(singular > 0, singular.reciprocal(), torch.zeros_like(singular))
    # tall: the eigenvectors are V; wide: they are U, and V = Aᵀ·U/S
    right = eigenvectors.flip(1) if tall else (wide.T @ eigenvectors.flip(1)).mul_(inverse)
    left = (wide @ right).mul_(inverse)
    return left.float(), singular.float(), right.T.float()


def _canonical_signs(
    left: torch.Tensor, singular: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip each pair (uₖ, vₖ) so that vₖ's largest-magnitude entry is positive.

    Singular vectors are defined up to a joint sign, and each SVD routine picks its own. With the sign
    election by mass the merge does not depend on it, but by count an exactly tied vote (+1 − 1) elects +,
    whose meaning flips with the sign: fixing the sign makes every device and LAPACK give the same merge.
    """
    largest = right.abs().argmax(dim=1, keepdim=True)
    flips = torch.where(right.gather(1, largest) < 0, -1.0, 1.0)
    return left * flips.view(1, -1), singular, right * flips


def _combine(
    blocks: torch.Tensor,
    singular: torch.Tensor,
    right: torch.Tensor,
    keep_mask: torch.Tensor,
    *,
    sign: str | None,
    weights: torch.Tensor | None,
    scratch: Scratch,
) -> torch.Tensor:
    """Steps 6–9: trimmed coordinates Uᵢ·diag(S), elect and average, map back through the shared Vᵀ."""
    tasks, rows, rank = blocks.shape
    coordinates = (blocks * singular).mul_(keep_mask).reshape(tasks, rows * rank)
    out = torch.empty(rows * rank, dtype=torch.float32, device=blocks.device)
    if sign is None:
        merged = weighted_sum(coordinates, weights, out)
    else:
        merged = disjoint_mean(coordinates, sign, out, scratch, weights_after_election=weights)
    with _ieee_fp32_matmul():
        return merged.view(rows, rank) @ right


def _renormalised(blocks: torch.Tensor) -> torch.Tensor:
    """Ũᵢ = Uᵢ / νᵢ with νᵢ the column norms of block i (steps 4–5); a zero column stays zero."""
    norms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)
    return blocks / torch.where(norms > 0, norms, torch.ones_like(norms))


def _joint_trim_mask(blocks: torch.Tensor, keep: float) -> torch.Tensor:
    """1/0 mask keeping the top ``keep`` fraction of |Ũ| over all models' renormalised blocks at once.

    The coordinates Ũᵢ·diag(S⊙νᵢ) equal Uᵢ·diag(S), so only the mask depends on νᵢ.
    """
    rule = RANK_RULES["drm"]
    if trim_is_identity(rule, keep, blocks.numel()):
        return torch.ones_like(blocks)
    normalised = _renormalised(blocks).reshape(1, -1)
    rank = rule.rank(keep, normalised.shape[1])
    threshold = kth_largest_magnitude_dense(normalised, rank)
    return (normalised.abs() >= threshold).reshape(blocks.shape).to(blocks.dtype)


def _joint_trim_mask_on_device(
    blocks: torch.Tensor, keep: float, entries: torch.Tensor, scratch: Scratch
) -> torch.Tensor:
    """:func:`_joint_trim_mask` when the number of real entries is known only on the device.

    The zeroed entries (inactive models, components past the cutoff) can only tie with or fall below the
    real ones, so the k-th largest over all entries is the k-th largest over the real ones (k ≤ their count).
    The rank is DRM's rule, min(d, round(keep·d) + 1), in float64 on the device (round half to even, like
    Python's ``round``).
    """
    normalised = _renormalised(blocks).reshape(1, -1)
    rank = torch.minimum(entries, torch.round(entries.double() * keep).long() + 1).clamp_(min=1).view(1, 1)
    segment = scratch.get("drm_segment", (normalised.shape[1],), torch.int32).zero_()
    threshold = kth_largest_in_segments(normalised, segment, rank, scratch)
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
