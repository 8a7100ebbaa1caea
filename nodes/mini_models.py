"""The mini model family: small SD1.5-architecture models trained on coloured Fashion-MNIST, as MODEL/CLIP/VAE.

Every member is built from ComfyUI's own classes, so every node path applies to it:

- **UNet**: ``comfy.supported_models.SD15`` with a small ``unet_config`` (ε-prediction, SD1.x key names,
  ``input_blocks`` / ``middle_block`` / ``output_blocks``, LoRA keys as for SD1.5);
- **text encoder**: ``comfy.sd1_clip`` (ComfyUI's SD1 tokenizer) with a small ``textmodel_json_config``;
- **VAE**: ComfyUI's ``AutoencoderKL`` with a small ``ddconfig``: 32×32 RGB ↔ a 4×4×4 latent, so the stock
  ``EmptyLatentImage`` at 32×32 makes the latent the family samples.

Configurations are read from the weights' shapes (the UNet through ComfyUI's own detection), so a
checkpoint of a family member saved by the stock ``CheckpointSave`` or by ``DM_SaveCheckpointStreaming``
loads again through :func:`load_checkpoint_file`. The stock checkpoint loaders cannot load it: they detect
SD1.x only from SD1.5's own widths (320 channels, 768-wide context).

The committed family lives in ``mini_models/`` (see ``family.json`` there and docs/mini-family.md); the
text encoder's token table is stored for the family's vocabulary only (other tokens embed as zeros).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import torch

from ..merging.io import SafetensorsFile
from .common import without_missing_key_log

FAMILY_DIR = Path(__file__).resolve().parents[1] / "mini_models"
MANIFEST = "family.json"

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."
VOCAB_IDS_KEY = "dm_vocabulary.token_ids"
VOCAB_ROWS_KEY = "dm_vocabulary.token_embedding"
TOKEN_EMBEDDING_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
CLIP_HEAD_WIDTH = 32  # the family's text encoders use 32-wide attention heads: heads = width / 32
VOCAB_SIZE = 49408
IMAGE_SIZE = 32

# The CPU family (scripts/family/train_family.py --preset cpu). Larger presets change widths only.
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
CLIP_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 64,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": IMAGE_SIZE,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
VAE_EMBED_DIM = 4

logger = logging.getLogger(__name__)


class FamilyError(ValueError):
    """A family file is missing, or is not a member of the family."""


# -- building ----------------------------------------------------------------------------------------


def _patcher(base_model) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def unet_model_config(unet_config: dict) -> comfy.supported_models.SD15:
    model_config = comfy.supported_models.SD15({**UNET_CONFIG, **unet_config})
    model_config.set_inference_dtype(torch.float32, None)
    return model_config


def build_unet(unet_config: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """An SD1.5-architecture MODEL of the given (partial) configuration, weights uninitialised."""
    base_model = unet_model_config(unet_config or {}).get_model({})
    return _patcher(base_model)


@functools.lru_cache(maxsize=8)
def _clip_class(config_json: str) -> type:
    config = json.loads(config_json)

    class MiniClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            super().__init__(
                device=device,
                dtype=dtype,
                model_options=model_options or {},
                clip_model=functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(config)),
                **kwargs,
            )

    return MiniClipModel


def build_clip(clip_config: dict | None = None) -> comfy.sd.CLIP:
    """An SD1-style text encoder of the given (partial) configuration on ComfyUI's SD1 tokenizer."""
    config = {**CLIP_CONFIG, **(clip_config or {})}
    target = comfy.supported_models_base.ClipTarget(
        comfy.sd1_clip.SD1Tokenizer, _clip_class(json.dumps(config, sort_keys=True))
    )
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})


def build_vae(state_dict: dict, ddconfig: dict | None = None) -> comfy.sd.VAE:
    """ComfyUI's AutoencoderKL with a small ``ddconfig`` (4-channel latent, 8× down-sampling)."""
    config = {"params": {"embed_dim": VAE_EMBED_DIM, "ddconfig": {**VAE_DDCONFIG, **(ddconfig or {})}}}
    return comfy.sd.VAE(sd=state_dict, config=config, dtype=torch.float32)


