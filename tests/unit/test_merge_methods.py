"""Each merge method against a straightforward implementation of its paper's equations, written here.

The references work on the whole model flattened into one vector per task (as the papers describe it);
the library streams chunks and thresholds. Small tensors: a 4-D conv, 2-D linears and a 1-D bias.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from diffusion_merge.merging.merge import merge_task_vectors

KEYS_AND_SHAPES = {
    "diffusion_model.input_blocks.1.0.in_layers.2.weight": (6, 4, 3, 3),
    "diffusion_model.input_blocks.1.0.in_layers.2.bias": (6,),
    "diffusion_model.middle_block.1.proj_in.weight": (12, 5),
    "diffusion_model.output_blocks.2.1.ff.net.2.weight": (7, 16),
    "diffusion_model.out.2.weight": (9, 9),
}


def task_vectors(count: int, seed: int = 0, scales=None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * count
    return [
        {key: torch.randn(shape, generator=g) * scale for key, shape in KEYS_AND_SHAPES.items()} for scale in scales
    ]


def flat(tvs, keys=None) -> torch.Tensor:
    keys = keys or list(tvs[0])
    return torch.stack([torch.cat([tv[key].reshape(-1) for key in keys]) for tv in tvs])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, tensor in like.items():
        out[key] = vector[offset : offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
    return out


def assert_dicts_close(actual, expected, **tolerance):
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key, **tolerance)


def official_trim(matrix: torch.Tensor, k: float) -> torch.Tensor:
    """TIES' released ``topk_values_mask``: keep |x| ≥ the (d − ⌊k·d⌋)-th smallest |x| of each row."""
    d = matrix.shape[1]
    kth = matrix.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    return matrix * (matrix.abs() >= kth)


def disjoint_merge(trimmed: torch.Tensor, by: str = "mass", weights_after=None) -> torch.Tensor:
    """TIES Eq. 2–3: elected sign per entry, mean over the non-zero entries that agree with it."""
    score = trimmed.sum(0) if by == "mass" else torch.sign(trimmed).sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    values = trimmed if weights_after is None else trimmed * weights_after[:, None]
    return (values * agree).sum(0) / agree.sum(0).clamp(min=1)


# -- weighted task arithmetic -------------------------------------------------------------------------


def test_weighted_merge_is_lambda_times_the_weighted_sum_with_deme_weights():
    tvs = task_vectors(4)
    weights, lam = [0.1, 0.1, 0.2, 0.5], 0.8
    merged = merge_task_vectors(tvs, "weighted", weights=weights, lam=lam, device="cpu")
    expected = {k: lam * sum(w * tv[k] for w, tv in zip(weights, tvs, strict=True)) for k in KEYS_AND_SHAPES}
    assert_dicts_close(merged, expected)


def test_a_key_missing_from_a_task_vector_counts_as_zero():
    tvs = task_vectors(2)
    key = "diffusion_model.out.2.weight"
    del tvs[1][key]
    merged = merge_task_vectors(tvs, "weighted", weights=[0.5, 2.0], device="cpu")
    torch.testing.assert_close(merged[key], 0.5 * tvs[0][key])


# -- TIES ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.1, 0.2, 0.5, 0.9])
def test_ties_global_trim_matches_the_paper_over_the_flattened_model(k):
    tvs = task_vectors(3, scales=[1.0, 0.3, 2.0])
    lam = 1.3
    expected = unflat(lam * disjoint_merge(official_trim(flat(tvs), k)), tvs[0])
    assert_dicts_close(merge_task_vectors(tvs, "ties", k=k, lam=lam, device="cpu"), expected)


def test_ties_per_tensor_trim_matches_a_per_key_reference():
    tvs = task_vectors(3)
    trimmed = torch.cat([official_trim(flat(tvs, [key]), 0.3) for key in KEYS_AND_SHAPES], dim=1)
    expected = unflat(disjoint_merge(trimmed), tvs[0])
    merged = merge_task_vectors(tvs, "ties", k=0.3, topk_scope="per_tensor", device="cpu")
    assert_dicts_close(merged, expected)


def test_ties_global_trim_differs_from_per_tensor():
    """A key of tiny deltas loses everything to the global top-k, but keeps its own top-k per tensor."""
    tvs = task_vectors(2)
    quiet = "diffusion_model.input_blocks.1.0.in_layers.2.bias"
    for tv in tvs:
        tv[quiet] = tv[quiet] * 1e-4
    global_merge = merge_task_vectors(tvs, "ties", k=0.2, device="cpu")
    per_tensor = merge_task_vectors(tvs, "ties", k=0.2, topk_scope="per_tensor", device="cpu")
    assert torch.count_nonzero(global_merge[quiet]) == 0
    assert torch.count_nonzero(per_tensor[quiet]) > 0


