"""DeMe's channel projections as plain tensors: identity start, 1×1 convolution, W − I task vectors, files."""

from __future__ import annotations

import pytest
import torch

from diffusion_merge.merging.channel_projection import (
    block_of,
    companion_path,
    identity_projections,
    is_companion_file,
    load_projections,
    project,
    projection_deltas,
    projection_key,
    projections_with_deltas,
    save_projections,
)


def test_identity_projection_changes_nothing():
    hidden = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    weights = identity_projections({"input.1": 5})
    assert torch.equal(project(hidden, weights["input.1"]), hidden)


def test_projection_is_a_bias_free_one_by_one_convolution():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 6, 3, 5, generator=generator), torch.randn(4, 6, generator=generator)
    expected = torch.nn.functional.conv2d(hidden, weight[:, :, None, None])
    torch.testing.assert_close(project(hidden, weight), expected)
    with pytest.raises(ValueError, match="cannot map 3 channels"):
        project(torch.zeros(1, 3, 2, 2), weight)


def test_task_vector_of_a_projection_is_w_minus_identity_and_merges_back():
    w1 = torch.eye(3) + 0.1 * torch.arange(9.0).reshape(3, 3)
    w2 = torch.eye(3) - 0.2
    deltas = [projection_deltas({"middle.0": w}) for w in (w1, w2)]
    assert list(deltas[0]) == ["channel_projection.middle.0.weight"]
    torch.testing.assert_close(deltas[0]["channel_projection.middle.0.weight"], w1 - torch.eye(3))
    merged = {key: 0.1 * deltas[0][key] + 0.5 * deltas[1][key] for key in deltas[0]}
    weights = projections_with_deltas(merged)
    torch.testing.assert_close(
        weights["middle.0"], torch.eye(3) + 0.1 * (w1 - torch.eye(3)) + 0.5 * (w2 - torch.eye(3))
    )
    again = projections_with_deltas(deltas[1], strength=2.0, current={"middle.0": w1})
    torch.testing.assert_close(again["middle.0"], w1 + 2 * (w2 - torch.eye(3)))


def test_keys_and_companion_names():
    assert projection_key("output.3") == "channel_projection.output.3.weight"
    assert block_of("channel_projection.input.10.weight") == "input.10"
    with pytest.raises(ValueError, match="not a channel-projection key"):
        block_of("diffusion_model.out.2.weight")
    path = companion_path("/x/loras/expert_00001_.safetensors")
    assert path.name == "expert_00001_.channel_projection.safetensors" and is_companion_file(path.name)
    assert not is_companion_file("expert_00001_.safetensors")


def test_companion_file_round_trip_and_refusals(tmp_path):
    weights = {"input.0": torch.eye(4) * 1.5, "middle.0": torch.eye(2)}
    path = save_projections(weights, tmp_path / "p.safetensors", {"note": "x"})
    loaded = load_projections(path)
    assert set(loaded) == set(weights) and all(torch.equal(loaded[b], weights[b]) for b in weights)
    with pytest.raises(ValueError, match="square"):
        save_projections({"input.0": torch.zeros(2, 3)}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
