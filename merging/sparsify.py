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

from .chunks import Chunk, ChunkTables, Scratch
from .topk import kth_largest_in_segments, kth_largest_magnitude_dense


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
    # LaS official: threshold = the ⌊k·d⌋-th largest |τ|, keep strictly greater (docs/methods.md, Merging note 2).
    "las": RankRule(rank=lambda keep, d: min(d, max(1, int(keep * d))), strict=True),
    # DRM official: keeps round(n·(1 − drop_rate)) + 1 entries, i.e. ≥ the (round(n·keep)+1)-th largest.
    "drm": RankRule(rank=lambda keep, d: min(d, round(keep * d) + 1), strict=False),
}


def trim_is_identity(rule: RankRule, keep: float, d: int) -> bool:
    """True when the trim keeps every entry (a non-strict threshold at the smallest magnitude)."""
    return not rule.strict and rule.rank(keep, d) >= d


def apply_threshold_(stack: torch.Tensor, thresholds: torch.Tensor, strict: bool, mask: torch.Tensor) -> None:
    """Zero the entries of each task row whose |x| is below its threshold; ``mask`` gets the 1/0 keep mask.

    ``thresholds`` is one value per task (N,) or one per entry (N, entries).
    """
    if thresholds.dim() == 1:
        thresholds = thresholds.view(-1, 1)
    torch.abs(stack, out=mask)
    if strict:
        mask.gt_(thresholds)
    else:
        mask.ge_(thresholds)
    stack.mul_(mask)


def trim_per_tensor_(
    stack: torch.Tensor,
    chunk: Chunk,
    keep: float,
    rule: RankRule,
    mask: torch.Tensor,
    tables: ChunkTables | None = None,
    scratch: Scratch | None = None,
) -> None:
    """Magnitude trim with one threshold per task *and key* (what sd-mecha and mergekit call TIES).

    Without ``tables``, key by key with ``torch.kthvalue`` (fastest on the CPU). With them, every key of the
    chunk at once by counting (:func:`merging.topk.kth_largest_in_segments`): a fixed number of kernels per
    chunk, where CUDA's kthvalue gives each row to one thread block. Both are exact, so the results agree.
    """
    if tables is None:
        for segment in chunk.segments:
            span = segment.span
            rank = rule.rank(keep, segment.numel)
            thresholds = kth_largest_magnitude_dense(stack[:, span], rank)
            apply_threshold_(stack[:, span], thresholds, rule.strict, mask[:, span])
        return
    if scratch is None:
        raise ValueError("trim_per_tensor_ with tables needs a scratch")
    every_rank = tables.table(("ranks", rule, keep), lambda: _segment_ranks(tables, rule, keep), torch.int64)
    ranks = every_rank[tables.segments(chunk)]
    segment_ids = tables.segment_ids(chunk, scratch)
    thresholds = kth_largest_in_segments(stack, segment_ids, ranks.expand(stack.shape[0], -1), scratch)
    apply_threshold_(stack, thresholds.index_select(1, segment_ids), rule.strict, mask)


def _segment_ranks(tables: ChunkTables, rule: RankRule, keep: float) -> list[int]:
    return [rule.rank(keep, segment.numel) for chunk in tables.chunks for segment in chunk.segments]


_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


def entry_seed(seed: int, task: int, key: str) -> int:
    """A 32-bit seed for one task's entries of one key, derived from (seed, task, key) alone."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def uniform_bits_(counter: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Hash counters (values < 2³²) in place into uniformly distributed 32-bit values.

    Two rounds of the xorshift-multiply mixer "hash32" (multiplier 0x45d9f3b). On int64 counters the
    multiplier is < 2²⁷ so every product stays below 2⁵⁹: no integer overflow, identical results on every
    device. On int32 counters (the bit patterns of the same uint32 values, half the memory traffic) the
    shifts are made logical by masking and the products wrap modulo 2³², which is the same hash bit for bit.
    """
    if counter.dtype == torch.int32:
        for _ in range(2):
            torch.bitwise_right_shift(counter, 16, out=work).bitwise_and_(0xFFFF)
            counter.bitwise_xor_(work).mul_(_MIX)
        torch.bitwise_right_shift(counter, 16, out=work).bitwise_and_(0xFFFF)
        return counter.bitwise_xor_(work)
    for _ in range(2):
        torch.bitwise_right_shift(counter, 16, out=work)
        counter.bitwise_xor_(work).mul_(_MIX).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(counter, 16, out=work)
    return counter.bitwise_xor_(work)


def drop_random_(
    stack: torch.Tensor,
    chunk: Chunk,
    p: float,
    seed: int,
    scratch: Scratch,
    tables: ChunkTables | None = None,
) -> None:
    """DARE's drop (Yu et al. 2024, Eq. 1): zero each entry independently with probability ``p``.

    The rescale by 1/(1 − p) is left to the caller (it commutes with every combine step). Entry j of key K
    in task i is dropped iff hash((entry_seed(seed, i, K) + j) mod 2³²) < p·2³².

    The counters of a whole chunk are one running sum: 1 at every entry, and at each key's first entry the
    jump from the previous key's counters (from a per-(task, key) table that ``tables`` holds on the device;
    a chunk's own when none is given) — three kernels per chunk whatever its number of keys. They are hashed
    as int32.
    """
    if p == 0.0:
        return
    tables = tables or ChunkTables([chunk], stack.device)
    tasks = stack.shape[0]
    every_jump = tables.table(("dare", seed, tasks), lambda: dare_jumps(tables.chunks, seed, tasks), torch.int32)
    span = tables.segments(chunk)
    work = scratch.get("hash", tuple(stack.shape), torch.int32)
    work.fill_(1).index_copy_(1, tables.starts[span], every_jump[:, span])
    # int32 running sums wrap modulo 2³², like the counters themselves
    counter = torch.cumsum(work, dim=1, dtype=torch.int32, out=scratch.get("counter", tuple(stack.shape), torch.int32))
    hashed = uniform_bits_(counter, work)
    drop_below = round(p * 2**32)
    if drop_below >= 2**32:
        stack.zero_()
        return
    # unsigned hashed ≥ drop_below, compared as signed int32 with both sides shifted by 2³¹
    keep = torch.ge(hashed.bitwise_xor_(-(2**31)), drop_below - 2**31, out=work)
    stack.mul_(keep)


def dare_jumps(chunks, seed: int, tasks: int) -> list[list[int]]:
    """(tasks, segments): what each key's first entry adds to the running sum of DARE counters in its chunk.

    Key K's counters are entry_seed(seed, task, K) + j for its entries j (mod 2³²). The chunk's first key
    starts at its seed; every later key at 1 + its seed − (the previous key's seed + its size − 1), i.e.
    1 + the difference of the two keys' counter offsets (seed − start in the chunk). int32 bit patterns.
    """
    rows = []
    for task in range(tasks):
        row = []
        for chunk in chunks:
            previous = None
            for segment in chunk.segments:
                offset = entry_seed(seed, task, segment.key) - segment.offset
                value = offset + segment.offset if previous is None else 1 + offset - previous
                previous = offset
                value &= _MASK32
                row.append(value - (1 << 32) if value >= 1 << 31 else value)
        rows.append(row)
    return rows
