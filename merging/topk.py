"""Exact k-th largest magnitude per task over a whole model, streamed chunk by chunk (radix select).

TIES trims each task vector to its top-k magnitudes over the *whole flattened model* (TIES paper §3;
``../shared/docs/merging-anchors.md`` (d) 3) and Localize-and-Stitch localises with a global top-k
(papers.md §3.1, §3.4 pitfall 3). Concatenating an SDXL- or Flux-size task vector to call ``torch.topk``
would need tens of GB, so the threshold is found by counting instead:

* for non-negative IEEE-754 float32 values, the bit pattern read as an int32 is monotonic in the value;
* pass 1 histograms the high 19 bits of |x| (8 exponent + 11 mantissa bits: 2¹⁹ bins per task) over every
  chunk, which identifies the bin holding the k-th largest value and its rank inside that bin;
* pass 2 histograms the low 12 bits of the entries in that bin only, which gives the exact bit pattern.

Pass 2 is skipped for a task none of whose entries has non-zero low 12 bits, e.g. deltas stored in
fp16/bf16, whose values are determined by the high bits alone. The result is exact: it equals
``torch.topk(cat(|τ|), k).values[-1]`` bit for bit (tests/unit/test_merge_topk.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .chunks import Scratch

HIGH_SHIFT = 12
HIGH_BINS = 1 << (31 - HIGH_SHIFT)
LOW_BINS = 1 << HIGH_SHIFT
LOW_MASK = LOW_BINS - 1
_SIGN_CLEAR = 0x7FFFFFFF


def magnitude_bits_(stack: torch.Tensor) -> torch.Tensor:
    """|x| of an fp32 tensor as int32 bit patterns, computed in place (``stack``'s storage is reused)."""
    return stack.view(torch.int32).bitwise_and_(_SIGN_CLEAR)


def kth_largest_magnitude(
    passes: Callable[[], Iterable[torch.Tensor]], ranks: Sequence[int], device: torch.device
) -> torch.Tensor:
    """The ``ranks[i]``-th largest |x| of task i over all chunks, exactly; shape (N,), fp32.

    ``passes()`` must return a fresh iterable over the same (N, entries) fp32 chunks each time it is called
    (once or twice); the chunks are overwritten here. ``ranks`` are 1-based (1 = the largest).
    """
    rank_tensor = torch.as_tensor(list(ranks), dtype=torch.int64, device=device)
    scratch = Scratch(device)
    high, inexact = _high_histogram(passes(), len(ranks), scratch)
    totals = high.sum(dim=1)
    if bool((rank_tensor < 1).any()) or bool((rank_tensor > totals).any()):
        raise ValueError(f"ranks {list(ranks)} are outside 1..{totals.tolist()}")
    bins, rank_in_bin = _select(high, rank_tensor)
    low = torch.zeros_like(bins)
    needs_low = inexact.tolist()
    if any(needs_low):
        low_hist = _low_histogram(passes(), bins.tolist(), needs_low, scratch)
        low = torch.where(inexact, _select(low_hist, rank_in_bin)[0], low)
    bits = (bins << HIGH_SHIFT) | low
    return bits.to(torch.int32).view(torch.float32)


def kth_largest_magnitude_dense(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th largest |x| of each row of a (N, d) tensor (per-tensor trims, DRM's basis trim)."""
    return torch.kthvalue(values.abs(), values.shape[1] - rank + 1, dim=1).values


def _high_histogram(stacks: Iterable[torch.Tensor], tasks: int, scratch: Scratch):
    """Pass 1: (N, 2¹⁹) counts of |x|'s high bits, and per task whether any entry has low bits set."""
    hist = torch.zeros(tasks, HIGH_BINS, dtype=torch.int64, device=scratch.device)
    inexact = torch.zeros(tasks, dtype=torch.bool, device=scratch.device)
    for stack in stacks:
        bits = magnitude_bits_(stack)
        work = scratch.get("bits", tuple(bits.shape), torch.int32)
        torch.bitwise_right_shift(bits, HIGH_SHIFT, out=work)
        for row, high in zip(hist, work, strict=True):
            row += torch.bincount(high, minlength=HIGH_BINS)
        inexact |= torch.bitwise_and(bits, LOW_MASK, out=work).any(dim=1)
    return hist, inexact


def _low_histogram(stacks: Iterable[torch.Tensor], bins: list[int], needed: list[bool], scratch: Scratch):
    """Pass 2: (N, 2¹²) counts of the low bits of the entries that fall in each task's selected bin."""
    hist = torch.zeros(len(bins), LOW_BINS, dtype=torch.int64, device=scratch.device)
    for stack in stacks:
        bits = magnitude_bits_(stack)
        work = scratch.get("bits", tuple(bits.shape[1:]), torch.int32)
        for index, (row, bin_index) in enumerate(zip(bits, bins, strict=True)):
            if needed[index]:
                torch.bitwise_right_shift(row, HIGH_SHIFT, out=work)
                in_bin = row[work == bin_index]
                hist[index] += torch.bincount(in_bin.bitwise_and_(LOW_MASK), minlength=LOW_BINS)
    return hist


def _select(hist: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: the bin holding the ``rank``-th largest entry, and that entry's rank inside the bin."""
    from_top = hist.flip(1).cumsum(1)
    position = torch.searchsorted(from_top, ranks.unsqueeze(1)).clamp(max=hist.shape[1] - 1)
    bins = hist.shape[1] - 1 - position
    above = from_top.gather(1, position) - hist.gather(1, bins)
    return bins.squeeze(1), ranks - above.squeeze(1)
