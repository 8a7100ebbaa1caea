"""Consensus: sign election and the ways N sparsified task vectors become one delta.

* weighted sum — task arithmetic, Σ wᵢτᵢ (Ilharco et al. 2023, arXiv 2212.04089; DeMe's merge);
* disjoint mean — TIES steps 2–3 (Yadav et al. 2023, arXiv 2306.01708 §3): elect a sign per entry, then
  average the entries that are non-zero and agree with it; also DARE-TIES and DRM's coordinate merge
  (arXiv 2505.23117, algorithm steps 7–8);
* stitch — Localize-and-Stitch (arXiv 2408.13656): the average over the tasks whose mask selected the entry.

All work on a stacked (N tasks, entries) fp32 tensor, overwrite it, and write the result into ``out``;
temporaries come from a :class:`~merging.chunks.Scratch` (buffers ``"work"``, ``"signs"``, ``"count"``).
"""

from __future__ import annotations

import torch

from .chunks import Scratch

SIGN_RULES = ("mass", "count")


def scale_rows_(stack: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Multiply task row i by wᵢ (nothing to do without weights)."""
    if weights is not None:
        stack.mul_(weights.view(-1, 1))


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ·xᵢ per entry."""
    scale_rows_(stack, weights)
    return torch.sum(stack, dim=0, out=out)


def elect_signs(stack: torch.Tensor, rule: str, scratch: Scratch) -> torch.Tensor:
    """±1 per entry: the sign of Σᵢ xᵢ ("mass", TIES) or of Σᵢ sign(xᵢ) ("count", mergekit's option).

    A sum of exactly zero elects +1 (mergekit's rule; official TIES uses the majority sign of the whole
    vector there — they differ only where non-zero values cancel exactly).
    """
    signs = scratch.get("signs", tuple(stack.shape[1:]))
    if rule == "mass":
        torch.sum(stack, dim=0, out=signs)
    else:
        torch.sum(torch.sign(stack, out=scratch.get("work", tuple(stack.shape))), dim=0, out=signs)
    return signs.ge_(0).mul_(2).sub_(1)


def disjoint_mean(
    stack: torch.Tensor,
    rule: str,
    out: torch.Tensor,
    scratch: Scratch,
    weights_after_election: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES' disjoint merge: mean over tasks i with xᵢ ≠ 0 and sign(xᵢ) = the elected sign.

    ``weights_after_election`` (DRM's order: elect on the unscaled coordinates, then scale by cᵢ, then
    average) multiplies the agreeing entries after the election; TIES-style weights are applied to
    ``stack`` by the caller before calling this. An entry no task agrees on is 0.
    """
    signs = elect_signs(stack, rule, scratch)
    stack.mul_(signs).clamp_(min=0)
    count = scratch.get("count", tuple(out.shape))
    torch.sum(torch.sign(stack, out=scratch.get("work", tuple(stack.shape))), dim=0, out=count)
    scale_rows_(stack, weights_after_election)
    torch.sum(stack, dim=0, out=out)
    return out.mul_(signs).div_(count.clamp_(min=1))


def stitch(
    stack: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor, scratch: Scratch
) -> torch.Tensor:
    """Localize-and-Stitch: Σᵢ γᵢ·wᵢ·τᵢ / Σᵢ γᵢ where at least one mask γᵢ selects the entry, else 0.

    ``stack`` holds τᵢ already multiplied by its 1/0 mask γᵢ (``mask``). Entries one task selected get its
    full value; overlaps get the average of the tasks that selected them.
    """
    count = torch.sum(mask, dim=0, out=scratch.get("count", tuple(out.shape)))
    return weighted_sum(stack, weights, out).div_(count.clamp_(min=1))
