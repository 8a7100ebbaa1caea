"""Train the mini model family (docs/mini-family.md): one seeded command per model, or the whole family.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/family/train_family.py vae      --out mini_models
    OMP_NUM_THREADS=1 .venv/bin/python scripts/family/train_family.py base     --out mini_models
    OMP_NUM_THREADS=1 .venv/bin/python scripts/family/train_family.py finetune --variant a --out mini_models
    OMP_NUM_THREADS=1 .venv/bin/python scripts/family/train_family.py experts  --out mini_models
    OMP_NUM_THREADS=1 .venv/bin/python scripts/family/train_family.py all      --out mini_models
    .venv/bin/python scripts/family/train_family.py all --preset gpu --device cuda --out /tmp/family-gpu

Stages depend on each other in this order: classifier (scripts/family/train_classifier.py, used only for
the evaluation printed at the end of each stage), vae, base (UNet + text encoder), finetune (UNet only, text
encoder and VAE shared), experts (DeMe range-expert LoRAs of base, trained by the pack's own trainer).
Each stage writes its weights (fp16) into ``--out`` and records itself in ``--out/family.json``.
``--preset dry`` trains every stage for a few steps on a few hundred images (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import FINETUNE_VARIANTS, Log, boot_comfyui, pack_module, read_training, update_manifest

CAPTION_GROUPS = ("all", "a", "b", "tops", "footwear", "bags-trousers-dresses")
# DeMe's four experts (timestep ranges, 0 = clean).
EXPERT_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))


@dataclass
class Preset:
    """Sizes and step counts of one family preset."""

    unet: dict = field(default_factory=dict)  # overrides of mini_models.UNET_CONFIG
    clip: dict = field(default_factory=dict)  # overrides of mini_models.CLIP_CONFIG
    vae: dict = field(default_factory=dict)  # overrides of mini_models.VAE_DDCONFIG
    vae_steps: int = 1800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    colourings: int = 2  # coloured copies of each training image encoded for the UNet
    base_steps: int = 8000
    base_batch: int = 64
    base_lr: float = 5e-4
    finetune_steps: int = 1500
    finetune_batch: int = 32
    finetune_lr: float = 2e-4
    expert_steps: int = 400
    expert_batch: int = 32
    expert_lr: float = 1e-3
    expert_rank: int = 4  # rank 4 keeps the committed family within its 25 MB
    expert_images: int = 4096
    ema: float = 0.999
    # Wall-clock budgets per stage (GPU presets: the run must fit a fixed time); None = steps only.
    vae_seconds: float | None = None
    base_seconds: float | None = None
    finetune_seconds: float | None = None
    classifier_epochs: int = 8
    limit: int | None = None  # use the first N training images only
    eval_per_class: int = 20
    evaluate_variants: tuple[str, ...] | None = None  # None: every variant


PRESETS = {
    "cpu": Preset(),
    # One H200: every stage has a wall-clock budget as well as steps (the whole family in about 5 minutes).
    "gpu": Preset(
        unet={"model_channels": 128, "channel_mult": [1, 2]},
        clip={"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "projection_dim": 128},
        vae={"ch": 64},
        vae_steps=6000,
        vae_batch=256,
        vae_seconds=35,
        colourings=4,
        base_steps=20000,
        base_batch=256,
        base_lr=4e-4,
        base_seconds=100,
        finetune_steps=3000,
        finetune_batch=256,
        finetune_seconds=12,
        expert_steps=300,
        expert_batch=128,
        expert_images=16384,
        ema=0.9995,
        eval_per_class=50,
    ),
    "dry": Preset(
        vae_steps=3,
        vae_batch=8,
        colourings=1,
        base_steps=3,
        base_batch=8,
        finetune_steps=2,
        finetune_batch=4,
        expert_steps=2,
        expert_batch=4,
        expert_images=32,
        limit=256,
        eval_per_class=1,
        classifier_epochs=1,
        evaluate_variants=("base",),
    ),
}


# -- helpers -----------------------------------------------------------------------------------------


def seeded_init(module: torch.nn.Module, seed: int) -> None:
    """PyTorch's default initialisation (ComfyUI's layers skip it), seeded; embeddings N(0, 0.02²)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(sub, base):
                    base.reset_parameters(sub)
            if isinstance(sub, torch.nn.Embedding):
                torch.nn.init.normal_(sub.weight, std=0.02)