# -- configurations from shapes --------------------------------------------------------------------


def detect_unet_config(state_dict: dict, prefix: str = UNET_PREFIX) -> dict:
    """ComfyUI's own UNet detection; refuses what is not a 4-channel SD1-style UNet."""
    config = comfy.model_detection.detect_unet_config(state_dict, prefix)
    if config is None or "model_channels" not in config or config.get("adm_in_channels") is not None:
        raise FamilyError("the UNet weights are not an SD1-architecture UNet (no input_blocks / model channels)")
    if config.get("in_channels") != 4 or config.get("out_channels", 4) != 4:
        raise FamilyError(f"the UNet takes {config.get('in_channels')} latent channels; the family's take 4")
    if config.get("use_linear_in_transformer"):
        raise FamilyError("the UNet uses linear transformer projections (SD2-style); the family's SD1 UNets do not")
    return {key: value for key, value in config.items() if key in UNET_CONFIG}


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in keys if (m := regex.match(key))}
    return max(found) + 1 if found else 0


def detect_clip_config(state_dict: dict, prefix: str = "clip_l.transformer.text_model.") -> dict:
    """Width, depth and MLP width of an SD1 text encoder from its shapes (heads: the family's 32-wide)."""
    token = state_dict.get(f"{prefix}embeddings.token_embedding.weight")
    if token is None:
        raise FamilyError("the text encoder weights have no token embedding (is this an SD1-style text encoder?)")
    vocab, width = token.shape
    layers = _count(state_dict, re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
    mlp = state_dict[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0]
    positions = state_dict[f"{prefix}embeddings.position_embedding.weight"].shape[0]
    if width % CLIP_HEAD_WIDTH or vocab != VOCAB_SIZE or positions != 77:
        raise FamilyError(
            f"the text encoder (width {width}, vocabulary {vocab}, {positions} positions) is not a family member"
        )
    return {
        "hidden_size": width,
        "num_hidden_layers": layers,
        "intermediate_size": mlp,
        "num_attention_heads": width // CLIP_HEAD_WIDTH,
        "projection_dim": width,
    }


def detect_vae_ddconfig(state_dict: dict) -> dict:
    """An AutoencoderKL ``ddconfig`` from its shapes (the family's: no attention, 8× down-sampling)."""
    try:
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        levels = _count(state_dict, r"encoder\.down\.(\d+)\.")
        blocks = _count(state_dict, r"encoder\.down\.0\.block\.(\d+)\.")
        mult = [state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
        z_channels = state_dict["decoder.conv_in.weight"].shape[1]
        embed_dim = state_dict["post_quant_conv.weight"].shape[1]
    except KeyError as error:
        raise FamilyError(f"the VAE weights lack {error}: not an AutoencoderKL") from None
    if any(".attn." in key for key in state_dict) or levels != 4 or z_channels != 4 or embed_dim != 4:
        raise FamilyError("the VAE is not a family member (4 levels, 4 latent channels, no attention)")
    return {"ch": ch, "ch_mult": mult, "num_res_blocks": blocks, "z_channels": z_channels}


# -- loading -----------------------------------------------------------------------------------------


def split_checkpoint(state_dict: dict) -> tuple[dict, dict, dict]:
    """(UNet keys with prefix, text encoder keys as ``clip_l.…``, VAE keys without prefix) of a checkpoint dict."""
    unet = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    clip = comfy.supported_models.SD15(dict(UNET_CONFIG)).process_clip_state_dict(
        {k: v for k, v in state_dict.items() if k.startswith(CLIP_PREFIX)}
    )
    vae = {k.removeprefix(VAE_PREFIX): v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    return unet, clip, vae


def load_unet(unet_sd: dict, name: str) -> comfy.model_patcher.ModelPatcher:
    model_config = unet_model_config(detect_unet_config(unet_sd))
    base_model = model_config.get_model(unet_sd, UNET_PREFIX)
    expected = {UNET_PREFIX + k for k in base_model.diffusion_model.state_dict()}
    _check_keys(name, "UNet", expected, set(unet_sd))
    base_model.load_model_weights(unet_sd, UNET_PREFIX)
    return _patcher(base_model)


def load_clip(clip_sd: dict, name: str) -> comfy.sd.CLIP:
    clip = build_clip(detect_clip_config(clip_sd))
    expected = {
        k for k in clip.cond_stage_model.state_dict() if not k.endswith(("logit_scale", "text_projection.weight"))
    }
    _check_keys(
        name,
        "text encoder",
        expected,
        set(clip_sd) - {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"},
    )
    clip.load_sd(clip_sd, full_model=True)
    # SD1 checkpoints carry no text projection (only the pooled output, which SD1 UNets ignore, uses it);
    # ComfyUI leaves it uninitialised. The identity keeps that output finite and deterministic.
    projection = clip.cond_stage_model.clip_l.transformer.text_projection.weight
    if "clip_l.transformer.text_projection.weight" not in clip_sd:
        with torch.no_grad():
            projection.copy_(torch.eye(projection.shape[0], dtype=projection.dtype))
    return clip


def load_vae(vae_sd: dict, name: str) -> comfy.sd.VAE:
    vae = without_missing_key_log(build_vae, vae_sd, detect_vae_ddconfig(vae_sd))
    expected = set(vae.first_stage_model.state_dict())
    _check_keys(name, "VAE", expected, set(vae_sd))
    return vae


def _check_keys(name: str, part: str, expected: set[str], found: set[str]) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise FamilyError(f"{name}: the {part} weights do not match a family member ({detail})")


def load_checkpoint_state(state_dict: dict, name: str) -> tuple:
    """(MODEL, CLIP, VAE) of a family checkpoint dict in ComfyUI's checkpoint layout."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FamilyError(f"{name}: tensor '{key}' contains NaN or infinite values")
    unet_sd, clip_sd, vae_sd = split_checkpoint(state_dict)
    for part, found in (("UNet (model.diffusion_model.*)", unet_sd), ("text encoder", clip_sd), ("VAE", vae_sd)):
        if not found:
            raise FamilyError(f"{name} has no {part} weights: a family checkpoint holds all three")
    return load_unet(unet_sd, name), load_clip(clip_sd, name), load_vae(vae_sd, name)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    file = SafetensorsFile(path)
    return {key: file[key] for key in file.keys()}


def load_checkpoint_file(path: Path) -> tuple:
    """(MODEL, CLIP, VAE) of a checkpoint of a family member (e.g. written by CheckpointSave)."""
    return load_checkpoint_state(read_safetensors(path), Path(path).name)


def expand_vocabulary(text_encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored text encoder with its full token table (rows outside the family's vocabulary are zero)."""
    if VOCAB_IDS_KEY not in text_encoder:
        return dict(text_encoder)
    ids, rows = text_encoder[VOCAB_IDS_KEY].long(), text_encoder[VOCAB_ROWS_KEY]
    table = torch.zeros(VOCAB_SIZE, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    out = {k: v for k, v in text_encoder.items() if k not in (VOCAB_IDS_KEY, VOCAB_ROWS_KEY)}
    out[TOKEN_EMBEDDING_KEY] = table
    return out


def compact_vocabulary(text_encoder: dict[str, torch.Tensor], token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`expand_vocabulary`: keep only the rows of ``token_ids``."""
    out = {k: v for k, v in text_encoder.items() if k != TOKEN_EMBEDDING_KEY}
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int32)
    out[VOCAB_IDS_KEY] = ids
    out[VOCAB_ROWS_KEY] = text_encoder[TOKEN_EMBEDDING_KEY][ids.long()].clone()
    return out


# -- the committed family ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    unet: str
    description: str
    lora: str | None = None


def read_manifest(folder: Path = FAMILY_DIR) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {"variants": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def variants(folder: Path = FAMILY_DIR) -> dict[str, Variant]:
    """The family's variants whose files are present, in manifest order."""
    manifest = read_manifest(folder)
    found = {}
    for name, entry in manifest.get("variants", {}).items():
        files = [entry["unet"], *([entry["lora"]] if entry.get("lora") else [])]
        if all((folder / file).is_file() for file in files):
            found[name] = Variant(name, entry["unet"], entry.get("description", ""), entry.get("lora"))
    return found


def family_state(variant: str, folder: Path = FAMILY_DIR) -> dict[str, torch.Tensor]:
    """The checkpoint dict (UNet + text encoder + VAE) of one variant (LoRAs are applied by :func:`load_variant`)."""
    available = variants(folder)
    if variant not in available:
        raise FamilyError(
            f"the mini family has no variant '{variant}' in {folder} (available: {', '.join(available) or 'none'})"
        )
    manifest = read_manifest(folder)
    state = read_safetensors(folder / available[variant].unet)
    state.update(expand_vocabulary(read_safetensors(folder / manifest["text_encoder"])))
    state.update(read_safetensors(folder / manifest["vae"]))
    return state


def load_variant(variant: str = "base", folder: Path = FAMILY_DIR) -> tuple:
    """(MODEL, CLIP, VAE) of a variant of the committed family (a range expert: base + its LoRA at strength 1)."""
    model, clip, vae = load_checkpoint_state(family_state(variant, folder), variant)
    lora_file = variants(folder)[variant].lora
    if lora_file:
        lora = read_safetensors(folder / lora_file)
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return model, clip, vae


# -- sampling (benches, tests, examples) ---------------------------------------------------------------


def encode(clip: comfy.sd.CLIP, text: str) -> list:
    """What CLIPTextEncode outputs for ``text``."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_latents(
    model,
    positive: list,
    negative: list,
    count: int,
    seed: int,
    steps: int = 20,
    cfg: float = 4.0,
    sampler: str = "euler",
    scheduler: str = "normal",
) -> torch.Tensor:
    """``count`` latents [count, 4, 4, 4] through ComfyUI's KSampler path (noise from ``seed`` as KSampler)."""
    latent = torch.zeros(count, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed, disable_pbar=True
    )


def sample_images(model, clip, vae, prompts: list[str], seed: int = 0, negative: str = "", **sampling) -> torch.Tensor:
    """One picture per prompt, [N, 3, 32, 32] in [0, 1]; prompts are sampled in groups of equal text.

    Each group's noise comes from ``seed + index of the group's first prompt``, so a prompt list's
    pictures do not depend on how it is ordered within equal prompts.
    """
    negative_cond = encode(clip, negative)
    images = torch.empty(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)
    groups: dict[str, list[int]] = {}
    for index, text in enumerate(prompts):
        groups.setdefault(text, []).append(index)
    for text, indices in groups.items():
        latents = sample_latents(model, encode(clip, text), negative_cond, len(indices), seed + indices[0], **sampling)
        decoded = vae.decode(latents)  # [n, H, W, 3] in [0, 1]
        images[indices] = decoded.movedim(-1, 1).float().cpu()
    return images


def image_grid(images: torch.Tensor, columns: int, scale: int = 1, gap: int = 1) -> torch.Tensor:
    """[N, 3, H, W] → one [3, rows·(H+gap), columns·(W+gap)] picture (nearest-neighbour ``scale``)."""
    count, channels, height, width = images.shape
    rows = (count + columns - 1) // columns
    grid = torch.ones(channels, rows * (height + gap) + gap, columns * (width + gap) + gap)
    for index in range(count):
        r, c = divmod(index, columns)
        top, left = gap + r * (height + gap), gap + c * (width + gap)
        grid[:, top : top + height, left : left + width] = images[index]
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid
