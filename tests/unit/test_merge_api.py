"""The merge entry points: validation, streaming, progress and cancellation, per-key weights, inputs."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from diffusion_merge import merging
from diffusion_merge.merging import chunks
from diffusion_merge.merging.merge import MergeCancelled, iter_merged, merge_task_vectors
from diffusion_merge.merging.methods import METHODS, resolve_merge

SHAPES = {
    "diffusion_model.input_blocks.1.0.in_layers.2.weight": (6, 4, 3, 3),
    "diffusion_model.input_blocks.1.0.in_layers.2.bias": (6,),
    "diffusion_model.middle_block.1.proj_in.weight": (12, 5),
    "diffusion_model.output_blocks.2.1.ff.net.2.weight": (7, 16),
}
METHOD_CASES = [
    ("weighted", {"weights": [0.1, 0.2, 0.5]}),
    ("ties", {"k": 0.3}),
    ("ties", {"k": 0.3, "topk_scope": "per_tensor"}),
    ("dare", {"p": 0.5, "seed": 2}),
    ("dare", {"p": 0.5, "sign": "count"}),
    ("las", {"k": 0.2}),
    ("drm", {"direction": "auto", "nonlinear_drop_rate": 0.3}),
]


def task_vectors(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{key: torch.randn(shape, generator=g) for key, shape in SHAPES.items()} for _ in range(count)]


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"k": 0.0}, r"k must be in \(0, 1\]"),
        ("ties", {"k": 1.5}, r"k must be in \(0, 1\]"),
        ("las", {"k": -0.1}, r"k must be in \(0, 1\]"),
        ("dare", {"p": 1.0}, r"p must be in \[0, 1\)"),
        ("dare", {"p": -0.2}, r"p must be in \[0, 1\)"),
        ("drm", {"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ("drm", {"direction": "diagonal"}, "direction must be one of"),
        ("ties", {"sign": "median"}, "sign must be one of"),
        ("ties", {"p": 0.5}, "method 'ties' has no parameter"),
        ("weighted", {"weights": [1.0, 2.0]}, "weights must be a list of 3 numbers"),
        ("weighted", {"weights": [1.0, float("nan"), 1.0]}, "weight 2 must be a finite number"),
        ("dare", {"seed": 1.5}, "seed must be an integer"),
        ("weighted", {"key_weights": [("(", 2.0)]}, "not a valid regular expression"),
        ("weighted", {"block_weights": {"encoder": 2.0}}, "unknown block 'encoder'"),
        ("median", {}, "unknown merge method 'median'"),
    ],
)
def test_bad_parameters_raise_a_clear_value_error(method, params, message):
    with pytest.raises(ValueError, match=message):
        iter_merged(task_vectors(), method, device="cpu", **params)


def test_an_empty_set_of_task_vectors_is_refused():
    with pytest.raises(ValueError, match="no task vectors"):
        merge_task_vectors([], "weighted")


def test_mismatched_shapes_name_the_key_and_both_shapes():
    tvs = task_vectors(2)
    key = "diffusion_model.middle_block.1.proj_in.weight"
    tvs[1][key] = torch.zeros(5, 12)
    with pytest.raises(ValueError, match=r"task vector 2: key '.*proj_in.weight' is \(5, 12\) but .* \(12, 5\)"):
        iter_merged(tvs, "ties", device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(("method", "params"), METHOD_CASES)
def test_a_non_finite_delta_raises_naming_the_task_and_key(bad, method, params):
    tvs = task_vectors(3)
    tvs[1]["diffusion_model.input_blocks.1.0.in_layers.2.bias"][3] = bad
    with pytest.raises(ValueError, match=r"task vector 2: key '.*in_layers\.2\.bias' has NaN/Inf"):
        merge_task_vectors(tvs, method, device="cpu", chunk_numel=40, **params)


def test_validation_happens_before_the_first_key_is_requested():
    with pytest.raises(ValueError):
        iter_merged(task_vectors(), "ties", k=2.0)  # no next(): still raises


# -- streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "params"), METHOD_CASES)
def test_chunking_does_not_change_any_result(method, params):
    tvs = task_vectors()
    whole = merge_task_vectors(tvs, method, device="cpu", **params)
    chunked = merge_task_vectors(tvs, method, device="cpu", chunk_numel=40, **params)
    assert list(whole) == list(SHAPES)
    for key, shape in SHAPES.items():
        assert whole[key].shape == shape and whole[key].dtype == torch.float32
        assert torch.equal(whole[key], chunked[key]), key


@pytest.mark.parametrize(("method", "params"), METHOD_CASES)
def test_inputs_are_left_untouched(method, params):
    tvs = task_vectors()
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    merge_task_vectors(tvs, method, device="cpu", chunk_numel=40, **params)
    for tv, copy in zip(tvs, before, strict=True):
        for key in tv:
            assert torch.equal(tv[key], copy[key])


def test_iter_merged_yields_each_key_once_and_reports_progress_to_the_end():
    calls = []
    keys = [
        key
        for key, _ in iter_merged(
            task_vectors(), "ties", device="cpu", chunk_numel=60, progress=lambda *a: calls.append(a)
        )
    ]
    assert keys == list(SHAPES)
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1]
    assert calls[-1][1] == 3 * len(SHAPES)  # two threshold passes + the merge pass


def test_iter_merged_streams_a_key_before_reading_the_whole_model():
    class Reads(dict):
        """A lazy file mapping: tells shapes without reading, records the tensors read."""

        seen: list[str]

        def shape_of(self, key):
            return tuple(super().__getitem__(key).shape)

        def __getitem__(self, key):
            self.seen.append(key)
            return super().__getitem__(key)

    source = Reads(task_vectors(1)[0])
    source.seen = []
    merged = iter_merged([source], "weighted", device="cpu", chunk_numel=60)
    first_key, _ = next(merged)
    assert first_key == next(iter(SHAPES))
    assert set(source.seen) < set(SHAPES)


def test_should_stop_cancels_the_merge():
    merged = iter_merged(task_vectors(), "weighted", device="cpu", chunk_numel=60, should_stop=lambda: True)
    with pytest.raises(MergeCancelled):
        next(merged)


def test_a_raising_stop_hook_propagates_its_own_exception():
    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted

    with pytest.raises(Interrupted):
        merge_task_vectors(task_vectors(), "ties", device="cpu", should_stop=interrupt)


def test_task_vector_objects_merge_like_dicts():
    tvs = task_vectors()
    lazy = [merging.TaskVector(((1.0, merging.StoredDeltas(tv)),)) for tv in tvs]
    for method, params in METHOD_CASES:
        expected = merge_task_vectors(tvs, method, device="cpu", **params)
        actual = merge_task_vectors(lazy, method, device="cpu", **params)
        for key in SHAPES:
            assert torch.equal(actual[key], expected[key]), (method, key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_inputs_are_upcast_per_key(dtype):
    halves = [{k: v.to(dtype) for k, v in tv.items()} for tv in task_vectors()]
    as_float = [{k: v.float() for k, v in tv.items()} for tv in halves]
    for method, params in METHOD_CASES:
        a = merge_task_vectors(halves, method, device="cpu", **params)
        b = merge_task_vectors(as_float, method, device="cpu", **params)
        assert all(torch.equal(a[k], b[k]) for k in SHAPES), method


# -- per-key weights ----------------------------------------------------------------------------------


def test_key_weights_and_block_presets_multiply_matching_keys():
    tvs = task_vectors()
    plain = merge_task_vectors(tvs, "weighted", lam=0.5, device="cpu")
    weighted = merge_task_vectors(
        tvs,
        "weighted",
        lam=0.5,
        key_weights=[(r"\.bias$", 0.0), (r"proj_in", 3.0)],
        block_weights={"input": 2.0, "middle": 0.5, "output": 4.0},
        device="cpu",
    )
    factors = {
        "diffusion_model.input_blocks.1.0.in_layers.2.weight": 2.0,
        "diffusion_model.input_blocks.1.0.in_layers.2.bias": 0.0,
        "diffusion_model.middle_block.1.proj_in.weight": 1.5,
        "diffusion_model.output_blocks.2.1.ff.net.2.weight": 4.0,
    }
    for key, factor in factors.items():
        torch.testing.assert_close(weighted[key], plain[key] * factor)


def test_flux_block_presets_match_double_and_single_blocks():
    tvs = [{"double_blocks.0.img_attn.qkv.weight": torch.ones(2), "single_blocks.3.linear1.weight": torch.ones(2)}]
    merged = merge_task_vectors(tvs, "weighted", block_weights={"double": 0.5, "single": 2.0}, device="cpu")
    assert merged["double_blocks.0.img_attn.qkv.weight"].tolist() == [0.5, 0.5]
    assert merged["single_blocks.3.linear1.weight"].tolist() == [2.0, 2.0]


# -- registry -----------------------------------------------------------------------------------------


def test_every_registered_method_merges_and_records_a_json_recipe():
    for name in METHODS:
        merged = merge_task_vectors(task_vectors(), name, device="cpu")
        assert all(torch.isfinite(v).all() for v in merged.values())
        recipe = resolve_merge(name, 3, key_weights=[("x", 2.0)]).recipe()
        assert json.loads(json.dumps(recipe))["method"] == name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("method", "params"), METHOD_CASES)
def test_cuda_and_cpu_give_the_same_merge(method, params):
    tvs = task_vectors()
    cpu = merge_task_vectors(tvs, method, device="cpu", **params)
    cuda = merge_task_vectors(tvs, method, device="cuda", **params)
    for key in SHAPES:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "params"), METHOD_CASES)
def test_cpu_blocks_that_cut_keys_change_no_result(monkeypatch, tmp_path, method, params):
    """The CPU merges in cache-sized blocks, computing a key piece by piece: every kind of source (dict, stored
    deltas, a difference of two files) must give what whole chunks give."""
    tvs = task_vectors()
    g = torch.Generator().manual_seed(5)
    base = {key: torch.randn(shape, generator=g).half() for key, shape in SHAPES.items()}
    finetuned = {key: (base[key].float() + tvs[2][key]).half() for key in SHAPES}
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    safetensors.torch.save_file(finetuned, tmp_path / "ft.safetensors")
    files = merging.task_vector_from_files(tmp_path / "ft.safetensors", tmp_path / "base.safetensors")
    sources = [tvs[0], merging.TaskVector(((1.0, merging.StoredDeltas(tvs[1])),)), files]
    whole = merge_task_vectors(sources, method, device="cpu", **params)
    monkeypatch.setattr(chunks, "CPU_BLOCK_NUMEL", 3 * 7)  # 7 columns: most keys span several blocks
    for chunk_numel in (40, 1000):
        blocked = merge_task_vectors(sources, method, device="cpu", chunk_numel=chunk_numel, **params)
        for key in SHAPES:
            assert torch.equal(whole[key], blocked[key]), (chunk_numel, key)


@pytest.mark.parametrize(("method", "params"), METHOD_CASES[:3])
def test_cpu_blocks_change_no_byte_of_a_merged_checkpoint(monkeypatch, tmp_path, method, params):
    g = torch.Generator().manual_seed(6)
    base = {"model." + key: torch.randn(shape, generator=g).half() for key, shape in SHAPES.items()}
    paths = []
    for index in range(3):
        finetuned = {
            key: (value.float() + 0.1 * torch.randn(value.shape, generator=g)).half() for key, value in base.items()
        }
        paths.append(tmp_path / f"ft{index}.safetensors")
        safetensors.torch.save_file(finetuned, paths[-1])
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    whole = merging.merge_checkpoint_files(
        tmp_path / "base.safetensors", paths, tmp_path / "whole.safetensors", method, **params
    )
    monkeypatch.setattr(chunks, "CPU_BLOCK_NUMEL", 3 * 7)
    blocked = merging.merge_checkpoint_files(
        tmp_path / "base.safetensors", paths, tmp_path / "blocked.safetensors", method, **params
    )
    assert whole.read_bytes() == blocked.read_bytes()


def test_weights_that_require_grad_merge_like_plain_tensors():
    """Models' own parameters may require grad (a MODEL's weights outside inference mode): the merge reads them
    without recording anything and gives the same result as for plain tensors."""
    base = {
        key: torch.randn(shape, generator=torch.Generator().manual_seed(i))
        for i, (key, shape) in enumerate(SHAPES.items())
    }
    finetunes = [{key: value + delta[key] for key, value in base.items()} for delta in task_vectors()]
    plain = [merging.task_vector(ft, base) for ft in finetunes]
    as_parameters = [  # lazy differences, read key by key as a merge of MODELs reads them
        merging.extract_task_vector(
            {k: torch.nn.Parameter(v.clone()) for k, v in ft.items()},
            {k: torch.nn.Parameter(v.clone()) for k, v in base.items()},
        )
        for ft in finetunes
    ]
    for method, params in METHOD_CASES:
        expected = merge_task_vectors(plain, method, device="cpu", **params)
        with torch.enable_grad():
            actual = merge_task_vectors(as_parameters, method, device="cpu", **params)
        for key in SHAPES:
            assert not actual[key].requires_grad
            assert torch.equal(actual[key], expected[key]), (method, key)