def zero_output_layers(unet: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch and the output conv, as SD's UNet initialises them."""
    with torch.no_grad():
        for name, sub in unet.named_modules():
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                sub.weight.zero_()
                if sub.bias is not None:
                    sub.bias.zero_()


class EMA:
    """Exponential moving average of a module's float parameters."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are forgotten fast
        for key, value in module.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach(), 1 - decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({**module.state_dict(), **self.shadow})


class Clock:
    """Where a stage is in its schedule: its step, or — with a time budget (GPU presets) — the share of the
    budget spent, whichever is further; the stage ends when either is complete. Without a budget the
    schedule is exactly the step count, so CPU runs do not depend on the machine's speed."""

    def __init__(self, total: int, budget: float | None):
        self.total, self.budget, self.start = total, budget, time.monotonic()

    def effective_step(self, step: int) -> int:
        if self.budget is None:
            return step
        return max(step, round(self.total * (time.monotonic() - self.start) / self.budget))

    def steps(self):
        step = 0
        while step < self.total and self.effective_step(step) < self.total:
            yield step, self.effective_step(step)
            step += 1


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_fp16(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write ``state`` (floats as fp16) atomically; returns the file size in bytes."""
    writer = pack_module("merging.io").write_safetensors
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], iter(state.items()), metadata)
    return path.stat().st_size


def command_line() -> str:
    return " ".join(["scripts/family/train_family.py", *sys.argv[1:]])


# -- data ----------------------------------------------------------------------------------------------


def training_images(preset: Preset):
    """(grey [N, 1, 32, 32] uint8, labels [N]) of the training split (first ``preset.limit`` images)."""
    data = pack_module("merging.family_data")
    images, labels = data.load_split("train")
    if preset.limit:
        images, labels = images[: preset.limit], labels[: preset.limit]
    pad = (data.IMAGE_SIZE - images.shape[-1]) // 2
    return F.pad(images, (pad,) * 4).unsqueeze(1), labels


def coloured_batch(grey_uint8: torch.Tensor, colours: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    data = pack_module("merging.family_data")
    return data.colourise(grey_uint8.float() / 255.0, colours, generator)


# -- VAE -----------------------------------------------------------------------------------------------


def vae_forward(autoencoder, pixels: torch.Tensor, generator_noise: torch.Tensor | None):
    """(reconstruction, posterior mean, log variance) of pixels in [-1, 1]."""
    moments = autoencoder.quant_conv(autoencoder.encoder(pixels))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean if generator_noise is None else mean + (0.5 * logvar).exp() * generator_noise
    return autoencoder.decode(z), mean, logvar


@torch.no_grad()
def normalise_latents(autoencoder, pixels: torch.Tensor, target_std: float) -> dict:
    """Re-parametrise quant_conv / post_quant_conv so that latents have per-channel mean 0 and std
    ``target_std`` (exact: the decoder sees the same input); returns the statistics before."""
    means = torch.cat([vae_forward(autoencoder, chunk, None)[1] for chunk in pixels.split(256)])
    mu = means.mean(dim=(0, 2, 3)).double()
    sd = means.std(dim=(0, 2, 3)).double()
    scale = target_std / sd  # z' = scale · (z − μ)
    q, p = autoencoder.quant_conv, autoencoder.post_quant_conv
    channels = mu.numel()
    qw, qb = q.weight.double(), q.bias.double()
    qw[:channels] *= scale[:, None, None, None]
    qb[:channels] = scale * (qb[:channels] - mu)
    qb[channels:] += 2 * scale.log()  # the posterior's log variance scales with it
    pw, pb = p.weight.double(), p.bias.double()
    pb += (pw[:, :, 0, 0] * mu[None, :]).sum(dim=1)
    pw /= scale[None, :, None, None]
    q.weight.copy_(qw)
    q.bias.copy_(qb)
    p.weight.copy_(pw)
    p.bias.copy_(pb)
    return {"mean_before": mu.tolist(), "std_before": sd.tolist(), "target_std": target_std}


def train_vae(args, preset: Preset, log: Log) -> dict:
    boot_comfyui(args.device)
    mini = pack_module("nodes.mini_models")
    data = pack_module("merging.family_data")
    device = torch.device(args.device)
    vae = mini.without_missing_key_log(mini.build_vae, {}, preset.vae)
    autoencoder = vae.first_stage_model.to(device).float().train()
    seeded_init(autoencoder, args.seed)
    grey_images, _ = training_images(preset)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=preset.vae_lr, weight_decay=0.0)
    kl_weight = 1e-4
    start = time.monotonic()
    clock = Clock(preset.vae_steps, preset.vae_seconds)
    for step, scheduled in clock.steps():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(scheduled, preset.vae_steps, preset.vae_lr, warmup=100)
        index = torch.randint(grey_images.shape[0], (preset.vae_batch,), generator=generator)
        colours = torch.randint(len(data.COLOUR_NAMES), (preset.vae_batch,), generator=generator)
        pixels = (coloured_batch(grey_images[index], colours, generator) * 2 - 1).to(device)
        noise = torch.randn(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8, generator=generator)
        reconstruction, mean, logvar = vae_forward(autoencoder, pixels, noise.to(device))
        mse = F.mse_loss(reconstruction, pixels)
        l1 = F.l1_loss(reconstruction, pixels)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = mse + 0.5 * l1 + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == preset.vae_steps - 1:
            log(f"vae step {step}/{preset.vae_steps}: mse {mse.item():.5f} l1 {l1.item():.4f} kl {kl.item():.3f}")
    seconds, steps_done = time.monotonic() - start, step + 1
    autoencoder.eval()
    probe_generator = torch.Generator().manual_seed(args.seed + 1)
    probe = grey_images[: min(4096, grey_images.shape[0])]
    probe_colours = torch.randint(len(data.COLOUR_NAMES), (probe.shape[0],), generator=probe_generator)
    probe_pixels = (coloured_batch(probe, probe_colours, probe_generator) * 2 - 1).to(device)
    latent_scale = 1.0 / comfy_latent_scale()
    stats = normalise_latents(autoencoder, probe_pixels, latent_scale)
    state = {mini.VAE_PREFIX + k: v for k, v in autoencoder.state_dict().items()}
    evaluation = evaluate_vae(args, autoencoder, device)
    metadata = {"dm_family": json.dumps({"stage": "vae", "steps": steps_done, "seed": args.seed})}
    size = save_fp16(args.out / "vae.safetensors", state, metadata)
    record = {
        "file": "vae.safetensors",
        "bytes": size,
        "train_seconds": round(seconds, 1),
        "steps": steps_done,
        "batch": preset.vae_batch,
        "kl_weight": kl_weight,
        "parameters": sum(p.numel() for p in autoencoder.parameters()),
        "latent_statistics": stats,
        "evaluation": evaluation,
        "command": command_line(),
    }
    update_manifest(args.out, vae="vae.safetensors", training={**read_training(args.out), "vae": record})
    log(f"vae saved ({size / 1e6:.2f} MB, {seconds / 60:.1f} min): {evaluation}")
    return record


def comfy_latent_scale() -> float:
    """SD1.5's latent scale factor (ComfyUI's ``latent_formats.SD15``): latent × this enters the UNet."""
    import comfy.latent_formats

    return float(comfy.latent_formats.SD15().scale_factor)


@torch.no_grad()
def evaluate_vae(args, autoencoder, device) -> dict:
    """Reconstruction error on coloured test images and classifier accuracy on the reconstructions."""
    data = pack_module("merging.family_data")
    metrics = pack_module("merging.family_metrics")
    test = data.coloured_split("test", seed=args.seed, limit=min(2000, args.limit_eval))
    pixels = (test.images * 2 - 1).to(device)
    reconstruction = torch.cat([vae_forward(autoencoder, chunk, None)[0] for chunk in pixels.split(250)])
    images = ((reconstruction.float().cpu() + 1) / 2).clamp(0, 1)
    result = {"test_mse_01": float(F.mse_loss(images, test.images))}
    classifier_path = args.out / "classifier.safetensors"
    if classifier_path.is_file():
        classifier = metrics.load_classifier(classifier_path)
        result["classifier_accuracy_originals"] = metrics.class_accuracy(
            metrics.predict(classifier, test.images), test.labels
        )
        result["classifier_accuracy_reconstructions"] = metrics.class_accuracy(
            metrics.predict(classifier, images), test.labels
        )
        result["colour_accuracy_reconstructions"] = metrics.colour_accuracy(images, test.colours)
    if args.grid_dir is not None:
        save_grid(args.grid_dir / "vae_reconstructions.png", torch.cat([test.images[:16], images[:16]]), columns=16)
    return result


def save_grid(path: Path, images: torch.Tensor, columns: int, scale: int = 3) -> None:
    from PIL import Image

    mini = pack_module("nodes.mini_models")
    grid = mini.image_grid(images.clamp(0, 1), columns, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


# -- latents and captions -------------------------------------------------------------------------------


@dataclass
class LatentSet:
    """Training latents in model space (VAE latent × SD1.5's scale factor) with their classes and colours."""

    latents: torch.Tensor  # [N, 4, 4, 4]
    labels: torch.Tensor
    colours: torch.Tensor

    def subset(self, classes) -> LatentSet:
        keep = torch.isin(self.labels, torch.tensor(classes))
        return LatentSet(self.latents[keep], self.labels[keep], self.colours[keep])


def load_family_vae(out: Path):
    mini = pack_module("nodes.mini_models")
    state = mini.read_safetensors(out / "vae.safetensors")
    return mini.load_vae({k.removeprefix(mini.VAE_PREFIX): v for k, v in state.items()}, "vae.safetensors")


def latent_cache_path(args, preset: Preset) -> Path:
    """Where the encoded training set of this VAE, seed, colourings and image limit is cached."""
    digest = hashlib.sha256((args.out / "vae.safetensors").read_bytes())
    digest.update(json.dumps([args.seed, preset.colourings, preset.limit]).encode())
    return Path(tempfile.gettempdir()) / "dm-family-cache" / f"latents-{digest.hexdigest()[:16]}.safetensors"


def encode_training_set(args, preset: Preset, log: Log) -> LatentSet:
    """The training set encoded once per VAE (cached in the temporary folder: fine-tunes and experts reuse it)."""
    path = latent_cache_path(args, preset)
    if path.is_file():
        cached = pack_module("nodes.mini_models").read_safetensors(path)
        log(f"latents from the cache {path}")
        return LatentSet(cached["latents"], cached["labels"], cached["colours"])
    result = _encode_training_set(args, preset, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": result.latents, "labels": result.labels, "colours": result.colours}
    writer = pack_module("merging.io").write_safetensors
    writer(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], iter(tensors.items()), {})
    return result


@torch.no_grad()
def _encode_training_set(args, preset: Preset, log: Log) -> LatentSet:
    """Every training image in ``preset.colourings`` seeded colourings, encoded by ComfyUI's VAE Encode path."""
    data = pack_module("merging.family_data")
    vae = load_family_vae(args.out)
    grey_images, labels = training_images(preset)
    scale = comfy_latent_scale()
    latents, all_labels, all_colours = [], [], []
    for colouring in range(preset.colourings):
        generator = torch.Generator().manual_seed(args.seed + 100 + colouring)
        colours = torch.randint(len(data.COLOUR_NAMES), (labels.shape[0],), generator=generator)
        for start in range(0, labels.shape[0], 1000):
            pixels = coloured_batch(grey_images[start : start + 1000], colours[start : start + 1000], generator)
            latents.append(vae.encode(pixels.movedim(1, -1)).float().cpu() * scale)
        all_labels.append(labels)
        all_colours.append(colours)
        log(f"encoded colouring {colouring + 1}/{preset.colourings} ({labels.shape[0]} images)")
    result = LatentSet(torch.cat(latents), torch.cat(all_labels), torch.cat(all_colours))
    log(f"latents: {tuple(result.latents.shape)}, std {result.latents.std():.3f}, mean {result.latents.mean():.3f}")
    return result


class CaptionEncoder:
    """The family's captions as token lists, encoded with gradients through the text encoder's own forward."""

    def __init__(self, clip):
        data = pack_module("merging.family_data")
        self.captions = data.all_captions()
        self.tokens = [[token for token, _ in clip.tokenize(text)["l"][0]] for text in self.captions]
        self.text_model = clip.cond_stage_model.clip_l
        self.index = {text: i for i, text in enumerate(self.captions)}

    @contextlib.contextmanager
    def trainable(self):
        """Within: the text encoder can be trained. Its layers add their residuals out of place (ComfyUI's add
        in place, which autograd cannot differentiate through), and the token table is replaced by a small
        table of the vocabulary's rows (ComfyUI looks tokens up one caption at a time, and each lookup's
        backward would fill a dense 49408-row gradient). Checked to give the same output as ComfyUI's forward;
        on exit the trained rows are written back into the full table (other rows zero)."""
        caption_ids = torch.arange(len(self.captions))
        with torch.no_grad():
            reference = self(caption_ids)
        transformer = self.text_model.transformer.text_model
        embeddings, layers = transformer.embeddings, transformer.encoder.layers
        full_table = embeddings.token_embedding
        vocabulary = torch.tensor(self.vocabulary())
        embeddings.token_embedding = VocabularyEmbedding(full_table.weight, vocabulary)
        for layer in layers:
            layer.forward = _out_of_place_layer(layer)
        try:
            with torch.no_grad():
                difference = (self(caption_ids) - reference).abs().max().item()
            if difference > 1e-4:
                raise RuntimeError(f"the trainable text encoder differs from ComfyUI's forward by {difference}")
            yield
        finally:
            for layer in layers:
                del layer.forward
            with torch.no_grad():
                full_table.weight.zero_()
                full_table.weight[vocabulary] = embeddings.token_embedding.rows.to(full_table.weight.dtype)
            embeddings.token_embedding = full_table

    def vocabulary(self) -> list[int]:
        return sorted({token for tokens in self.tokens for token in tokens})

    def __call__(self, caption_ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = caption_ids.unique(return_inverse=True)
        encoded, _ = self.text_model([self.tokens[i] for i in unique.tolist()])
        return encoded[inverse]


class VocabularyEmbedding(torch.nn.Module):
    """A token table holding only the vocabulary's rows (every other token embeds as zeros)."""

    def __init__(self, table: torch.Tensor, vocabulary: torch.Tensor):
        super().__init__()
        self.rows = torch.nn.Parameter(table.detach()[vocabulary].clone())
        row_of = torch.full((table.shape[0],), vocabulary.numel(), dtype=torch.long)
        row_of[vocabulary] = torch.arange(vocabulary.numel())
        self.register_buffer("row_of", row_of, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """ComfyUI reads the table's device from ``weight``."""
        return self.rows

    def forward(self, tokens: torch.Tensor, out_dtype=None) -> torch.Tensor:
        padded = torch.cat([self.rows, self.rows.new_zeros(1, self.rows.shape[1])])
        out = padded[self.row_of.to(tokens.device)[tokens]]
        return out if out_dtype is None else out.to(out_dtype)


def _out_of_place_layer(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


def family_clip_state(clip, vocabulary: list[int]) -> dict:
    """The text encoder in checkpoint layout (as CheckpointSave writes it), its token table compacted."""
    mini = pack_module("nodes.mini_models")
    import comfy.supported_models

    layout = comfy.supported_models.SD15(dict(mini.UNET_CONFIG)).process_clip_state_dict_for_saving(
        dict(clip.cond_stage_model.state_dict())
    )
    return mini.compact_vocabulary(layout, vocabulary)


def model_alphas(base_model) -> torch.Tensor:
    """ᾱ_t of the model's own discrete schedule (σ_t² = (1 − ᾱ_t) / ᾱ_t)."""
    sigmas = base_model.model_sampling.sigmas.double()
    return (1.0 / (1.0 + sigmas**2)).float()


def diffusion_loss(unet, alphas, x0, context, generator, device) -> torch.Tensor:
    """SD's ε-prediction loss at uniform integer timesteps."""
    t = torch.randint(0, alphas.shape[0], (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    a = alphas[t].to(device).view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(noisy, t.float().to(device), context=context), noise)


def train_denoiser(
    args, preset, log, unet, latents: LatentSet, text, clip_trainable, steps, lr, label, batch, seconds=None
):
    """The shared loop of base training and fine-tunes; returns (seconds, final mean loss)."""
    data = pack_module("merging.family_data")
    device = torch.device(args.device)
    mini_alphas = model_alphas(args.base_model)
    parameters = list(unet.parameters()) + (list(text.text_model.parameters()) if clip_trainable else [])
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 7)
    ema_unet = EMA(unet, preset.ema)
    ema_text = EMA(text.text_model, preset.ema) if clip_trainable else None
    x_all = latents.latents.to(device)
    start, running = time.monotonic(), []
    clock = Clock(steps, seconds)
    for step, scheduled in clock.steps():
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(scheduled, steps, lr, warmup=min(500, steps // 10 + 1))
        index = torch.randint(x_all.shape[0], (batch,), generator=generator)
        caption_ids = data.draw_caption_ids(latents.labels[index], latents.colours[index], generator)
        context = text(caption_ids).to(device)
        if not clip_trainable:
            context = context.detach()
        loss = diffusion_loss(unet, mini_alphas, x_all[index.to(device)], context, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema_unet.update(unet, step)
        if ema_text is not None:
            ema_text.update(text.text_model, step)
        running.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            recent = sum(running[-200:]) / len(running[-200:])
            elapsed = time.monotonic() - start
            log(f"{label} step {step}/{steps}: loss {recent:.4f} ({elapsed / (step + 1):.2f} s/step)")
    ema_unet.copy_to(unet)
    if ema_text is not None:
        ema_text.copy_to(text.text_model)
    args.steps_done = step + 1
    return time.monotonic() - start, sum(running[-500:]) / len(running[-500:])


def train_base(args, preset: Preset, log: Log) -> dict:
    boot_comfyui(args.device)
    mini = pack_module("nodes.mini_models")
    device = torch.device(args.device)
    latents = encode_training_set(args, preset, log)
    patcher = mini.build_unet(preset.unet)
    args.base_model = patcher.model
    unet = patcher.model.diffusion_model.to(device).float().train()
    seeded_init(unet, args.seed + 10)
    zero_output_layers(unet)
    clip = mini.build_clip(preset.clip)
    text = CaptionEncoder(clip)
    text.text_model.to(device).train().requires_grad_(True)
    seeded_init(text.text_model, args.seed + 11)
    zero_unused_tokens(text)
    with text.trainable():
        seconds, final_loss = train_denoiser(
            args,
            preset,
            log,
            unet,
            latents,
            text,
            True,
            preset.base_steps,
            preset.base_lr,
            "base",
            preset.base_batch,
            preset.base_seconds,
        )
    unet.eval()
    text.text_model.eval()
    text_state = family_clip_state(clip, text.vocabulary())
    size_text = save_fp16(args.out / "text_encoder.safetensors", text_state, stage_metadata(args, "text_encoder"))
    record = save_unet(args, preset, unet, "base", "all ten classes", seconds, final_loss, args.steps_done)
    record["text_encoder_bytes"] = size_text
    record["text_encoder_parameters"] = sum(p.numel() for p in text.text_model.parameters())
    update_manifest(
        args.out, text_encoder="text_encoder.safetensors", training={**read_training(args.out), "base": record}
    )
    return record


@torch.no_grad()
def zero_unused_tokens(text: CaptionEncoder) -> None:
    """Tokens outside the family's captions never train: zero rows, which is also how they are stored."""
    table = text.text_model.transformer.get_input_embeddings().weight
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[text.vocabulary()] = True
    table[~keep] = 0


def stage_metadata(args, stage: str) -> dict[str, str]:
    return {"dm_family": json.dumps({"stage": stage, "seed": args.seed, "command": command_line()})}


def save_unet(
    args, preset, unet, variant: str, description: str, seconds: float, final_loss: float, steps: int
) -> dict:
    mini = pack_module("nodes.mini_models")
    file = f"unet/{variant}.safetensors"
    state = {mini.UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    size = save_fp16(args.out / file, state, stage_metadata(args, variant))
    update_manifest(args.out, variants={variant: {"unet": file, "description": description}})
    record = {
        "file": file,
        "bytes": size,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_seconds": round(seconds, 1),
        "steps": steps,
        "final_loss": round(final_loss, 5),
        "command": command_line(),
    }
    log_line = f"{variant} saved ({size / 1e6:.2f} MB, {seconds / 60:.1f} min, loss {final_loss:.4f})"
    print(log_line, flush=True)
    return record


def train_finetune(args, preset: Preset, log: Log) -> dict:
    boot_comfyui(args.device)
    mini = pack_module("nodes.mini_models")
    data = pack_module("merging.family_data")
    device = torch.device(args.device)
    variant = args.variant
    classes = data.CLASS_GROUPS[variant]
    latents = encode_training_set(args, preset, log).subset(classes)
    model, clip, _ = mini.load_variant("base", args.out)
    args.base_model = model.model
    unet = model.model.diffusion_model.to(device).float().train().requires_grad_(True)
    text = CaptionEncoder(clip)
    text.text_model.to(device).eval()
    seconds, final_loss = train_denoiser(
        args,
        preset,
        log,
        unet,
        latents,
        text,
        False,
        preset.finetune_steps,
        preset.finetune_lr,
        variant,
        preset.finetune_batch,
        preset.finetune_seconds,
    )
    unet.eval()
    record = save_unet(
        args,
        preset,
        unet,
        variant,
        f"fine-tune of base on {FINETUNE_VARIANTS[variant]}",
        seconds,
        final_loss,
        args.steps_done,
    )
    record["classes"] = list(classes)
    update_manifest(args.out, training={**read_training(args.out), variant: record})
    return record


def train_experts(args, preset: Preset, log: Log) -> dict:
    """DeMe's four range experts: LoRAs of base trained by the pack's own DM_TrainRangeExpertLoRA code."""
    boot_comfyui(args.device)
    mini = pack_module("nodes.mini_models")
    training = pack_module("nodes.training")
    data = pack_module("merging.family_data")
    latents = encode_training_set(args, preset, log)
    generator = torch.Generator().manual_seed(args.seed + 20)
    chosen = torch.randperm(latents.latents.shape[0], generator=generator)[: preset.expert_images]
    caption_ids = data.draw_caption_ids(latents.labels[chosen], latents.colours[chosen], generator)
    model, clip, _ = mini.load_variant("base", args.out)
    captions = data.all_captions()
    encoded = {i: mini.encode(clip, captions[i])[0][0] for i in caption_ids.unique().tolist()}
    positive = [[encoded[i], {}] for i in caption_ids.tolist()]
    # The trainer takes LATENTs as VAE Encode outputs them: undo the model-space scale.
    samples = {"samples": latents.latents[chosen] / comfy_latent_scale()}
    records = {}
    for low, high in EXPERT_RANGES:
        name = f"expert-{low:03d}-{high:03d}"
        start = time.monotonic()
        with torch.inference_mode():
            output = training.TrainRangeExpertLoRANode.execute(
                model, samples, positive, range_unit="timestep", range_min=float(low), range_max=float(high),
                antithetic=True, loss_space="eps/v", steps=preset.expert_steps, batch_size=preset.expert_batch,
                learning_rate=preset.expert_lr, rank=preset.expert_rank, seed=args.seed,
                training_dtype="fp32", lora_dtype="fp32",
                gradient_checkpointing=False, grad_clip=1.0,
            )  # fmt: skip
        seconds = time.monotonic() - start
        lora, loss_log = output.result[1], output.result[2]
        file = f"lora/{name}.safetensors"
        size = save_fp16(args.out / file, lora, stage_metadata(args, name))
        description = f"base + DeMe range expert LoRA for timesteps {low}–{high} (0 = clean)"
        update_manifest(
            args.out, variants={name: {"unet": "unet/base.safetensors", "lora": file, "description": description}}
        )
        losses = loss_log["loss"]
        records[name] = {
            "file": file,
            "bytes": size,
            "train_seconds": round(seconds, 1),
            "steps": preset.expert_steps,
            "batch": preset.expert_batch,
            "images": int(chosen.numel()),
            "timesteps": [low, high],
            "eval_range_loss_before_after": loss_log.get("eval_range_loss"),
            "loss_first_last_50": [sum(losses[:50]) / len(losses[:50]), sum(losses[-50:]) / len(losses[-50:])],
            "command": command_line(),
        }
        before_after = records[name]["eval_range_loss_before_after"]
        log(f"{name} saved ({size / 1e6:.2f} MB, {seconds / 60:.1f} min): range loss before/after {before_after}")
    update_manifest(args.out, training={**read_training(args.out), **records})
    return records


# -- evaluation ------------------------------------------------------------------------------------------


def evaluate_variant(args, variant: str, classifier, reference, per_class: int, cfg: float, log: Log) -> dict:
    """Metrics of ``per_class`` samples of each class ("a <colour> <class>", 20 Euler steps) via KSampler's path."""
    mini = pack_module("nodes.mini_models")
    metrics = pack_module("merging.family_metrics")
    model, clip, vae = mini.load_variant(variant, args.out)
    prompts, targets, colours = pack_module("merging.family_data").class_colour_prompts(range(10), per_class)
    start = time.monotonic()
    images = mini.sample_images(model, clip, vae, prompts, seed=args.seed, steps=20, cfg=cfg)
    result = metrics.evaluate(classifier, images, targets, colours, reference)
    predicted = metrics.predict(classifier, images).classes
    result["per_class_accuracy"] = [float((predicted[targets == k] == k).float().mean()) for k in range(10)]
    result["cfg"], result["steps"], result["sample_seconds"] = cfg, 20, round(time.monotonic() - start, 1)
    if args.grid_dir is not None:
        order = torch.arange(len(prompts)).view(10, per_class)[:, : min(per_class, 10)].flatten()
        save_grid(args.grid_dir / f"samples_{variant}_cfg{cfg:g}.png", images[order], columns=min(per_class, 10))
    log(
        f"evaluate {variant} cfg {cfg}: class acc {result['class_accuracy']:.3f}, colour acc "
        f"{result['colour_accuracy']:.3f}, classifier FID {result['classifier_fid']:.2f}"
    )
    return result


def showcase_grid(args, log: Log) -> Path:
    """One picture per (colour, garment) of a variant: rows = colours, columns = garments (README picture)."""
    boot_comfyui(args.device)
    mini = pack_module("nodes.mini_models")
    data = pack_module("merging.family_data")
    variant = (args.variants or ["base"])[0]
    model, clip, vae = mini.load_variant(variant, args.out)
    prompts = [data.caption(k, c) for c in range(len(data.COLOUR_NAMES)) for k in range(len(data.CLASS_NAMES))]
    images = mini.sample_images(model, clip, vae, prompts, seed=args.seed, steps=20, cfg=args.cfg[0])
    path = args.grid_dir / f"mini_family_{variant}.png"
    save_grid(path, images, columns=len(data.CLASS_NAMES), scale=3)
    log(f"grid of {variant} (cfg {args.cfg[0]:g}, seed {args.seed}) → {path}")
    return path


def evaluate_family(args, preset: Preset, log: Log) -> dict:
    boot_comfyui(args.device)
    mini = pack_module("nodes.mini_models")
    metrics = pack_module("merging.family_metrics")
    classifier = metrics.load_classifier(args.out / "classifier.safetensors")
    reference = metrics.reference_features(classifier)
    names = args.variants or preset.evaluate_variants or list(mini.variants(args.out))
    results = {}
    for cfg in args.cfg:
        for name in names:
            results.setdefault(name, {})[f"cfg {cfg:g}"] = evaluate_variant(
                args, name, classifier, reference, preset.eval_per_class, cfg, log
            )
    manifest = update_manifest(args.out)
    evaluation = manifest.get("evaluation", {})
    for name, by_cfg in results.items():
        evaluation.setdefault(name, {}).update(by_cfg)
    update_manifest(args.out, evaluation=evaluation)
    return results


# -- entry point ---------------------------------------------------------------------------------------


def train_classifier(args, preset: Preset) -> dict:
    import train_classifier as classifier_script

    argv = ["--out", str(args.out), "--seed", str(args.seed), "--device", args.device]
    argv += ["--threads", str(args.threads), "--epochs", str(preset.classifier_epochs)]
    argv += ["--limit", str(preset.limit)] if preset.limit else []
    argv += ["--log", str(args.log)] if args.log else []
    result = classifier_script.main(argv)
    record = {**result, "file": "classifier.safetensors", "command": command_line()}
    update_manifest(
        args.out, classifier="classifier.safetensors", training={**read_training(args.out), "classifier": record}
    )
    return result


def replace_namespace(args, **changes) -> argparse.Namespace:
    new = copy.copy(args)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "stage", choices=["classifier", "vae", "base", "finetune", "experts", "evaluate", "grid", "all"]
    )
    parser.add_argument("--out", type=Path, required=True, help="the family folder (mini_models for the pack's own)")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--variant", choices=list(FINETUNE_VARIANTS), help="finetune: which class group")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps of this stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--cfg", type=float, nargs="+", default=[4.0], help="evaluate: CFG scales to sample at")
    parser.add_argument("--variants", nargs="+", default=None, help="evaluate: these variants (default: all)")
    parser.add_argument("--grid-dir", type=Path, default=None, help="write picture grids (PNG) into this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        field_name = {"vae": "vae_steps", "base": "base_steps", "finetune": "finetune_steps", "experts": "expert_steps"}
        preset = replace(preset, **{field_name[args.stage]: args.steps})
    args.out.mkdir(parents=True, exist_ok=True)
    args.limit_eval = preset.limit or 10000
    log = Log(args.log)
    log(f"{args.stage} (preset {args.preset}, device {args.device}, seed {args.seed}) → {args.out}")
    if args.stage in ("classifier", "all"):
        train_classifier(args, preset)
    if args.stage in ("vae", "all"):
        train_vae(args, preset, log)
    if args.stage in ("base", "all"):
        train_base(args, preset, log)
    if args.stage == "finetune":
        if args.variant is None:
            parser.error("finetune needs --variant")
        train_finetune(args, preset, log)
    if args.stage == "all":
        for variant in FINETUNE_VARIANTS:
            train_finetune(replace_namespace(args, variant=variant), preset, log)
    if args.stage in ("experts", "all"):
        train_experts(args, preset, log)
    if args.stage in ("evaluate", "all"):
        evaluate_family(args, preset, log)
    if args.stage == "grid":
        if args.grid_dir is None:
            parser.error("grid needs --grid-dir")
        showcase_grid(args, log)


if __name__ == "__main__":
    main()