def test_ties_keeps_entries_tied_with_the_threshold():
    tvs = [{"w": torch.tensor([1.0, 1.0, 1.0, 0.5, 0.1])}]
    merged = merge_task_vectors(tvs, "ties", k=0.2, device="cpu")
    torch.testing.assert_close(merged["w"], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


def test_ties_weights_scale_each_task_before_the_sign_election():
    tvs = task_vectors(3)
    weights = torch.tensor([0.5, -1.0, 2.0])
    expected = unflat(disjoint_merge(official_trim(flat(tvs), 0.3) * weights[:, None]), tvs[0])
    merged = merge_task_vectors(tvs, "ties", k=0.3, weights=weights.tolist(), device="cpu")
    assert_dicts_close(merged, expected)


def test_ties_sign_by_count_elects_the_majority_of_signs():
    tvs = [{"w": torch.tensor([5.0, 1.0])}, {"w": torch.tensor([-1.0, 1.0])}, {"w": torch.tensor([-1.0, -9.0])}]
    by_mass = merge_task_vectors(tvs, "ties", k=1.0, device="cpu")["w"]
    by_count = merge_task_vectors(tvs, "ties", k=1.0, sign="count", device="cpu")["w"]
    torch.testing.assert_close(by_mass, torch.tensor([5.0, -9.0]))
    torch.testing.assert_close(by_count, torch.tensor([-1.0, 1.0]))


# -- DARE ---------------------------------------------------------------------------------------------


def reference_keep_mask(seed: int, task: int, key: str, numel: int, p: float) -> torch.Tensor:
    """The documented DARE mask: keep entry j iff hash32((seed(seed, task, key) + j) mod 2³²) ≥ p·2³²."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=4).digest()
    x = (torch.arange(numel, dtype=torch.int64) + int.from_bytes(digest, "little")) % 2**32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2**32
    x = x ^ (x >> 16)
    return x >= round(p * 2**32)


def reference_dare(tvs, p: float, seed: int, rescale: bool = True) -> torch.Tensor:
    masks = [
        torch.cat([reference_keep_mask(seed, i, key, tv[key].numel(), p) for key in tv]) for i, tv in enumerate(tvs)
    ]
    dropped = flat(tvs) * torch.stack(masks)
    return dropped / (1 - p) if rescale else dropped


def test_dare_drops_entries_with_the_documented_seeded_mask():
    tvs = task_vectors(3)
    weights = [0.5, 1.0, 2.0]
    expected = unflat((reference_dare(tvs, 0.4, 7) * torch.tensor(weights)[:, None]).sum(0), tvs[0])
    merged = merge_task_vectors(tvs, "dare", p=0.4, seed=7, weights=weights, device="cpu")
    assert_dicts_close(merged, expected)


def test_dare_ties_elects_signs_over_the_dropped_and_rescaled_deltas():
    tvs = task_vectors(3)
    expected = unflat(disjoint_merge(reference_dare(tvs, 0.5, 3)), tvs[0])
    merged = merge_task_vectors(tvs, "dare", p=0.5, seed=3, sign="mass", device="cpu")
    assert_dicts_close(merged, expected)


def test_dare_keeps_about_one_minus_p_of_the_entries():
    n, p = 200_000, 0.3
    tvs = [{f"k{i}": torch.ones(n // 4) for i in range(4)}]
    merged = merge_task_vectors(tvs, "dare", p=p, rescale=False, seed=1, device="cpu")
    kept = sum(int(torch.count_nonzero(v)) for v in merged.values()) / n
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5


def test_dare_with_rescale_is_unbiased():
    """E[merged] = τ: the mean error over n entries is within 4 standard errors of 0."""
    g = torch.Generator().manual_seed(5)
    n, p = 200_000, 0.9
    tau = torch.randn(n, generator=g)
    merged = merge_task_vectors([{"w": tau}], "dare", p=p, seed=11, device="cpu")["w"]
    standard_error = (tau.square().sum() * p / (1 - p)).sqrt() / n
    assert abs(float((merged - tau).mean())) < 4 * float(standard_error)


def test_dare_masks_of_different_tasks_are_independent():
    n, p = 100_000, 0.5
    ones = {"w": torch.ones(n)}
    kept = merge_task_vectors([ones, ones], "dare", p=p, rescale=False, weights=[1.0, 2.0], device="cpu")
    both = float((kept["w"] == 3.0).float().mean())
    assert abs(both - (1 - p) ** 2) < 4 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5


def test_dare_results_do_not_depend_on_key_order_or_chunking():
    tvs = task_vectors(2)
    reversed_tvs = [dict(reversed(list(tv.items()))) for tv in tvs]
    merged = merge_task_vectors(tvs, "dare", p=0.6, seed=4, device="cpu")
    reordered = merge_task_vectors(reversed_tvs, "dare", p=0.6, seed=4, device="cpu", chunk_numel=50)
    for key in merged:
        assert torch.equal(merged[key], reordered[key])


def test_dare_seed_changes_the_mask():
    tvs = task_vectors(1)
    a = merge_task_vectors(tvs, "dare", p=0.5, seed=0, device="cpu")
    b = merge_task_vectors(tvs, "dare", p=0.5, seed=1, device="cpu")
    assert any(not torch.equal(a[k], b[k]) for k in a)


# -- Localize-and-Stitch --------------------------------------------------------------------------------


def reference_las(tvs, k: float) -> torch.Tensor:
    """Dataless LaS: γᵢ = |τᵢ| > the ⌊k·d⌋-th largest |τᵢ| (global); θ = Σ γᵢτᵢ / Σ γᵢ where Σ γᵢ > 0."""
    taus = flat(tvs)
    count = max(1, int(k * taus.shape[1]))
    thresholds = torch.topk(taus.abs(), count, dim=1).values[:, -1:]
    masks = (taus.abs() > thresholds).float()
    return (masks * taus).sum(0) / masks.sum(0).clamp(min=1)


@pytest.mark.parametrize("k", [0.05, 0.3, 0.8])
def test_las_stitches_global_top_k_masks_like_the_reference(k):
    tvs = task_vectors(3, scales=[1.0, 0.5, 3.0])
    assert_dicts_close(merge_task_vectors(tvs, "las", k=k, device="cpu"), unflat(reference_las(tvs, k), tvs[0]))


def test_las_averages_overlaps_and_keeps_single_selections_whole():
    a = {"w": torch.tensor([4.0, 3.0, 0.1, 0.2, 0.1, 0.0])}
    b = {"w": torch.tensor([2.0, 0.1, 5.0, 0.2, 0.1, 0.0])}
    # k = 0.5 → threshold = 3rd largest |τ|, strictly exceeded by the top two of each task
    merged = merge_task_vectors([a, b], "las", k=0.5, device="cpu")["w"]
    torch.testing.assert_close(merged, torch.tensor([3.0, 3.0, 5.0, 0.0, 0.0, 0.0]))


def test_las_threshold_is_strict():
    tvs = [{"w": torch.tensor([1.0, 1.0, 0.5, 0.5])}]
    merged = merge_task_vectors(tvs, "las", k=0.5, device="cpu")["w"]
    torch.testing.assert_close(merged, torch.zeros(4))


# -- DRM ------------------------------------------------------------------------------------------------


def reference_drm_matrix(deltas, drop_rate: float, weights=None, horizontal: bool = False) -> torch.Tensor:
    """DRM (arXiv 2505.23117) on one weight: joint SVD, renormalised blocks, joint trim, elect, disjoint mean."""
    if horizontal:
        return reference_drm_matrix([d.T for d in deltas], drop_rate, weights).T
    n, rows = len(deltas), deltas[0].shape[0]
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=0), full_matrices=False)
    r = int((s > 0.01 * s[0]).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks = [u[i * rows : (i + 1) * rows] for i in range(n)]
    norms = [b.norm(dim=0) for b in blocks]
    normalised = torch.stack([b / nu for b, nu in zip(blocks, norms, strict=True)])
    coordinates = torch.stack([nb * (s * nu) for nb, nu in zip(normalised, norms, strict=True)])
    entries = normalised.numel()
    kept = min(entries, round(entries * (1 - drop_rate)) + 1)
    threshold = torch.topk(normalised.abs().flatten(), kept).values[-1]
    coordinates = coordinates * (normalised.abs() >= threshold)
    w = torch.ones(n) if weights is None else torch.tensor(weights)
    merged = disjoint_merge(coordinates.reshape(n, -1), weights_after=w).view(rows, r)
    return merged @ vh


LINEAR = ("diffusion_model.middle_block.1.proj_in.weight", "diffusion_model.output_blocks.2.1.ff.net.2.weight")
OTHER = ("diffusion_model.input_blocks.1.0.in_layers.2.weight", "diffusion_model.input_blocks.1.0.in_layers.2.bias")


@pytest.mark.parametrize("direction", ["vertical", "horizontal", "auto"])
def test_drm_with_drop_rate_zero_and_one_model_reproduces_tau(direction):
    tvs = task_vectors(1)
    merged = merge_task_vectors(tvs, "drm", drop_rate=0.0, direction=direction, device="cpu")
    assert_dicts_close(merged, tvs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_drm_with_drop_rate_zero_is_the_disjoint_mean_of_svd_coordinates(direction):
    tvs = task_vectors(3)
    merged = merge_task_vectors(tvs, "drm", drop_rate=0.0, direction=direction, device="cpu")
    for key in LINEAR:
        expected = reference_drm_matrix([tv[key] for tv in tvs], 0.0, horizontal=direction == "horizontal")
        torch.testing.assert_close(merged[key], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("drop_rate", [0.5, 0.8])
def test_drm_joint_renormalised_trim_matches_the_reference(drop_rate):
    tvs = task_vectors(3, scales=[1.0, 0.2, 5.0])
    weights = [1.0, 0.5, 2.0]
    merged = merge_task_vectors(tvs, "drm", drop_rate=drop_rate, weights=weights, device="cpu")
    for key in LINEAR:
        expected = reference_drm_matrix([tv[key] for tv in tvs], drop_rate, weights)
        torch.testing.assert_close(merged[key], expected, rtol=1e-4, atol=1e-5)


def test_drm_honours_coefficients_at_drop_rate_zero():
    tvs = task_vectors(2)
    plain = merge_task_vectors(tvs, "drm", drop_rate=0.0, device="cpu")
    weighted = merge_task_vectors(tvs, "drm", drop_rate=0.0, weights=[2.0, 0.5], device="cpu")
    for key in LINEAR:
        assert not torch.allclose(plain[key], weighted[key])
        expected = reference_drm_matrix([tv[key] for tv in tvs], 0.0, [2.0, 0.5])
        torch.testing.assert_close(weighted[key], expected, rtol=1e-4, atol=1e-5)


def test_drm_non_linear_parameters_take_the_ties_like_branch():
    tvs = task_vectors(3)
    weights = torch.tensor([1.0, 3.0, 0.5])
    merged = merge_task_vectors(tvs, "drm", weights=weights.tolist(), device="cpu")
    for key in OTHER:
        expected = disjoint_merge(flat(tvs, [key]), weights_after=weights).view(KEYS_AND_SHAPES[key])
        torch.testing.assert_close(merged[key], expected)


def test_drm_conv_option_merges_kernels_as_out_by_in_k_k_matrices():
    tvs = task_vectors(3)
    key = OTHER[0]
    merged = merge_task_vectors(tvs, "drm", conv=True, device="cpu")
    expected = reference_drm_matrix([tv[key].reshape(6, -1) for tv in tvs], 0.8).view(KEYS_AND_SHAPES[key])
    torch.testing.assert_close(merged[key], expected, rtol=1e-4, atol=1e-5)


def test_drm_model_that_leaves_a_layer_unchanged_gives_no_nan():
    tvs = task_vectors(3)
    for tv in tvs[1:]:
        tv[LINEAR[0]] = torch.zeros_like(tv[LINEAR[0]])
    tvs[0][LINEAR[1]] = torch.zeros_like(tvs[0][LINEAR[1]])
    for direction in ("vertical", "horizontal"):
        merged = merge_task_vectors(tvs, "drm", direction=direction, drop_rate=0.0, device="cpu")
        assert all(torch.isfinite(v).all() for v in merged.values())
        torch.testing.assert_close(merged[LINEAR[0]], tvs[0][LINEAR[0]], rtol=1e-4, atol=1e-5)
        expected = reference_drm_matrix([tv[LINEAR[1]] for tv in tvs[1:]], 0.0, horizontal=direction == "horizontal")
        torch.testing.assert_close(merged[LINEAR[1]], expected, rtol=1e-4, atol=1e-5)


def test_drm_layer_no_model_changed_stays_zero():
    tvs = task_vectors(2)
    for tv in tvs:
        tv[LINEAR[0]] = torch.zeros_like(tv[LINEAR[0]])
    merged = merge_task_vectors(tvs, "drm", device="cpu")
    assert torch.count_nonzero(merged[LINEAR[0]]) == 0


def test_ties_global_trim_counts_a_missing_key_as_zeros_of_that_task():
    tvs = task_vectors(2)
    key = "diffusion_model.out.2.weight"
    filled = [dict(tv) for tv in tvs]
    filled[1][key] = torch.zeros_like(tvs[1][key])
    del tvs[1][key]
    expected = unflat(disjoint_merge(official_trim(flat(filled), 0.3)), filled[0])
    assert_dicts_close(merge_task_vectors(tvs, "ties", k=0.3, device="cpu"), expected)


def test_the_int32_dare_hash_is_the_documented_uint32_hash_bit_for_bit():
    from diffusion_merge.merging.sparsify import uniform_bits_

    counters = torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**31 + 12345, 2**32 - 1], dtype=torch.int64)
    counters = torch.cat([counters, torch.randint(0, 2**32, (10_000,), generator=torch.Generator().manual_seed(0))])
    wide = uniform_bits_(counters.clone(), torch.empty_like(counters))
    narrow = counters.clone().sub_((counters >= 2**31).long() << 32).to(torch.int32)
    narrow = uniform_bits_(narrow, torch.empty_like(narrow))
    assert torch.equal(narrow.long() & 0xFFFFFFFF, wide)
