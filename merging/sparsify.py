"""Sparsifiers: which entries of each task vector survive before the consensus step.

* magnitude trims (TIES trim, Localize-and-Stitch dataless masks, DRM's trims), each with the rank and
  comparison its official code uses — see :data:`RANK_RULES`;
* random drops (DARE), drawn from a counter-based hash so the mask of an entry depends only on
  (seed, task index, key, position): the same on CPU and CUDA, whatever the key order or chunking.

All functions work in place on a stacked (N tasks, entries) fp32 chunk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .chunks import Chunk, Scratch
from .topk import kth_largest_magnitude_dense


@dataclass(frozen=True)
class RankRule:
    """Which k-th largest |x| is the threshold for keeping a fraction ``keep`` of d entries, and how to compare.

    ``rank(keep, d)`` is 1-based (1 = the largest). ``strict`` keeps |x| > threshold, else |x| ≥ threshold
    (ties at the threshold kept).
    """

    rank: Callable[[float, int], int]
    strict: bool


RANK_RULES: dict[str, RankRule] = {
    # TIES official: kthvalue(|τ|, d − ⌊k·d⌋), keep ≥ → the (⌊k·d⌋+1)-th largest, ties included.
    "ties": RankRule(rank=lambda keep, d: min(d, int(keep * d) + 1), strict=False),
    # LaS official: threshold = the ⌊k·d⌋-th largest |τ|, keep strictly greater (papers.md §3.1, §3.4).
    "las": RankRule(rank=lambda keep, d: min(d, max(1, int(keep * d))), strict=True),
    # DRM official: keeps round(n·(1 − drop_rate)) + 1 entries, i.e. ≥ the (round(n·keep)+1)-th largest.
    "drm": RankRule(rank=lambda keep, d: min(d, round(keep * d) + 1), strict=False),
}


def trim_is_identity(rule: RankRule, keep: float, d: int) -> bool:
    """True when the trim keeps every entry (a non-strict threshold at the smallest magnitude)."""
    return not rule.strict and rule.rank(keep, d) >= d


def apply_threshold_(stack: torch.Tensor, thresholds: torch.Tensor, strict: bool, mask: torch.Tensor) -> None:
    """Zero the entries of each task row whose |x| is below its threshold; ``mask`` gets the 1/0 keep mask."""
    torch.abs(stack, out=mask)
    if strict:
        mask.gt_(thresholds.view(-1, 1))
    else:
        mask.ge_(thresholds.view(-1, 1))
    stack.mul_(mask)


def trim_per_tensor_(stack: torch.Tensor, chunk: Chunk, keep: float, rule: RankRule, mask: torch.Tensor) -> None:
    """Magnitude trim with one threshold per task *and key* (what sd-mecha and mergekit call TIES)."""
    for segment in chunk.segments:
        span = segment.span
        rank = rule.rank(keep, segment.numel)
        thresholds = kth_largest_magnitude_dense(stack[:, span], rank)
        apply_threshold_(stack[:, span], thresholds, rule.strict, mask[:, span])


_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


def entry_seed(seed: int, task: int, key: str) -> int:
    """A 32-bit seed for one task's entries of one key, derived from (seed, task, key) alone."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def uniform_bits_(counter: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Hash int64 counters (values < 2³²) in place into uniformly distributed 32-bit values.

    Two rounds of the xorshift-multiply mixer "hash32" (multiplier 0x45d9f3b). The multiplier is < 2²⁷ so
    every product stays below 2⁵⁹: no integer overflow, identical results on every device.
    """
    for _ in range(2):
        torch.bitwise_right_shift(counter, 16, out=work)
        counter.bitwise_xor_(work).mul_(_MIX).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(counter, 16, out=work)
    return counter.bitwise_xor_(work)


def drop_random_(stack: torch.Tensor, chunk: Chunk, p: float, seed: int, scratch: Scratch) -> None:
    """DARE's drop (Yu et al. 2024, Eq. 1): zero each entry independently with probability ``p``.

    The rescale by 1/(1 − p) is left to the caller (it commutes with every combine step). Entry j of key K
    in task i is dropped iff hash((entry_seed(seed, i, K) + j) mod 2³²) < p·2³².
    """
    if p == 0.0:
        return
    largest = max(segment.numel for segment in chunk.segments)
    positions = scratch.get("positions", (largest,), torch.int64)
    torch.arange(largest, out=positions)
    counter = scratch.get("counter", (chunk.numel,), torch.int64)
    work = scratch.get("hash", (chunk.numel,), torch.int64)
    drop_below = round(p * 2**32)
    for task, row in enumerate(stack):
        for segment in chunk.segments:
            key_seed = entry_seed(seed, task, segment.key)
            torch.add(positions[: segment.numel], key_seed, out=counter[segment.span])
        uniform_bits_(counter.bitwise_and_(_MASK32), work)
        row.mul_(counter >= drop_below)
