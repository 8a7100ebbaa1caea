"""The task-vector library on plain key→tensor mappings: no ComfyUI involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffusion_merge import merging
from diffusion_merge.merging.buffers import Scratch
from diffusion_merge.merging.io import NotSafetensorsError, SafetensorsFile, write_safetensors
from diffusion_merge.merging.keys import architecture_fingerprint, unet_key_map
from diffusion_merge.merging.task_vector_files import saved_key
from diffusion_merge.merging.task_vectors import coarse_block_of

PACK_ROOT = Path(__file__).resolve().parents[2]


def weights(seed: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g) + shift,
        "diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g),
        "diffusion_model.out.2.weight": torch.randn(4, 8, generator=g) - shift,
        "diffusion_model.pos_embed": torch.randn(1, 16, 8, generator=g),
    }


@pytest.fixture
def pair():
    return weights(1, 0.5), weights(0)


def test_task_vector_is_the_difference(pair):
    finetuned, base = pair
    tau = merging.task_vector(finetuned, base)
    assert tau.keys() == finetuned.keys()
    for key in finetuned:
        torch.testing.assert_close(tau[key], finetuned[key] - base[key], rtol=0, atol=0)


def test_apply_task_vector_restores_the_finetune_and_keeps_dtype(pair):
    finetuned, base = pair
    half_base = {k: v.half() for k, v in base.items()}
    merged = merging.apply_task_vector(half_base, merging.task_vector(finetuned, base), 1.0)
    assert all(merged[k].dtype == torch.float16 for k in merged)
    for key in finetuned:
        torch.testing.assert_close(merged[key].float(), finetuned[key], rtol=1e-3, atol=2e-3)


def test_extraction_is_lazy_until_a_key_is_read(pair):
    finetuned, base = pair

    class Counting(dict):
        reads = 0

        def __getitem__(self, key):
            Counting.reads += 1
            return super().__getitem__(key)

    counting = Counting(finetuned)
    vector = merging.extract_task_vector(counting, base)
    reads_at_build = Counting.reads
    vector.scale(2.0) + vector
    assert Counting.reads == reads_at_build
    vector.delta("diffusion_model.out.2.weight", "cpu")
    assert Counting.reads == reads_at_build + 1


def test_algebra_scale_add_subtract_negate(pair):
    finetuned, base = pair
    tau = merging.extract_task_vector(finetuned, base)
    other = merging.extract_task_vector(weights(2), base)
    combined = 2.0 * tau - other + (-tau)
    key = "diffusion_model.input_blocks.0.0.weight"
    expected = (finetuned[key] - base[key]) - (weights(2)[key] - base[key])
    torch.testing.assert_close(combined.delta(key, "cpu"), expected)
    assert combined.recipe["sum"][0]["coefficient"] == 2.0


def test_shape_mismatch_names_key_and_shapes(pair):
    finetuned, base = pair
    finetuned["diffusion_model.out.2.weight"] = torch.zeros(4, 9)
    with pytest.raises(ValueError, match=r"'diffusion_model\.out\.2\.weight' is \(4, 9\) in finetuned but \(4, 8\)"):
        merging.extract_task_vector(finetuned, base)


def test_missing_keys_mean_different_architectures(pair):
    finetuned, base = pair
    base.pop("diffusion_model.pos_embed")
    with pytest.raises(ValueError, match=r"different architectures: 1 key\(s\) of finetuned are missing from base"):
        merging.extract_task_vector(finetuned, base)


def test_adding_vectors_with_conflicting_shapes_fails():
    a = merging.TaskVector(((1.0, merging.StoredDeltas({"k": torch.zeros(2, 2)})),))
    b = merging.TaskVector(((1.0, merging.StoredDeltas({"k": torch.zeros(3)})),))
    with pytest.raises(ValueError, match=r"key 'k' is \(2, 2\) in one task vector but \(3,\)"):
        a + b


def test_nonfinite_delta_errors_or_skips(pair):
    finetuned, base = pair
    finetuned["diffusion_model.out.2.weight"][0, 0] = float("inf")
    strict = merging.extract_task_vector(finetuned, base)
    with pytest.raises(ValueError, match=r"'diffusion_model\.out\.2\.weight' has NaN/Inf"):
        strict.delta("diffusion_model.out.2.weight", "cpu")
    lenient = merging.extract_task_vector(finetuned, base, nonfinite="skip")
    assert torch.count_nonzero(lenient.delta("diffusion_model.out.2.weight", "cpu")) == 0


def test_key_filter_selects_by_regex(pair):
    finetuned, base = pair
    vector = merging.extract_task_vector(finetuned, base, key_filter=r"input_blocks\.")
    assert vector.keys() == ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.input_blocks.0.0.bias"]
    assert vector.select(r"\.bias$").keys() == ["diffusion_model.input_blocks.0.0.bias"]
    with pytest.raises(ValueError, match="matches no key"):
        merging.extract_task_vector(finetuned, base, key_filter="nothing-like-this")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        merging.extract_task_vector(finetuned, base, key_filter="(")


def test_summary_counts_norms_and_sparsity():
    vector = merging.TaskVector(
        ((1.0, merging.StoredDeltas({"diffusion_model.a.0.w": torch.tensor([3.0, 0.0]), "b.weight": torch.zeros(2)})),)
    )
    summary = merging.summarize(vector, "cpu")
    assert summary == {
        "keys": 2,
        "parameters": 4,
        "norm": 3.0,
        "sparsity": 0.75,
        "block_norms": {"a.0": 3.0, "b": 0.0},
    }


@pytest.mark.parametrize(
    ("key", "block"),
    [
        ("diffusion_model.input_blocks.4.1.proj_in.weight", "input_blocks.4"),
        ("diffusion_model.middle_block.1.norm.weight", "middle_block.1"),
        ("diffusion_model.double_blocks.12.img_attn.qkv.weight", "double_blocks.12"),
        ("diffusion_model.out.2.bias", "out.2"),
        ("diffusion_model.pos_embed", "pos_embed"),
    ],
)
def test_block_names(key, block):
    assert coarse_block_of(key) == block


# -- files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_reader_matches_safetensors(tmp_path, dtype):
    tensors = {k: v.to(dtype) for k, v in weights(3).items()}
    tensors["scalar"] = torch.tensor(1.5).to(dtype)
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors", metadata={"a": "b"})
    file = SafetensorsFile(tmp_path / "m.safetensors")
    assert file.metadata == {"a": "b"}
    for key, tensor in tensors.items():
        assert file.dtype_of(key) == dtype and file.shape_of(key) == tuple(tensor.shape)
        assert torch.equal(file[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
    assert torch.equal(file.head("diffusion_model.out.2.weight", 3), tensors["diffusion_model.out.2.weight"][0, :3])


@pytest.mark.parametrize("drop_behind", [True, False])
def test_streaming_reads_match_and_drop_only_large_buffered_tensors_behind(tmp_path, monkeypatch, drop_behind):
    generator = torch.Generator().manual_seed(0)
    sizes = [(3, torch.float32), (600_001, torch.float16), (262_145, torch.float32), (1 << 20, torch.float8_e4m3fn)]
    tensors = {f"t{i}": torch.randn(n, generator=generator).to(dtype) for i, (n, dtype) in enumerate(sizes)}
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors")
    dropped = []
    if hasattr(os, "posix_fadvise"):
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, size, advice: dropped.append(size))
    file, buffer = SafetensorsFile(tmp_path / "m.safetensors", drop_behind=drop_behind), Scratch()
    for _ in range(2):  # the second round reuses the buffer's memory and the open file
        for key, tensor in tensors.items():
            read = file.read(key, buffer)
            assert read.dtype == tensor.dtype and torch.equal(read.view(torch.uint8), tensor.view(torch.uint8)), key
    assert torch.equal(file["t1"], tensors["t1"])  # a plain lookup: its own memory, never dropped
    large = [tensor.numel() * tensor.element_size() for tensor in tensors.values()][1:]
    expected = 2 * large if drop_behind and hasattr(os, "posix_fadvise") else []
    assert dropped == expected
    file.close()


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = weights(4)
    specs = [(k, torch.bfloat16, tuple(v.shape)) for k, v in tensors.items()]
    path = write_safetensors(tmp_path / "out.safetensors", specs, iter(tensors.items()), {"recipe": "x"})
    loaded = safetensors.torch.load_file(path)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor.to(torch.bfloat16))
    assert SafetensorsFile(path).metadata == {"recipe": "x"}


def test_writer_leaves_nothing_behind_when_the_stream_fails(tmp_path):
    def broken():
        yield "a", torch.zeros(2)
        raise RuntimeError("interrupted")

    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="interrupted"):
        write_safetensors(tmp_path / "x.safetensors", specs, broken())
    assert list(tmp_path.iterdir()) == []


def test_pickle_is_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"x": torch.zeros(3)}, tmp_path / "model.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(NotSafetensorsError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "model.safetensors")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors"):
        merging.task_vector_from_files(tmp_path / "absent.safetensors", tmp_path / "absent.safetensors")


def test_unet_key_prefixes_are_normalised():
    checkpoint = ["model.diffusion_model.out.2.weight", "first_stage_model.x", "cond_stage_model.y"]
    assert unet_key_map(checkpoint) == {"diffusion_model.out.2.weight": "model.diffusion_model.out.2.weight"}
    assert unet_key_map(["out.2.weight"]) == {"diffusion_model.out.2.weight": "out.2.weight"}
    assert unet_key_map(["diffusion_model.out.2.weight"]) == {
        "diffusion_model.out.2.weight": "diffusion_model.out.2.weight"
    }
    with pytest.raises(ValueError, match="diffusers layout"):
        unet_key_map(["down_blocks.0.resnets.0.conv1.weight"])


def test_files_round_trip_through_the_saved_format(tmp_path, pair):
    finetuned, base = pair
    safetensors.torch.save_file({"model." + k: v.half() for k, v in finetuned.items()}, tmp_path / "ft.safetensors")
    safetensors.torch.save_file(
        {k.removeprefix("diffusion_model."): v.half() for k, v in base.items()}, tmp_path / "b.sft"
    )
    vector = merging.task_vector_from_files(tmp_path / "ft.safetensors", tmp_path / "b.sft")
    progress = []
    merging.save_task_vector(vector, tmp_path / "tau.safetensors", dtype="fp32", progress=progress.append)
    assert progress == [1, 2, 3, 4]
    stored = safetensors.torch.load_file(tmp_path / "tau.safetensors")
    assert sorted(stored) == sorted(saved_key(k) for k in finetuned)
    assert "diffusion_model.pos_embed.diff" in stored and "diffusion_model.input_blocks.0.0.diff_b" in stored
    reloaded = merging.load_task_vector(tmp_path / "tau.safetensors")
    assert sorted(reloaded.keys()) == sorted(finetuned)
    assert reloaded.base_fingerprint == vector.base_fingerprint
    assert json.loads(SafetensorsFile(tmp_path / "tau.safetensors").metadata["dm_sources"]) == [
        "ft.safetensors",
        "b.sft",
    ]
    for key in finetuned:
        expected = finetuned[key].half().float() - base[key].half().float()
        assert torch.equal(reloaded.delta(key, "cpu"), expected), key


def test_loading_a_lora_as_a_task_vector_points_to_the_lora_node(tmp_path):
    safetensors.torch.save_file({"x.lora_up.weight": torch.zeros(2, 1)}, tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="is a LoRA"):
        merging.load_task_vector(tmp_path / "l.safetensors")


def test_fingerprint_ignores_storage_precision_but_not_weights(pair):
    finetuned, base = pair
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    half = {k: v.half().float() for k, v in base.items()}
    from diffusion_merge.merging.keys import state_dict_fingerprint

    assert state_dict_fingerprint(half, shapes) == state_dict_fingerprint(
        {k: v.half() for k, v in base.items()}, shapes
    )
    assert state_dict_fingerprint(half, shapes) != state_dict_fingerprint(finetuned, shapes)
    assert architecture_fingerprint(shapes) == state_dict_fingerprint(finetuned, shapes).split("-")[0]


def test_lora_pairs_expand_to_scaled_products():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    conv_up, conv_down = torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    state = {
        "m.lora_up.weight": up,
        "m.lora_down.weight": down,
        "m.alpha": torch.tensor(1.0),
        "c.lora_B.weight": conv_up,
        "c.lora_A.weight": conv_down,
    }
    deltas = merging.lora_deltas(state)
    torch.testing.assert_close(deltas["m"], 0.5 * up @ down)
    expected_conv = (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(6, 3, 3, 3)
    torch.testing.assert_close(deltas["c"], expected_conv)


def test_library_imports_without_comfyui():
    """`import merging` with only the pack root on sys.path: the documented scripting entry point."""
    code = (
        "import sys, merging, merging.training.schedules, merging.channel_projection; "
        "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=PACK_ROOT, env=env, check=True)


def test_merging_checkpoint_files_streams_base_plus_the_merge(tmp_path, pair):
    finetuned, base = pair
    other = weights(7)
    extra = {"first_stage_model.decoder.w": torch.randn(3, 3), "cond_stage_model.step": torch.tensor([1, 2])}

    def checkpoint(name, state, with_extra=False):
        tensors = {"model." + k: v for k, v in state.items()} | (extra if with_extra else {})
        safetensors.torch.save_file(tensors, tmp_path / name)
        return tmp_path / name

    paths = [checkpoint("a.safetensors", finetuned), checkpoint("b.safetensors", other)]
    base_path = checkpoint("base.safetensors", base, with_extra=True)
    out = merging.merge_checkpoint_files(base_path, paths, tmp_path / "out.safetensors", "ties", k=0.5, dtype="fp32")
    merged = safetensors.torch.load_file(out)
    taus = [merging.task_vector(finetuned, base), merging.task_vector(other, base)]
    expected = merging.merge_task_vectors(taus, "ties", k=0.5)
    for key, delta in expected.items():
        torch.testing.assert_close(merged["model." + key], base[key] + delta, rtol=0, atol=1e-6)
    assert torch.equal(merged["cond_stage_model.step"], extra["cond_stage_model.step"])
    assert torch.equal(merged["first_stage_model.decoder.w"], extra["first_stage_model.decoder.w"])
    recipe = json.loads(SafetensorsFile(out).metadata["dm_recipe"])
    assert recipe["method"] == "ties" and recipe["k"] == 0.5


def test_file_extraction_reads_each_tensor_once(tmp_path, pair, monkeypatch):
    finetuned, base = pair
    safetensors.torch.save_file(finetuned, tmp_path / "ft.safetensors")
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    reads = []
    original = SafetensorsFile._read

    def counting(self, dtype, shape, begin, end, buffer=None):
        reads.append((self.path.name, end - begin))
        return original(self, dtype, shape, begin, end, buffer)

    monkeypatch.setattr(SafetensorsFile, "_read", counting)
    vector = merging.task_vector_from_files(tmp_path / "ft.safetensors", tmp_path / "base.safetensors")
    assert all(size <= 16 * 4 for _, size in reads)  # building it reads only the fingerprint's few values
    reads.clear()
    merging.save_task_vector(vector, tmp_path / "tau.safetensors", dtype="fp32")
    assert sorted(name for name, _ in reads) == ["base.safetensors"] * 4 + ["ft.safetensors"] * 4
