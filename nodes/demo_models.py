"""Tiny built-in models with deterministic weights: the demo model and the test models.

No weights can be downloaded where this pack is developed, so examples and tests run on miniature
SD1.5-architecture, Flux-architecture and Wan-architecture networks built in memory from a seed. ``finetune``
variants are the base plus a seeded change on some blocks, so task vectors between them are meaningful.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import torch
from comfy.ldm.flux.model import FluxParams

from . import compat

SD15_TINY = dict(
    use_checkpoint=False,
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=-2,
    use_linear_in_transformer=False,
    context_dim=64,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)
# The smallest UNet ComfyUI's loaders detect as SD1.5 (320 channels, 768-wide context): for file paths.
SD15_DETECTABLE = {**SD15_TINY, "model_channels": 320, "context_dim": 768, "transformer_depth_output": [0, 0]}

FLUX_TINY = {
    "image_model": "flux",
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 64,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}

# Wan 2.1's network (comfy.supported_models.WAN21_T2V, 16-channel latents: also Wan 2.2 A14B's high- and
# low-noise experts; WAN22_T2V is the 5B model with 48-channel latents) at a few thousandths of its size. The
# text width is the tiny CLIP's, which stands in for UMT5-XXL.
WAN_TINY = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "text_len": 512,
    "in_dim": 16,
    "dim": 64,
    "ffn_dim": 128,
    "freq_dim": 64,
    "text_dim": 64,
    "out_dim": 16,
    "num_heads": 2,
    "num_layers": 2,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
WAN_EXPERTS = ("high_noise", "low_noise")

TINY_CLIP_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 64,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}

VARIANTS = ("base", "finetune-a", "finetune-b", "finetune-c", "finetune-d")
# Which parameters each fine-tune changes (regex on names): A the early blocks, B the late ones (both the
# time embedding), C the attention layers, D everything a little.
_FINETUNE_PARAMETERS = {
    "finetune-a": re.compile(r"^(input_blocks|time_embed|img_in|double_blocks)\."),
    "finetune-b": re.compile(r"^(output_blocks|out|time_embed|final_layer|single_blocks)\."),
    "finetune-c": re.compile(r"attn|transformer_blocks"),
    "finetune-d": re.compile(r"."),
}


def init_weights(module: torch.nn.Module, seed: int, scale: float = 0.02, variant: str = "base") -> None:
    """Seeded weights: norms 1, biases 0, everything else N(0, scale²), plus the change a fine-tune variant
    owns (see ``_FINETUNE_PARAMETERS``). ComfyUI skips initialisation, and with dynamic VRAM its layers have
    no weights until a state dict is loaded, so the values go in the way a loader puts them."""
    values = seeded_values(compat.parameter_shapes(module), seed, scale)
    compat.assign_parameters(module, perturb(values, variant, seed))


def seeded_values(shapes: dict, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """{name: seeded value} for {name: (shape, dtype)}, drawn in name order from one generator."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name, (shape, dtype) in sorted(shapes.items()):
        if name.endswith("bias"):
            value = torch.zeros(shape)
        elif "norm" in name or name.endswith(".scale"):
            value = torch.ones(shape)
        else:
            value = torch.randn(shape, generator=generator) * scale
        values[name] = value.to(dtype)
    return values


