"""The streaming k-th largest magnitude (radix select) is exact: it equals torch.topk on the concatenation."""

from __future__ import annotations

import pytest
import torch

from diffusion_merge.merging import topk
from diffusion_merge.merging.chunks import Scratch
from diffusion_merge.merging.topk import kth_largest_in_segments, kth_largest_magnitude


def chunked(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Three tasks split over chunks of very different sizes and scales (as keys of a model are)."""
    g = torch.Generator().manual_seed(seed)
    sizes_and_scales = ((1000, 1.0), (5000, 0.01), (7, 100.0), (3000, 1e-6))
    return [(torch.randn(3, n, generator=g) * scale).to(dtype).float() for n, scale in sizes_and_scales]


def streamed(chunks: list[torch.Tensor], ranks: list[int]) -> torch.Tensor:
    return kth_largest_magnitude(lambda: (c.clone() for c in chunks), ranks, torch.device("cpu"))


def reference(chunks: list[torch.Tensor], ranks: list[int]) -> torch.Tensor:
    whole = torch.cat(chunks, dim=1).abs()
    return torch.stack([torch.topk(row, rank).values[-1] for row, rank in zip(whole, ranks, strict=True)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 2, 10, 777, 4321, 9007])
def test_streaming_kth_magnitude_equals_topk_on_the_concatenation(dtype, rank):
    chunks = chunked(0, dtype)
    assert torch.equal(streamed(chunks, [rank] * 3), reference(chunks, [rank] * 3))


def test_each_task_gets_its_own_rank():
    chunks = chunked(1)
    ranks = [1, 500, 9007]
    assert torch.equal(streamed(chunks, ranks), reference(chunks, ranks))


def test_ties_and_zeros_resolve_to_the_shared_value():
    values = torch.tensor([[0.0, 0.5, 0.5, 0.5, -0.5, 0.25, 0.0, 2.0]] * 2)
    chunks = [values[:, :3], values[:, 3:]]
    for rank in range(1, 9):
        assert torch.equal(streamed(chunks, [rank, rank]), reference(chunks, [rank, rank]))


def test_the_chunks_are_read_twice_only_when_low_bits_matter():
    reads = {"fp16": 0, "fp32": 0}

    def counting(name, chunks):
        def passes():
            reads[name] += 1
            return (c.clone() for c in chunks)

        return passes

    kth_largest_magnitude(counting("fp16", chunked(2, torch.float16)), [100] * 3, torch.device("cpu"))
    kth_largest_magnitude(counting("fp32", chunked(2)), [100] * 3, torch.device("cpu"))
    assert reads == {"fp16": 1, "fp32": 2}


def test_counts_that_could_overflow_int32_are_moved_to_int64_on_the_way(monkeypatch):
    """Pass 1 counts in int32 and adds them to int64 totals before they could overflow (a whole model's
    entries in one bin would): with a tiny limit, every chunk is moved over and nothing is lost."""
    monkeypatch.setattr(topk, "_INT32_MAX", 3000)
    chunks = chunked(3)
    for ranks in ([1, 2, 3], [777, 4321, 9007]):
        assert torch.equal(streamed(chunks, ranks), reference(chunks, ranks))


def test_a_rank_beyond_the_entries_is_refused():
    with pytest.raises(ValueError, match="outside"):
        streamed([torch.ones(2, 4)], [5, 1])


def segments(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Three rows of a few keys of very different sizes and scales; zeros, ties and fp16 values included."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for index, (size, scale) in enumerate(((300, 1.0), (7, 1e-6), (1, 3.0), (2000, 100.0), (64, 0.01))):
        part = torch.randn(3, size, generator=g) * scale
        if index == 3:
            part = part.round()  # many ties
        if index == 4:
            part[:, :40] = 0.0
        parts.append(part.half().float() if seed % 2 else part)
    values = torch.cat(parts, dim=1)
    ids = torch.repeat_interleave(
        torch.arange(len(parts), dtype=torch.int32), torch.tensor([p.shape[1] for p in parts])
    )
    return values, ids, parts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_segmented_selection_equals_topk_per_segment(seed):
    values, ids, parts = segments(seed)
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randint(1, p.shape[1] + 1, (3,), generator=g) for p in parts], dim=1)
    before = values.clone()
    got = kth_largest_in_segments(values, ids, ranks, Scratch(torch.device("cpu")), low_digit_needed=seed % 2 == 0)
    expected = torch.stack(
        [
            torch.stack([torch.topk(p[r].abs(), int(ranks[r, s])).values[-1] for r in range(3)])
            for s, p in enumerate(parts)
        ],
        dim=1,
    )
    assert torch.equal(got, expected)
    assert torch.equal(values, before)
