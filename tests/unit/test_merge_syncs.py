"""CPU-visible proxies for GPU speed: host synchronisations and kernel launches per merge, counted with torch.profiler.

CI has no GPU, but what makes a merge slow on one is visible on the CPU too: every read of a device value by
the host (``.item()``, ``bool(t)``, ``.tolist()``, boolean-mask indexing → ``nonzero``, ``bincount`` …) stalls
the device, and every kernel launch costs a few microseconds. These tests run the accelerator code path
(``merging.device.batched_kernels``) on CPU tensors and check that neither count grows with the number of
keys: a per-key synchronisation or a per-key kernel cannot come back unnoticed. They also check that the
accelerator path gives exactly the CPU path's results.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diffusion_merge.merging import device as devices
from diffusion_merge.merging.merge import iter_merged, merge_task_vectors

# Ops that make a CUDA host wait for the device (or copy host data to it, which waits for the stream too).
SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), bool(), float(), int() of a tensor
    "aten::nonzero",  # boolean-mask indexing, torch.where(cond)
    "aten::bincount",  # reads the input's min and max back on CUDA
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::lift_fresh",  # torch.tensor(python data): a host-to-device copy on CUDA
}
# Ops that launch no kernel (views and metadata).
METADATA_OPS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::expand",
    "aten::transpose",
    "aten::t",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::flatten",
    "aten::unflatten",
    "aten::detach",
    "aten::detach_",
    "detach_",
    "aten::alias",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::to",
    "aten::view_as",
    "aten::flip",
    "aten::narrow",
    "aten::permute",
    "aten::mT",
    "aten::split",
    "aten::unbind",
    "aten::contiguous",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::set_",
    "aten::resize_",
}


class Counts:
    def __init__(self, events: Counter, every: Counter, tolists: int):
        self.events, self.every, self.tolists = events, every, tolists

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.events.items() if name in SYNC_OPS) + self.tolists

    @property
    def kernels(self) -> int:
        """Top-level aten ops that do work (nested ops of one call are counted once, at the top)."""
        return sum(n for name, n in self.events.items() if name.startswith("aten::") and name not in METADATA_OPS)


def counted(function) -> Counts:
    """Run ``function`` under the profiler; count its ops and its ``Tensor.tolist`` calls (invisible to it)."""
    tolists = 0
    original = torch.Tensor.tolist

    def counting_tolist(self):
        nonlocal tolists
        tolists += 1
        return original(self)

    torch.Tensor.tolist = counting_tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            function()
    finally:
        torch.Tensor.tolist = original
    top_level = Counter()
    every = Counter()
    for event in prof.events():
        every[event.name] += 1
        if event.cpu_parent is None:
            top_level[event.name] += 1
    syncs = Counter({name: n for name, n in every.items() if name in SYNC_OPS})
    return Counts(Counter({**top_level, **syncs}), every, tolists)


@pytest.fixture
def accelerator_path(monkeypatch):
    """Run the code paths meant for accelerators on the CPU."""
    monkeypatch.setattr(devices, "batched_kernels", lambda device: True)


def small_keys(count: int, tasks: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` keys of a few hundred entries each (like a model's biases and norms), fp16 like resident τ."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64,), (8, 24), (4, 4, 3, 3), (96,)]
    return [
        {f"blocks.{i}.w": (torch.randn(shapes[i % 4], generator=g) * (1 + i % 5)).half() for i in range(count)}
        for _ in range(tasks)
    ]


CASES = [
    ("weighted", {"weights": [0.5, 0.3, 0.2]}),
    ("ties", {"k": 0.2}),
    ("ties", {"k": 0.2, "topk_scope": "per_tensor"}),
    ("dare", {"p": 0.9, "seed": 1}),
    ("dare", {"p": 0.5, "sign": "mass"}),
    ("las", {"k": 0.2}),
]


def drained(tvs, method, **params):
    """The merge as the GPU benchmark runs it: every key produced, nothing copied out."""
    return lambda: [None for _ in iter_merged(tvs, method, device="cpu", **params)]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_syncs_and_kernels_per_merge_do_not_grow_with_the_number_of_keys(accelerator_path, method, params):
    few = counted(drained(small_keys(16), method, **params))
    many = counted(drained(small_keys(256), method, **params))
    # 240 more keys, all in the same single chunk: no per-key synchronisation, no per-key kernel
    assert many.syncs == few.syncs, (few.events, many.events)
    assert many.syncs <= 4
    assert many.kernels - few.kernels <= 8, (few.events, many.events)


@pytest.mark.parametrize(("method", "params"), CASES)
def test_syncs_grow_at_most_by_one_per_chunk(accelerator_path, method, params):
    tvs = small_keys(64)
    one = counted(drained(tvs, method, **params))
    chunked = counted(drained(tvs, method, chunk_numel=2000, **params))
    chunks = 64 * 160 // 2000 + 2  # about 160 entries per key
    assert chunked.syncs - one.syncs <= chunks, (one.events, chunked.events)


@pytest.mark.parametrize(("method", "params"), CASES)
def test_the_accelerator_path_gives_the_cpu_paths_results(monkeypatch, method, params):
    tvs = small_keys(40)
    cpu = merge_task_vectors(tvs, method, device="cpu", chunk_numel=3000, **params)
    monkeypatch.setattr(devices, "batched_kernels", lambda device: True)
    batched = merge_task_vectors(tvs, method, device="cpu", chunk_numel=3000, **params)
    for key in cpu:
        if method == "weighted":  # accumulated row by row (fused multiply-adds) instead of scaled, then summed
            torch.testing.assert_close(batched[key], cpu[key], msg=key)
        else:
            assert torch.equal(cpu[key], batched[key]), key


def small_matrices(count: int, tasks: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 8), (8, 20), (16, 16), (6, 30)]
    return [
        {f"blocks.{i}.attn.weight": torch.randn(shapes[i % 4], generator=g).half() for i in range(count)}
        for _ in range(tasks)
    ]


@pytest.mark.parametrize("direction", ["vertical", "auto"])
def test_drm_reads_back_nothing_per_weight_but_eighs_convergence_check(accelerator_path, direction):
    few = counted(drained(small_matrices(8), "drm", direction=direction))
    many = counted(drained(small_matrices(40), "drm", direction=direction))
    assert many.every["aten::_linalg_check_errors"] - few.every["aten::_linalg_check_errors"] == 32
    assert many.syncs - few.syncs == 32, (few.events, many.events)


DRM_SHAPES = {
    "diffusion_model.input_blocks.1.0.in_layers.2.weight": (6, 4, 3, 3),
    "diffusion_model.input_blocks.1.0.in_layers.2.bias": (6,),
    "diffusion_model.middle_block.1.proj_in.weight": (12, 5),
    "diffusion_model.output_blocks.2.1.ff.net.2.weight": (7, 16),
    "diffusion_model.out.2.weight": (9, 9),
}
DRM_CASES = [
    {"direction": "vertical"},
    {"direction": "horizontal", "drop_rate": 0.5, "weights": [1.0, 0.5, 2.0]},
    {"direction": "auto", "nonlinear_drop_rate": 0.3, "sign": "count"},
    {"conv": True, "drop_rate": 0.0},
]


@pytest.mark.parametrize("params", DRM_CASES)
def test_drm_on_the_accelerator_path_matches_the_cpu_svd(monkeypatch, params):
    """The Gram-matrix SVD in float64 against LAPACK's fp32 SVD: same ranks and trims, so results within fp32
    SVD accuracy (the fp32 SVD is the less accurate of the two)."""
    g = torch.Generator().manual_seed(0)
    tvs = [{key: torch.randn(shape, generator=g) * scale for key, shape in DRM_SHAPES.items()} for scale in (1, 0.3, 2)]
    tvs[1]["diffusion_model.middle_block.1.proj_in.weight"].zero_()  # an inactive model on one weight
    cpu = merge_task_vectors(tvs, "drm", device="cpu", **params)
    monkeypatch.setattr(devices, "batched_kernels", lambda device: True)
    batched = merge_task_vectors(tvs, "drm", device="cpu", **params)
    for key in cpu:
        # an fp32 SVD's error scales with the matrix's norm, not with each entry: entries near zero get the
        # absolute share (LAPACK's kernels, and so the last bits, differ between CPUs)
        scale = max(1.0, cpu[key].abs().max().item())
        torch.testing.assert_close(batched[key], cpu[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize(("method", "params"), CASES)
def test_the_accelerator_path_names_a_non_finite_delta(accelerator_path, method, params):
    tvs = [{key: value.float() for key, value in tv.items()} for tv in small_keys(20)]
    tvs[2]["blocks.13.w"][1] = float("nan")
    with pytest.raises(ValueError, match=r"task vector 3: key 'blocks\.13\.w' has NaN/Inf"):
        merge_task_vectors(tvs, method, device="cpu", chunk_numel=700, **params)


@pytest.mark.parametrize(("method", "params"), [*CASES, ("drm", {"direction": "auto"})])
def test_reading_verdicts_one_chunk_late_changes_nothing(monkeypatch, method, params):
    """On CUDA chunk i is handed out after chunk i+1 is queued (two output buffers); same keys, same values."""
    tvs = small_keys(30)
    direct = [(key, delta.clone()) for key, delta in iter_merged(tvs, method, device="cpu", chunk_numel=900, **params)]
    monkeypatch.setattr(devices, "runs_ahead", lambda device: True)
    lagged = [(key, delta.clone()) for key, delta in iter_merged(tvs, method, device="cpu", chunk_numel=900, **params)]
    assert [key for key, _ in lagged] == [key for key, _ in direct] == list(tvs[0])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(direct, lagged, strict=True))


def test_drm_on_the_accelerator_path_keeps_unchanged_layers_and_single_models_exact(accelerator_path):
    g = torch.Generator().manual_seed(3)
    tvs = [{key: torch.randn(shape, generator=g) for key, shape in DRM_SHAPES.items()} for _ in range(3)]
    linear = "diffusion_model.middle_block.1.proj_in.weight"
    for tv in tvs:
        tv[linear] = torch.zeros_like(tv[linear])
    merged = merge_task_vectors(tvs, "drm", direction="auto", device="cpu")
    assert torch.count_nonzero(merged[linear]) == 0
    single = merge_task_vectors(tvs[:1], "drm", drop_rate=0.0, direction="vertical", device="cpu")
    for key, value in tvs[0].items():
        torch.testing.assert_close(single[key], value, rtol=1e-4, atol=1e-5, msg=key)