def perturb(values: dict, variant: str, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """``values`` plus a seeded change on the parameters a fine-tune variant owns (see ``_FINETUNE_PARAMETERS``)."""
    if variant == "base":
        return values
    if variant not in _FINETUNE_PARAMETERS:
        raise ValueError(f"unknown demo variant '{variant}'; choose one of {VARIANTS}")
    changed = _FINETUNE_PARAMETERS[variant]
    generator = torch.Generator().manual_seed(seed + 1000 * (VARIANTS.index(variant)))
    perturbed = dict(values)
    for name, value in sorted(values.items()):
        if changed.search(name):
            change = torch.randn(value.shape, generator=generator) * scale
            perturbed[name] = (value.float() + change).to(value.dtype)
    return perturbed


def _patcher(base_model) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_sd15(seed: int = 0, variant: str = "base", dtype=torch.float32, **config) -> comfy.model_patcher.ModelPatcher:
    """A tiny SD1.5-architecture UNet (ε-prediction) as a MODEL."""
    model_config = comfy.supported_models.SD15({**SD15_TINY, **config})
    model_config.set_inference_dtype(dtype, None)
    base_model = model_config.get_model({})
    init_weights(base_model.diffusion_model, seed, variant=variant)
    return _patcher(base_model)


def build_flux(seed: int = 0, variant: str = "base", dtype=torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A tiny Flux-architecture DiT (flow matching, CONST sampling) as a MODEL."""
    model_config = comfy.supported_models.Flux(compat.complete_dit_config(FLUX_TINY, FluxParams))
    model_config.set_inference_dtype(dtype, None)
    base_model = model_config.get_model({}, device="cpu")
    init_weights(base_model.diffusion_model, seed, variant=variant)
    return _patcher(base_model)


def build_wan(
    seed: int = 0, expert: str = "high_noise", dtype=torch.float32, **config
) -> comfy.model_patcher.ModelPatcher:
    """A tiny Wan-architecture video DiT (flow matching, ComfyUI's Wan 2.1 model class) as a MODEL.

    ``expert`` picks one of two independently seeded networks, standing in for Wan 2.2 A14B's high-noise and
    low-noise experts (two separately trained models of one architecture)."""
    if expert not in WAN_EXPERTS:
        raise ValueError(f"unknown Wan expert '{expert}'; choose one of {WAN_EXPERTS}")
    model_config = comfy.supported_models.WAN21_T2V({**WAN_TINY, **config})
    model_config.set_inference_dtype(dtype, None)
    base_model = model_config.get_model({}, device="cpu")
    init_weights(base_model.diffusion_model, seed + 101 * WAN_EXPERTS.index(expert))
    return _patcher(base_model)


class _TinyClipModel(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
        super().__init__(
            device=device,
            dtype=dtype,
            model_options=model_options or {},
            clip_model=functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(TINY_CLIP_CONFIG)),
            **kwargs,
        )


def build_clip(seed: int = 0, variant: str = "base") -> comfy.sd.CLIP:
    """A tiny SD1-style CLIP text encoder (64-wide) using ComfyUI's own tokenizer."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, _TinyClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    encoder = clip.cond_stage_model
    values = seeded_values(compat.parameter_shapes(encoder), seed + 1)
    if variant != "base":
        generator = torch.Generator().manual_seed(seed + 7 * VARIANTS.index(variant))
        for name, value in sorted(values.items()):
            if ".encoder.layers.1." in name:
                values[name] = (value.float() + torch.randn(value.shape, generator=generator) * 0.01).to(value.dtype)
    compat.assign_parameters(encoder, values)
    return clip


def build_vae(seed: int = 0) -> comfy.sd.VAE:
    """A tiny KL autoencoder with a 4-channel latent (8× down-sampling)."""
    vae = comfy.sd.VAE(sd={}, config=TINY_VAE_CONFIG, dtype=torch.float32)
    init_weights(vae.first_stage_model, seed + 2, scale=0.05)
    return vae


class _FramesVAE(comfy.sd.VAE):
    """A VAE that decodes video latents [B, C, T, H, W] frame by frame into [B, T, H, W, 3] images (as ComfyUI's
    video VAEs return them); image latents decode as usual. With a 16-channel latent it stands in for Wan's
    VAE, which is far too large to build in a test (and compresses time 4×, which this one does not)."""

    def decode(self, samples_in, *args, **kwargs):
        if samples_in.ndim != 5:
            return super().decode(samples_in, *args, **kwargs)
        batch, channels, frames, height, width = samples_in.shape
        flat = samples_in.movedim(2, 1).reshape(batch * frames, channels, height, width)
        images = super().decode(flat, *args, **kwargs)
        return images.reshape(batch, frames, *images.shape[-3:])


def build_video_vae(seed: int = 0, latent_channels: int = 16) -> comfy.sd.VAE:
    """A tiny KL autoencoder with a ``latent_channels`` latent (8× down-sampling) that also decodes video latents."""
    params = TINY_VAE_CONFIG["params"]
    ddconfig = {**params["ddconfig"], "z_channels": latent_channels}
    config = {"params": {**params, "embed_dim": latent_channels, "ddconfig": ddconfig}}
    vae = _FramesVAE(sd={}, config=config, dtype=torch.float32)
    init_weights(vae.first_stage_model, seed + 2, scale=0.05)
    return vae


# Demo loaders whose tiny diffusion model the block-weight editor builds to list its blocks (see blocks_server).
DEMO_BUILDERS = {"DM_DemoWanLoader": build_wan}
