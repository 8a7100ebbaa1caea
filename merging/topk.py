"""Exact k-th largest magnitudes by counting (radix select): over a whole streamed model, or per segment.

TIES trims each task vector to its top-k magnitudes over the *whole flattened model* (TIES, arXiv 2306.01708 §3) and
Localize-and-Stitch localises with a global top-k (arXiv 2408.13656; ``docs/methods.md``, Merging note 1).
Concatenating an SDXL- or Flux-size task vector to call ``torch.topk`` would need tens of GB, so the threshold is
found by counting instead:

* for non-negative IEEE-754 float32 values, the bit pattern read as an int32 is monotonic in the value;
* pass 1 histograms the high 19 bits of |x| (8 exponent + 11 mantissa bits: 2¹⁹ bins per task) over every
  chunk, which identifies the bin holding the k-th largest value and its rank inside that bin;
* pass 2 histograms the low 12 bits of the entries in that bin only, which gives the exact bit pattern.

Pass 2 is skipped for a task none of whose entries has non-zero low 12 bits, e.g. deltas stored in
fp16/bf16, whose values are determined by the high bits alone. The result is exact: it equals
``torch.topk(cat(|τ|), k).values[-1]`` bit for bit (tests/unit/test_merge_topk.py).

Per-key trims (TIES ``per_tensor``) and DRM's joint trim select inside a tensor that is already resident;
:func:`kth_largest_in_segments` does that for many segments at once with three 10–11-bit digit passes.

Everything here runs without host synchronisation except where a decision must reach Python (whether
pass 2 is needed, once per merge): histograms are ``index_add_`` calls (``torch.bincount`` reads the
input's min and max back to the host on every call, ``row[mask]`` must learn its output size), and the
selected bins and ranks stay on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .chunks import Scratch

HIGH_SHIFT = 12
HIGH_BINS = 1 << (31 - HIGH_SHIFT)
LOW_BINS = 1 << HIGH_SHIFT
LOW_MASK = LOW_BINS - 1
NONFINITE_BIN = 0x7F800000 >> HIGH_SHIFT
"""High bins from here on hold |x| = inf and NaN (exponent bits all ones)."""
_SIGN_CLEAR = 0x7FFFFFFF
_INT32_MAX = 2**31 - 1

SEGMENT_DIGITS = ((20, 11), (10, 10), (0, 10))
"""(shift, width) of the digits :func:`kth_largest_in_segments` selects on, most significant first."""


class NonFiniteMagnitudes(ValueError):
    """Some counted entry is NaN or ±inf; the caller knows which inputs those were and names them."""


def magnitude_bits_(stack: torch.Tensor) -> torch.Tensor:
    """|x| of an fp32 tensor as int32 bit patterns, computed in place (``stack``'s storage is reused)."""
    return stack.view(torch.int32).bitwise_and_(_SIGN_CLEAR)


def kth_largest_magnitude(
    passes: Callable[[], Iterable[torch.Tensor]], ranks: Sequence[int], device: torch.device
) -> torch.Tensor:
    """The ``ranks[i]``-th largest |x| of task i over all chunks, exactly; shape (N,), fp32.

    ``passes()`` must return a fresh iterable over the same (N, entries) fp32 chunks each time it is called
    (once or twice); the chunks are overwritten here. ``ranks`` are 1-based (1 = the largest). Raises
    :class:`NonFiniteMagnitudes` when a chunk holds NaN/inf (checked once, after pass 1).
    """
    rank_tensor = torch.as_tensor(list(ranks), dtype=torch.int64, device=device)
    scratch = Scratch(device)
    high, inexact = _high_histogram(passes(), len(ranks), scratch)
    # The one host synchronisation of pass 1: counts, non-finite entries and whether pass 2 is needed.
    facts = torch.stack([high.sum(dim=1), high[:, NONFINITE_BIN:].sum(dim=1), inexact.long()]).tolist()
    totals, nonfinite, needs_low = facts
    if any(nonfinite):
        raise NonFiniteMagnitudes(f"{sum(nonfinite)} NaN/inf entries")
    if any(rank < 1 or rank > total for rank, total in zip(ranks, totals, strict=True)):
        raise ValueError(f"ranks {list(ranks)} are outside 1..{totals}")
    bins, rank_in_bin = _select(high, rank_tensor)
    low = torch.zeros_like(bins)
    if any(needs_low):
        low_hist = _low_histogram(passes(), bins, scratch)
        low = torch.where(inexact, _select(low_hist, rank_in_bin)[0], low)
    bits = (bins << HIGH_SHIFT) | low
    return bits.to(torch.int32).view(torch.float32)


def kth_largest_magnitude_dense(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th largest |x| of each row of a (N, d) tensor (``torch.kthvalue``: fast on the CPU)."""
    return torch.kthvalue(values.abs(), values.shape[1] - rank + 1, dim=1).values


def kth_largest_in_segments(
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    ranks: torch.Tensor,
    scratch: Scratch,
    *,
    low_digit_needed: bool = True,
) -> torch.Tensor:
    """The ``ranks[r, s]``-th largest |x| among the entries of row r in segment s, for all r and s at once.

    ``values`` is (R, M) fp32 (left unchanged), ``segment_ids`` (M,) int32 gives each column's segment in
    0..S−1, ``ranks`` is (R, S) int64 on the device (1-based, each within its segment's size). Returns
    (R, S) fp32. Exact like :func:`kth_largest_magnitude`, in a fixed number of kernel launches whatever S
    (no per-segment loop, no host synchronisation): each digit pass histograms (row, segment, digit) with
    one ``index_add_``, counting only the entries whose higher digits match the prefix selected so far.
    ``low_digit_needed=False`` skips the last digit (bits 9..0), which is zero for values that came from
    fp16 or bf16.
    """
    rows, columns = values.shape
    segments = ranks.shape[1]
    device = values.device
    bits = scratch.get("segment_bits", (rows, columns), torch.int32)
    torch.bitwise_and(values.view(torch.int32), _SIGN_CLEAR, out=bits)
    # Row r, segment s owns the bins starting at (r·S + s)·2^width; per-segment counts fit in int32.
    row_offsets = torch.arange(0, rows * segments, segments, device=device, dtype=torch.int32).view(-1, 1)
    row_segment = torch.add(
        segment_ids.view(1, -1), row_offsets, out=scratch.get("segment_index", (rows, columns), torch.int32)
    )
    digit = scratch.get("segment_digit", (rows, columns), torch.int32)
    index = scratch.get("segment_bin", (rows, columns), torch.int32)
    match = scratch.get("segment_match", (rows, columns), torch.int32)
    prefix = torch.zeros(rows * segments, dtype=torch.int64, device=device)
    remaining = ranks.reshape(-1)
    digits = SEGMENT_DIGITS if low_digit_needed else SEGMENT_DIGITS[:-1]
    for level, (shift, width) in enumerate(digits):
        torch.bitwise_right_shift(bits, shift, out=digit)
        torch.bitwise_left_shift(row_segment, width, out=index)
        if level:
            index.add_(digit.bitwise_and_((1 << width) - 1))
            # Count only the entries whose higher bits equal the prefix chosen for their (row, segment):
            # every entry adds 1 or 0, so the additions stay spread over the digit's bins.
            chosen = prefix.to(torch.int32).index_select(0, row_segment.view(-1)).view(rows, columns)
            torch.eq(torch.bitwise_right_shift(bits, shift + width, out=digit), chosen, out=match)
            counted = match.view(-1)
        else:
            index.add_(digit)
            counted = _ones(index.numel(), match)
        hist = torch.zeros(rows * segments << width, dtype=torch.int32, device=device)
        hist.index_add_(0, index.view(-1), counted)
        chosen_bin, remaining = _select(hist.view(rows * segments, 1 << width), remaining)
        prefix = (prefix << width) | chosen_bin
    if not low_digit_needed:
        prefix = prefix << SEGMENT_DIGITS[-1][1]
    return prefix.view(rows, segments).to(torch.int32).view(torch.float32)


def _ones(count: int, like: torch.Tensor) -> torch.Tensor:
    """``count`` ones of ``like``'s dtype without allocating them (an expanded scalar)."""
    return torch.ones(1, dtype=like.dtype, device=like.device).expand(count)


def _high_histogram(stacks: Iterable[torch.Tensor], tasks: int, scratch: Scratch):
    """Pass 1: (N, 2¹⁹) counts of |x|'s high bits, and per task whether any entry has low bits set."""
    hist = torch.zeros(tasks, HIGH_BINS, dtype=torch.int64, device=scratch.device)
    # Counted in int32 (on the CPU ~25 % faster than int64 counters), added to the int64 totals before any
    # int32 count could overflow.
    counts = torch.zeros(tasks, HIGH_BINS, dtype=torch.int32, device=scratch.device)
    counted = 0
    inexact = torch.zeros(tasks, dtype=torch.bool, device=scratch.device)
    for stack in stacks:
        if counted + stack.shape[1] > _INT32_MAX:
            hist += counts
            counts.zero_()
            counted = 0
        counted += stack.shape[1]
        bits = magnitude_bits_(stack)
        work = scratch.get("bits", tuple(bits.shape), torch.int32)
        torch.bitwise_right_shift(bits, HIGH_SHIFT, out=work)
        ones = _ones(bits.shape[1], counts)
        for row, high in zip(counts, work, strict=True):
            row.index_add_(0, high, ones)
        # amax, not any(): an int32 max is a plain vectorised reduction (any() on int32 is ~15× slower on CPUs)
        inexact |= torch.bitwise_and(bits, LOW_MASK, out=work).amax(dim=1) > 0
    return hist.add_(counts), inexact


def _low_histogram(stacks: Iterable[torch.Tensor], bins: torch.Tensor, scratch: Scratch):
    """Pass 2: (N, 2¹²) counts of the low bits of the entries that fall in each task's selected bin.

    Every entry adds its match (1 or 0) to the bin of its low bits: no boolean-mask indexing (which would
    read the match count back to the host), and the additions spread over all 2¹² bins.
    """
    hist = torch.zeros(len(bins), LOW_BINS, dtype=torch.int64, device=scratch.device)
    for stack in stacks:
        bits = magnitude_bits_(stack)
        high = scratch.get("bits", tuple(bits.shape), torch.int32)
        torch.bitwise_right_shift(bits, HIGH_SHIFT, out=high)
        in_bin = torch.eq(high, bins.view(-1, 1).to(torch.int32)).to(torch.int64)
        low = torch.bitwise_and(bits, LOW_MASK, out=high)
        for row, low_row, match in zip(hist, low, in_bin, strict=True):
            row.index_add_(0, low_row, match)
    return hist


def _select(hist: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: the bin holding the ``rank``-th largest entry, and that entry's rank inside the bin."""
    from_top = hist.flip(1).cumsum(1)
    position = torch.searchsorted(from_top, ranks.reshape(-1, 1).contiguous()).clamp(max=hist.shape[1] - 1)
    bins = hist.shape[1] - 1 - position
    above = from_top.gather(1, position) - hist.gather(1, bins)
    return bins.squeeze(1), ranks - above.squeeze(1)
