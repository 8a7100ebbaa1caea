"""Named blocks on real key lists: every architecture's keys as ComfyUI's own model classes name them.

Each model is built from the configuration ComfyUI's model detection gives the released checkpoints, on the
``meta`` device (no weights allocated), and ComfyUI must recognise its state dict as that model; then our
detection must name the architecture, and its block groups must hold every key exactly once and be the
groups of the architecture's preset (the web editor's sliders for a model it cannot read).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from diffusion_merge.merging import blocks

# The SDXL and Flux-dev configs are the ones bench/'s shape tables are built from (those modules import only the
# standard library; flux_shapes imports sdxl_shapes, so bench/ goes on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from flux_shapes import FLUX_DEV_CONFIG as FLUX_DEV
from sdxl_shapes import SDXL_UNET_CONFIG as SDXL_UNET

SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SDXL_REFINER_UNET = {
    **SDXL_UNET,
    "adm_in_channels": 2560,
    "model_channels": 384,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 4,
    "context_dim": 1280,
    "transformer_depth_output": [0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0],
}


def _mmdit(depth: int, width: int, **extra) -> dict:
    return {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": depth,
        "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 4096, "out_features": width},
        },
        "pos_embed_scaling_factor": None,
        **extra,
    }


def _wan(dim: int, ffn: int, layers: int, model_type: str = "t2v", in_dim: int = 16, out_dim: int = 16) -> dict:
    return {
        "image_model": "wan2.1",
        "model_type": model_type,
        "dim": dim,
        "ffn_dim": ffn,
        "num_heads": dim // 128,
        "num_layers": layers,
        "in_dim": in_dim,
        "out_dim": out_dim,
        "text_dim": 4096,
        "freq_dim": 256,
    }


# (case, network class path, config, the class ComfyUI detects, our architecture id, our preset)
CASES = [
    ("sd15", "openaimodel.UNetModel", SD15_UNET, "SD15", "sd1", "SD1.x / SD2"),
    ("sdxl", "openaimodel.UNetModel", SDXL_UNET, "SDXL", "sdxl", "SDXL base"),
    ("sdxl_refiner", "openaimodel.UNetModel", SDXL_REFINER_UNET, "SDXLRefiner", "sdxl", "SDXL refiner"),
    (
        "sd3_medium",
        "mmdit.MMDiT",
        _mmdit(24, 1536, num_patches=36864, pos_embed_max_size=192, x_block_self_attn_layers=[]),
        "SD3",
        "sd3",
        "SD3 Medium / SD3.5 Medium",
    ),
    (
        "sd35_medium",
        "mmdit.MMDiT",
        _mmdit(
            24,
            1536,
            num_patches=147456,
            pos_embed_max_size=384,
            qk_norm="rms",
            x_block_self_attn_layers=list(range(13)),
        ),
        "SD3",
        "sd3",
        "SD3 Medium / SD3.5 Medium",
    ),
    (
        "sd35_large",
        "mmdit.MMDiT",
        _mmdit(38, 2432, num_patches=36864, pos_embed_max_size=192, qk_norm="rms", x_block_self_attn_layers=[]),
        "SD3",
        "sd3",
        "SD3.5 Large",
    ),
    ("flux_dev", "flux.Flux", FLUX_DEV, "Flux", "flux", "Flux.1 dev / schnell"),
    ("flux_schnell", "flux.Flux", {**FLUX_DEV, "guidance_embed": False}, "FluxSchnell", "flux", "Flux.1 dev / schnell"),
    ("wan21_14b_t2v", "wan.WanModel", _wan(5120, 13824, 40), "WAN21_T2V", "wan", "Wan 2.1 14B / Wan 2.2 A14B"),
    (
        "wan21_14b_i2v",
        "wan.WanModel",
        _wan(5120, 13824, 40, "i2v", in_dim=36),
        "WAN21_I2V",
        "wan",
        "Wan 2.1 14B / Wan 2.2 A14B",
    ),
    ("wan21_1_3b", "wan.WanModel", _wan(1536, 8960, 30), "WAN21_T2V", "wan", "Wan 2.1 1.3B / Wan 2.2 5B"),
    (
        "wan22_5b",
        "wan.WanModel",
        _wan(3072, 14336, 30, in_dim=48, out_dim=48),
        "WAN22_T2V",
        "wan",
        "Wan 2.1 1.3B / Wan 2.2 5B",
    ),
    (
        "qwen_image",
        "qwen_image.QwenImageTransformer2DModel",
        {"num_layers": 60},
        "QwenImage",
        "qwen_image",
        "Qwen-Image",
    ),
]


def network_class(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    package = {
        "openaimodel": "comfy.ldm.modules.diffusionmodules.openaimodel",
        "mmdit": "comfy.ldm.modules.diffusionmodules.mmdit",
        "flux": "comfy.ldm.flux.model",
        "wan": "comfy.ldm.wan.model",
        "qwen_image": "comfy.ldm.qwen_image.model",
    }[module]
    return getattr(importlib.import_module(package), name)


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def built(request, comfyui):
    """(case, the network's state dict on ``meta``)."""
    import comfy.ops

    case = request.param
    cls = network_class(case[1])
    config = dict(case[2])
    if cls.__name__ == "Flux":
        from comfy.ldm.flux.model import FluxParams

        from diffusion_merge.nodes import compat

        config = compat.complete_dit_config(config, FluxParams)
    network = cls(**config, dtype=torch.bfloat16, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    return case, network.state_dict()


def test_comfyui_recognises_the_key_list_as_the_released_model(built):
    import comfy.model_detection

    (name, _, _, comfy_class, _, _), state = built
    detected = comfy.model_detection.model_config_from_unet(state, "")
    assert type(detected).__name__ == comfy_class, f"{name}: ComfyUI detects {type(detected).__name__}"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_detection_and_groups_cover_every_key_once(built, prefix):
    (name, _, _, _, arch_id, preset), state = built
    keys = [prefix + key for key in state]
    if prefix == "model.diffusion_model.":  # a checkpoint: other parts are left out
        keys += ["first_stage_model.decoder.conv_in.weight", "conditioner.embedders.0.transformer.x.weight"]
    groups = blocks.group_keys(keys)
    assert groups.architecture.id == arch_id, f"{name} detected as {groups.architecture.id}"
    assert not groups.ungrouped, f"{name}: keys in no group: {groups.ungrouped[:5]}"
    held = [path for paths in groups.groups.values() for path in paths]
    assert sorted(held) == sorted(state), f"{name}: a key is missing or in two groups"
    assert list(groups.groups) == groups.architecture.preset_groups(preset)


def test_each_block_rule_matches_exactly_its_group(built):
    """The regex a rule name stands for selects the same keys as the grouping (so slider = rule)."""
    import re

    (_, _, _, _, _, _), state = built
    keys = ["diffusion_model." + key for key in state]
    groups = blocks.group_keys(keys)
    for group, paths in groups.groups.items():
        pattern = re.compile(blocks.block_pattern(group))
        matched = sorted(key.removeprefix("diffusion_model.") for key in keys if pattern.search(key))
        assert matched == sorted(paths), f"@{group} matches other keys than its group"


# -- the Model Blocks node --------------------------------------------------------------------------


def test_model_blocks_node_lists_the_groups_and_their_sizes(tiny_sd15, tiny_flux):
    import json

    from diffusion_merge.nodes.blocks import ModelBlocksNode

    for build, arch, names in (
        (tiny_sd15, "sd1", ["embed", "IN00", "IN01", "OUT00", "OUT01", "final"]),
        (tiny_flux, "flux", ["embed", "D00", "S00", "final"]),
    ):
        model = build()
        output = ModelBlocksNode.execute(model)
        summary = json.loads(output.result[0])
        assert summary["architecture"] == arch and list(summary["groups"]) == names and not summary["ungrouped"]
        total = sum(p.numel() for p in model.model.diffusion_model.parameters())
        assert sum(group["parameters"] for group in summary["groups"].values()) == total
        text = output.ui.as_dict()["text"][0]
        assert text.splitlines()[1].strip() == blocks.describe_groups(names)


def test_model_blocks_node_names_what_it_found_in_an_unknown_model(tiny_sd15):
    from diffusion_merge.nodes.blocks import ModelBlocksNode

    model = tiny_sd15()
    with pytest.raises(blocks.UnknownArchitecture, match="top-level modules: input_blocks, out, output_blocks"):
        patched = model.clone()
        patched.get_key_patches = lambda prefix=None: {  # a model whose keys name no known family
            key: value for key, value in model.get_key_patches(prefix).items() if "time_embed" not in key
        }
        ModelBlocksNode.execute(patched)
