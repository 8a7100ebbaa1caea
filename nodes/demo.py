"""The built-in demo models: the mini family trained on coloured Fashion-MNIST (committed weights), and the
older tiny seeded checkpoint built in memory (kept so that saved workflows still load)."""

from __future__ import annotations

import folder_paths

from ..merging.family_data import CLASS_NAMES, COLOUR_NAMES
from . import demo_models, mini_models
from .common import without_missing_key_log
from .compat import io
from .types import CATEGORY

PROMPT_HELP = (
    f"It knows the prompts 'a <colour> <garment>', '<garment>' and '<colour>' with colours {', '.join(COLOUR_NAMES)} "
    f"and garments {', '.join(CLASS_NAMES)}; other words are ignored. Sample 32×32 (Empty Latent Image), "
    "20 steps, cfg about 4."
)


class DemoCheckpointLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DemoCheckpointLoader",
            display_name="Load Demo Checkpoint (tiny, built in)",
            category=f"{CATEGORY}/demo",
            description="A miniature SD1.5-architecture MODEL, CLIP and VAE with seeded weights, built in memory. "
            "It lets every example workflow run anywhere without downloads; its pictures are noise, not art. "
            "Its 'fine-tunes' change the early blocks (a), the late blocks (b), attention (c) or everything a "
            "little (d).",
            inputs=[
                io.Combo.Input(
                    "variant",
                    options=list(demo_models.VARIANTS),
                    default="base",
                    tooltip="base, or one of four deterministic 'fine-tunes' of it (for task-vector and merge demos).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    # Not a sampling seed: the editor must never randomise it after a run (its legacy rule
                    # does for INT inputs named "seed"), or the "fine-tunes" would stop sharing the base.
                    control_after_generate=False,
                    tooltip="Seed of the base weights; the same seed always builds the same model. Use the "
                    "same seed on every loader whose models should share one base.",
                ),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, variant="base", seed=0):
        model = demo_models.build_sd15(seed, variant)
        clip = demo_models.build_clip(seed, variant)
        vae = without_missing_key_log(demo_models.build_vae, seed)  # built without a state dict
        return io.NodeOutput(model, clip, vae)


class LoadMiniModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_LoadMiniModel",
            display_name="Load Mini Model (built-in garments)",
            category=f"{CATEGORY}/demo",
            description="The pack's own small model family, trained on coloured Fashion-MNIST garments and shipped "
            "with the pack (no download): an SD1.5-architecture MODEL, its text encoder (CLIP) and VAE, usable with "
            "every core node. Variants: base (all ten garments), fine-tunes of base on groups of garments (for task "
            "vectors and merges) and DeMe range experts (base + a LoRA trained on one noise range). " + PROMPT_HELP,
            inputs=[
                io.Combo.Input(
                    "variant",
                    options=_variant_names(),
                    default="base",
                    tooltip="base (all classes); a / b: fine-tunes on garments 0–4 / 5–9; tops, footwear, "
                    "bags-trousers-dresses: fine-tunes on those groups; expert-…: base with a range-expert LoRA "
                    "(timesteps in the name, 0 = clean).",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The UNet (SD1.5 architecture, 4×4×4 latent for 32×32 pictures)."),
                io.Clip.Output(tooltip="The text encoder (ComfyUI's SD1 tokenizer)."),
                io.Vae.Output(tooltip="The VAE: 32×32 RGB pictures ↔ 4×4×4 latents."),
            ],
        )

    @classmethod
    def execute(cls, variant="base"):
        return io.NodeOutput(*mini_models.load_variant(variant))


def _variant_names() -> list[str]:
    return list(mini_models.variants()) or ["base"]


class LoadMiniCheckpointNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_LoadMiniCheckpoint",
            display_name="Load Mini Checkpoint (saved family model)",
            category=f"{CATEGORY}/demo",
            description="Loads a checkpoint of a mini-family model that Save Checkpoint or Save Checkpoint (streaming) "
            "wrote, e.g. a merge of family variants. The stock checkpoint loaders cannot: they recognise SD1.5 only "
            "by its full-size widths. The sizes are read from the file's weights.",
            inputs=[
                io.Combo.Input(
                    "ckpt_name",
                    options=folder_paths.get_filename_list("checkpoints"),
                    tooltip="A .safetensors checkpoint in ComfyUI's checkpoints folder (move files from "
                    "output/checkpoints there).",
                ),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name):
        path = folder_paths.get_full_path("checkpoints", ckpt_name)
        if path is None:
            raise FileNotFoundError(f"checkpoint '{ckpt_name}' is not in ComfyUI's checkpoints folder")
        return io.NodeOutput(*mini_models.load_checkpoint_file(path))


NODES = [DemoCheckpointLoaderNode, LoadMiniModelNode, LoadMiniCheckpointNode]
