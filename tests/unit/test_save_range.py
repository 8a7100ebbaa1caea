"""Saves refuse values their storage dtype cannot hold (and NaN/Inf), naming the tensor; clamping is opt-in."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch

import diffusion_merge.merging as merging
from diffusion_merge.merging.io import SafetensorsFile, check_storable, write_safetensors


def write_one(path, value: float, dtype: torch.dtype, **kw):
    tensor = torch.tensor([1.0, value, -2.0])
    return write_safetensors(path, [("w", dtype, (3,))], [("w", tensor)], **kw)


@pytest.mark.parametrize(
    ("dtype", "value", "limit"),
    [
        (torch.float16, 1e5, r"fp16 value \(65504\)"),
        (torch.float8_e4m3fn, 1e3, r"fp8_e4m3fn value \(448\)"),
        (torch.float8_e5m2, 1e5, r"fp8_e5m2 value \(57344\)"),
    ],
)
def test_values_beyond_the_dtype_are_refused_and_nothing_is_written(tmp_path, dtype, value, limit):
    with pytest.raises(ValueError, match=rf"tensor 'w' \(1 of 1\) has values up to .* beyond the largest .*{limit}"):
        write_one(tmp_path / "out.safetensors", value, dtype)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused_even_with_clamp(tmp_path, dtype, value):
    for overflow in ("error", "clamp"):
        with pytest.raises(ValueError, match=r"tensor 'w' .* holds NaN/Inf values"):
            write_one(tmp_path / "out.safetensors", value, dtype, overflow=overflow)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("dtype", "largest"), [(torch.float16, 65504.0), (torch.float8_e4m3fn, 448.0)])
def test_clamp_stores_the_largest_finite_value_and_says_so(tmp_path, caplog, dtype, largest):
    with caplog.at_level(logging.WARNING):
        path = write_one(tmp_path / "out.safetensors", 1e6, dtype, overflow="clamp")
    assert SafetensorsFile(path)["w"].float().tolist() == [1.0, largest, -2.0]
    assert "clamped" in caplog.text and "'w'" in caplog.text


def test_values_that_fit_are_written_unchanged(tmp_path):
    path = write_one(tmp_path / "out.safetensors", 65504.0, torch.float16)
    assert SafetensorsFile(path)["w"].tolist() == [1.0, 65504.0, -2.0]
    with pytest.raises(ValueError, match="overflow must be one of"):
        write_one(tmp_path / "other.safetensors", 1.0, torch.float16, overflow="wrap")


@pytest.fixture
def pair(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = {f"model.diffusion_model.b{i}.weight": torch.randn(8, 8, generator=generator) for i in range(4)}
    finetuned = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    finetuned["first_stage_model.x"] = base["first_stage_model.x"] = torch.ones(2)
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    safetensors.torch.save_file(finetuned, tmp_path / "ft.safetensors")
    return tmp_path / "ft.safetensors", tmp_path / "base.safetensors"


def test_save_task_vector_refuses_a_delta_beyond_fp16(tmp_path, pair):
    """Seven × Scale(10) saved as fp16 used to write Inf that the pack's own loaders then refused."""
    vector = merging.task_vector_from_files(*pair).scale(1e7)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        ValueError, match=r"tensor 'diffusion_model\.b0\.diff' \(1 of 4\) has values up to .*fp16 value"
    ):
        merging.save_task_vector(vector, out / "tau.safetensors", dtype="fp16")
    assert list(out.iterdir()) == []
    merging.save_task_vector(vector, out / "tau32.safetensors", dtype="fp32")  # fp32 holds it
    clamped = merging.save_task_vector(vector, out / "clamped.safetensors", dtype="fp16", overflow="clamp")
    assert float(SafetensorsFile(clamped)["diffusion_model.b0.diff"].float().abs().max()) == 65504.0


def test_merge_checkpoint_files_refuses_an_overflowing_merge(tmp_path, pair):
    finetuned, base = pair
    target = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match=r"tensor 'model\.diffusion_model\.b0\.weight' .* beyond the largest"):
        merging.merge_checkpoint_files(base, [finetuned], target, "weighted", lam=1e7, dtype="fp16")
    assert not target.exists()
    merging.merge_checkpoint_files(base, [finetuned], target, "weighted", lam=1e7, dtype="fp16", overflow="clamp")
    assert target.exists()


def test_in_memory_tensors_with_nan_are_all_named_before_writing():
    tensors = {"a": torch.zeros(2), "b": torch.tensor([float("nan")]), "c": torch.tensor([float("inf")])}
    with pytest.raises(ValueError, match=r"2 of the 3 tensors of the LoRA hold NaN/Inf values: 'b', 'c'"):
        check_storable(tensors, "the LoRA")
    check_storable({"a": torch.zeros(2), "i": torch.tensor([3])}, "the LoRA")
