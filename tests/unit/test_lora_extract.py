"""Task vector → LoRA in the library: the factors are the truncated SVD, the file has ComfyUI's LoRA layout,
ranks follow the rule, energy is reported exactly, bad input is refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch

from diffusion_merge import merging
from diffusion_merge.merging.io import SafetensorsFile
from diffusion_merge.merging.lora_extract import (
    LoraExtractionCancelled,
    RankRule,
    extract_lora,
    load_lora,
    low_rank_factors,
)
from diffusion_merge.merging.task_vectors import StoredDeltas, TaskVector

P = "diffusion_model."


def deltas(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        P + "lin.weight": torch.randn(24, 40, generator=g),  # wide
        P + "tall.weight": torch.randn(48, 10, generator=g),  # tall
        P + "conv.weight": torch.randn(12, 6, 3, 3, generator=g),  # 3×3 → LoCon
        P + "conv.bias": torch.randn(12, generator=g),
        P + "proj.weight": torch.randn(16, 8, 1, 1, generator=g),  # 1×1 → linear
        P + "norm.weight": torch.randn(16, generator=g),
        P + "pos_embed": torch.randn(1, 5, 4, generator=g),  # raw parameter
        P + "zero.weight": torch.zeros(7, 9),
    }


def vector(values: dict[str, torch.Tensor]) -> TaskVector:
    return TaskVector(((1.0, StoredDeltas(values)),))


def best_approximation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    matrix = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def stock_lora_delta(file: dict[str, torch.Tensor], module: str, shape) -> torch.Tensor:
    """What ComfyUI's LoRA adapter computes: (alpha / rank) · up.flatten(1) @ down.flatten(1), reshaped."""
    up, down = file[module + ".lora_up.weight"].double(), file[module + ".lora_down.weight"].double()
    alpha = file[module + ".alpha"].item()
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(shape)


