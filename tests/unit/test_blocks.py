"""Named blocks: names, detection, grouping, and what a merge does with block rules (no ComfyUI).

The full key lists of every architecture are checked against ComfyUI's own model classes in
``tests/integration/test_block_architectures.py``; here the SDXL and Flux key lists committed for the
benchmarks (generated from ComfyUI's configs by ``bench/sdxl_shapes.py`` / ``bench/flux_shapes.py``) stand in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from diffusion_merge.merging import blocks
from diffusion_merge.merging.key_weights import parse_weight_rules
from diffusion_merge.merging.merge import merge_task_vectors

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_keys(name: str) -> list[str]:
    return list(json.loads((BENCH / name).read_text())["shapes"])


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("IN04", "IN04"), ("in4", "IN04"), ("Out11", "OUT11"), ("m0", "M00"), ("D18", "D18"), ("b7", "B07")],
)
def test_block_names_are_canonical(name, canonical):
    assert blocks.canonical_block_name(name) == canonical


@pytest.mark.parametrize("name", ["encoder", "IN", "M01", "X03", "blocks", "IN-1", ""])
def test_unknown_block_names_are_refused_with_the_naming_rules(name):
    with pytest.raises(ValueError, match=r"unknown block .* \(known: input, middle"):
        blocks.canonical_block_name(name)


@pytest.mark.parametrize(
    ("name", "matches", "misses"),
    [
        (
            "IN04",
            ["diffusion_model.input_blocks.4.1.proj_in.weight", "input_blocks.4.0.skip.bias"],
            ["diffusion_model.input_blocks.14.0.x", "diffusion_model.output_blocks.4.0.x"],
        ),
        ("M00", ["model.diffusion_model.middle_block.1.norm.weight"], ["diffusion_model.middle_blocks.0.x"]),
        ("B03", ["diffusion_model.blocks.3.ffn.0.weight"], ["diffusion_model.double_blocks.3.x", "vace_blocks.3.x"]),
        (
            "T02",
            ["transformer_blocks.2.attn.to_q.weight"],
            ["diffusion_model.input_blocks.1.1.transformer_blocks.2.attn1.to_q.weight"],
        ),
        (
            "embed",
            ["diffusion_model.time_embed.0.weight", "pos_embed", "diffusion_model.img_in.weight"],
            ["diffusion_model.input_blocks.0.0.time_embed.weight", "text_encoders.clip_l.x"],
        ),
        (
            "final",
            ["diffusion_model.out.2.weight", "head.head.weight", "diffusion_model.proj_out.bias"],
            ["diffusion_model.input_blocks.1.1.proj_out.weight", "diffusion_model.output_blocks.0.0.x"],
        ),
    ],
)
def test_block_patterns_are_anchored_at_the_top_level_module(name, matches, misses):
    pattern = re.compile(blocks.block_pattern(name))
    assert all(pattern.search(key) for key in matches)
    assert not any(pattern.search(key) for key in misses)


@pytest.mark.parametrize(
    ("keys", "arch"),
    [
        (["input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight"], "sd1"),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.time_embed.0.weight",
                "first_stage_model.encoder.conv_in.weight",
            ],
            "sdxl",
        ),
        (["diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "diffusion_model.x_embedder.proj.weight"], "sd3"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux"),
        (["blocks.0.self_attn.q.weight", "patch_embedding.weight", "head.head.weight"], "wan"),
        (["transformer_blocks.0.attn.to_q.weight", "txt_norm.weight", "img_in.weight"], "qwen_image"),
    ],
)
def test_detection_from_marker_modules(keys, arch):
    assert blocks.detect_architecture(keys).id == arch


def test_an_unknown_architecture_is_named_and_explained():
    with pytest.raises(blocks.UnknownArchitecture, match=r"top-level modules: layers, proj.*Qwen-Image.*regex"):
        blocks.detect_architecture(["layers.0.attn.weight", "proj.weight"])
    with pytest.raises(blocks.UnknownArchitecture, match="no diffusion-model keys"):
        blocks.detect_architecture([])


@pytest.mark.parametrize(
    ("fixture", "arch", "preset"),
    [("sdxl_unet_shapes.json", "sdxl", "SDXL base"), ("flux_unet_shapes.json", "flux", "Flux.1 dev / schnell")],
)
def test_committed_key_lists_group_completely(fixture, arch, preset):
    groups = blocks.group_keys(bench_keys(fixture))
    assert groups.architecture.id == arch and not groups.ungrouped
    assert list(groups.groups) == blocks.ARCHITECTURES[arch].preset_groups(preset)
    assert sum(map(len, groups.groups.values())) == len(bench_keys(fixture))


def test_groups_are_summarised_with_numbered_runs_collapsed():
    groups = blocks.group_keys(bench_keys("sdxl_unet_shapes.json"))
    assert groups.summary() == "embed, IN00–IN08, M00, OUT00–OUT08, final"
    flux = blocks.ARCHITECTURES["flux"].preset_groups("Flux.1 dev / schnell")
    assert blocks.describe_groups(flux) == "embed, D00–D18, S00–S37, final"
    assert blocks.describe_groups(["B00", "B02", "B03"]) == "B00, B02–B03"


def test_a_preset_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match=r"Flux has no preset 'Flux\.2'"):
        blocks.ARCHITECTURES["flux"].preset_groups("Flux.2")


# -- weight rules ------------------------------------------------------------------------------------


def test_rule_text_with_named_blocks_parses_to_canonical_names():
    key_weights, block_weights = parse_weight_rules(
        "@in4 = 0.5\n@IN04 = 0.25  # the later one wins\n@embed=0\nattn2 = 2"
    )
    assert block_weights == {"IN04": 0.25, "embed": 0.0}
    assert key_weights == [("attn2", 2.0)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("@IN04 = nan", r"line 1 \('@IN04 = nan'\): the multiplier must be a finite number"),
        ("attn = inf", r"line 1 \('attn = inf'\): the multiplier must be a finite number"),
        ("\n@encoder = 0.5", r"line 2 \('@encoder = 0.5'\): unknown block 'encoder'"),
        ("@IN04 0.5", "must look like"),
    ],
)
def test_bad_rule_text_names_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_weight_rules(text)


def sd_task_vectors() -> list[dict[str, torch.Tensor]]:
    keys = [
        "diffusion_model.time_embed.0.weight",
        "diffusion_model.input_blocks.0.0.weight",
        "diffusion_model.input_blocks.1.1.proj_out.weight",
        "diffusion_model.middle_block.0.in_layers.0.weight",
        "diffusion_model.output_blocks.0.0.in_layers.0.weight",
        "diffusion_model.out.2.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
    ]
    return [{key: torch.ones(3) for key in keys}]


def test_named_block_weights_scale_exactly_their_keys():
    merged = merge_task_vectors(
        sd_task_vectors(), "weighted", block_weights={"embed": 0.5, "IN01": 2.0, "M00": 3.0, "final": 0.0}, device="cpu"
    )
    factors = {key: value[0].item() for key, value in merged.items()}
    assert factors == {
        "diffusion_model.time_embed.0.weight": 0.5,
        "diffusion_model.input_blocks.0.0.weight": 1.0,
        "diffusion_model.input_blocks.1.1.proj_out.weight": 2.0,
        "diffusion_model.middle_block.0.in_layers.0.weight": 3.0,
        "diffusion_model.output_blocks.0.0.in_layers.0.weight": 1.0,
        "diffusion_model.out.2.weight": 0.0,
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": 1.0,
    }


def test_a_block_the_model_does_not_have_is_refused_with_its_blocks_listed():
    with pytest.raises(
        ValueError,
        match=r"'@IN12', '@D03' match no key .*SD1.x / SD2 keys, whose blocks are "
        r"embed, IN00–IN01, M00, OUT00, final",
    ):
        merge_task_vectors(sd_task_vectors(), "weighted", block_weights={"IN12": 0.5, "D03": 1.0}, device="cpu")


def test_a_block_rule_on_an_unknown_architecture_says_so():
    tvs = [{"diffusion_model.layers.0.weight": torch.ones(2)}]
    with pytest.raises(ValueError, match=r"'@double' match no key .*cannot tell the architecture"):
        merge_task_vectors(tvs, "weighted", block_weights={"double": 0.5}, device="cpu")