@pytest.mark.parametrize("backend", ["gram", "svd", "auto"])
@pytest.mark.parametrize("shape", [(24, 40), (48, 10), (12, 54)])
def test_factors_are_the_truncated_svd(backend, shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    factors = low_rank_factors(matrix, RankRule(rank=5), backend)
    assert factors.up.shape == (shape[0], 5) and factors.down.shape == (5, shape[1])
    torch.testing.assert_close((factors.up @ factors.down).double(), best_approximation(matrix, 5), atol=2e-4, rtol=0)
    singular = torch.linalg.svdvals(matrix.double())
    assert factors.retained / factors.total == pytest.approx(float((singular[:5] ** 2).sum() / (singular**2).sum()))
    assert factors.total == pytest.approx(float(matrix.double().square().sum()))


def test_lowrank_backend_is_close_to_the_optimum():
    g = torch.Generator().manual_seed(2)
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5] + [0.01] * 35)
    q1, _ = torch.linalg.qr(torch.randn(60, 40, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    matrix = (q1 * spectrum) @ q2.T
    factors = low_rank_factors(matrix, RankRule(rank=5), "lowrank")
    assert factors.retained / factors.total == pytest.approx(float((spectrum[:5] ** 2).sum() / (spectrum**2).sum()))


@pytest.mark.parametrize(
    ("energy", "max_rank", "rank"),
    [(0.5, None, 1), (0.8, None, 2), (25 / 30, None, 2), (0.84, None, 3), (1.0, None, 4), (1.0, 2, 2), (0.99, 1, 1)],
)
def test_energy_mode_keeps_the_smallest_rank_reaching_the_fraction(energy, max_rank, rank):
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(9, 4, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(7, 4, generator=g, dtype=torch.float64))
    matrix = ((q1 * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ q2.T).float()  # energies 16 9 4 1
    for backend in ("gram", "svd"):
        factors = low_rank_factors(matrix, RankRule(energy=energy, max_rank=max_rank), backend)
        assert factors.rank == rank, backend
        assert factors.retained / factors.total == pytest.approx((16, 25, 29, 30)[rank - 1] / 30, rel=1e-5)


def test_file_has_comfyui_lora_layout_and_reproduces_the_best_approximation(tmp_path):
    values = deltas()
    report = extract_lora(vector(values), tmp_path / "l.safetensors", rank=3, dtype="fp32", device="cpu")
    file = safetensors.torch.load_file(tmp_path / "l.safetensors")
    for name in ("lin", "tall", "conv", "proj"):
        key = f"{P}{name}.weight"
        torch.testing.assert_close(
            stock_lora_delta(file, P + name, values[key].shape), best_approximation(values[key], 3), atol=2e-5, rtol=0
        )
        assert file[f"{P}{name}.alpha"].item() == 3.0
    assert file[P + "conv.lora_down.weight"].shape == (3, 6, 3, 3)  # LoCon: down is the k×k convolution
    assert file[P + "conv.lora_up.weight"].shape == (12, 3, 1, 1)
    assert file[P + "proj.lora_down.weight"].shape == (3, 8, 1, 1)
    assert torch.equal(file[P + "conv.diff_b"], values[P + "conv.bias"])
    assert torch.equal(file[P + "norm.diff"], values[P + "norm.weight"])
    assert torch.equal(file[P + "pos_embed.diff"], values[P + "pos_embed"])
    assert not any(k.startswith(P + "zero.") for k in file)  # a zero delta adds nothing
    kinds = {k.key.removeprefix(P): k.kind for k in report.keys}
    assert kinds == {
        "lin.weight": "lora",
        "tall.weight": "lora",
        "conv.weight": "locon",
        "conv.bias": "diff",
        "proj.weight": "lora",
        "norm.weight": "diff",
        "pos_embed": "diff",
        "zero.weight": "zero",
    }


def test_reported_energy_is_exact_and_goes_into_the_metadata(tmp_path):
    values = deltas()
    report = extract_lora(vector(values), tmp_path / "l.safetensors", rank=2, dtype="fp32", device="cpu")
    total = sum(float(v.double().square().sum()) for v in values.values())
    file = safetensors.torch.load_file(tmp_path / "l.safetensors")
    lost = 0.0
    for name in ("lin", "tall", "conv", "proj"):
        key = f"{P}{name}.weight"
        lost += float((stock_lora_delta(file, P + name, values[key].shape) - values[key].double()).square().sum())
    totals = report.totals()
    assert totals["energy"] == pytest.approx(1 - lost / total, rel=1e-5)
    assert totals["relative_error"] == pytest.approx(math.sqrt(lost / total), rel=1e-4)
    metadata = SafetensorsFile(tmp_path / "l.safetensors").metadata
    assert float(metadata["dm_lora_energy"]) == pytest.approx(totals["energy"], abs=1e-6)
    per_key = json.loads(metadata["dm_lora_keys"])
    assert per_key[P + "conv.weight"][:2] == ["locon", 2]
    assert json.loads(metadata["dm_rerun_recipe"])["result"]["kind"] == "lora"
    assert report.summary()["per_key"][P + "lin.weight"]["rank"] == 2


def test_conv_and_other_key_options(tmp_path):
    values = deltas()
    extract_lora(vector(values), tmp_path / "a.safetensors", rank=2, conv="skip", other_keys="drop", device="cpu")
    skipped = SafetensorsFile(tmp_path / "a.safetensors").keys()
    assert not any(k.startswith(P + "conv.") or k.endswith((".diff", ".diff_b")) for k in skipped)
    assert P + "proj.lora_up.weight" in skipped  # 1×1 convolutions are linear layers, not skipped
    extract_lora(vector(values), tmp_path / "b.safetensors", rank=2, conv="diff", device="cpu", dtype="fp32")
    whole = safetensors.torch.load_file(tmp_path / "b.safetensors")
    assert torch.equal(whole[P + "conv.diff"], values[P + "conv.weight"])


def test_dropped_keys_are_never_computed_and_each_key_is_read_once(tmp_path):
    values = deltas()
    reads = []

    class Counting(StoredDeltas):
        def compute(self, key, device):
            reads.append(key)
            return super().compute(key, device)

    extract_lora(
        TaskVector(((1.0, Counting(values)),)), tmp_path / "l.safetensors", rank=2, conv="skip", other_keys="drop"
    )
    dropped = {P + "conv.weight", P + "conv.bias", P + "norm.weight", P + "pos_embed"}
    assert sorted(reads) == sorted(set(values) - dropped)


def test_load_lora_reads_the_file_back_as_a_task_vector(tmp_path):
    values = deltas()
    extract_lora(vector(values), tmp_path / "l.safetensors", rank=3, dtype="fp32", device="cpu")
    back = load_lora(tmp_path / "l.safetensors")
    file = safetensors.torch.load_file(tmp_path / "l.safetensors")
    assert set(back.keys()) == set(values) - {P + "zero.weight"}
    expected = stock_lora_delta(file, P + "conv", (12, 6, 3, 3))
    torch.testing.assert_close(back.delta(P + "conv.weight", "cpu").double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(back.delta(P + "pos_embed", "cpu"), values[P + "pos_embed"])


def test_load_lora_refuses_other_adapter_kinds(tmp_path):
    safetensors.torch.save_file({P + "x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="Task Vector from LoRA"):
        load_lora(tmp_path / "loha.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a whole number"),
        ({"rank": -3}, "rank must be a whole number"),
        ({"rank": True}, "rank must be a whole number"),
        ({"rank": 2.5}, "rank must be a whole number"),
        ({"energy": 0.0}, r"energy fraction must be in \(0, 1\]"),
        ({"energy": 1.01}, r"energy fraction must be in \(0, 1\]"),
        ({"energy": float("nan")}, "finite"),
        ({"energy": float("inf")}, "finite"),
        ({"energy": 0.9, "max_rank": 0}, "max_rank"),
        ({}, "either a rank or an energy"),
        ({"rank": 4, "energy": 0.9}, "either a rank or an energy"),
        ({"energy": 0.9, "backend": "lowrank"}, "needs a fixed rank"),
        ({"rank": 4, "backend": "qr"}, "backend must be one of"),
        ({"rank": 4, "conv": "lycoris"}, "conv must be one of"),
        ({"rank": 4, "other_keys": "keep"}, "other_keys must be one of"),
        ({"rank": 4, "dtype": "fp8_e4m3fn"}, "fp16, bf16 or fp32"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract_lora(vector(deltas()), tmp_path / "l.safetensors", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_nonfinite_delta_is_refused_naming_the_key_and_nothing_is_left(tmp_path):
    values = deltas()
    values[P + "tall.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"diffusion_model\.tall\.weight"):
        extract_lora(vector(values), tmp_path / "l.safetensors", rank=2)
    assert list(tmp_path.iterdir()) == []


def test_values_beyond_fp16_are_refused_naming_the_tensor(tmp_path):
    values = {P + "big.weight": torch.full((4, 4), 1e10)}  # √σ ≈ 2e5 per factor entry
    with pytest.raises(ValueError, match=r"big\.lora_up\.weight.*overflows"):
        extract_lora(vector(values), tmp_path / "l.safetensors", rank=1, dtype="fp16")
    extract_lora(vector(values), tmp_path / "l.safetensors", rank=1, dtype="bf16")


def test_cancelling_stops_and_leaves_nothing(tmp_path):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(LoraExtractionCancelled):
        extract_lora(vector(deltas()), tmp_path / "l.safetensors", rank=2, should_stop=stop)
    assert list(tmp_path.iterdir()) == []


def test_progress_counts_every_key(tmp_path):
    seen = []
    extract_lora(vector(deltas()), tmp_path / "l.safetensors", rank=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 8) for i in range(1, 9)]


def test_extract_lora_is_exported_from_the_library(tmp_path):
    report = merging.extract_lora(vector(deltas()), tmp_path / "l.safetensors", energy=0.5, max_rank=4)
    assert all(k.rank <= 4 for k in report.keys)
    assert isinstance(merging.load_lora(tmp_path / "l.safetensors"), TaskVector)
