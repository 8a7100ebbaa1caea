"""The built-in demo model: a tiny SD1.5-architecture checkpoint built in memory, no download needed."""

from __future__ import annotations

import logging

from . import demo_models
from .compat import io
from .types import CATEGORY


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
        vae_logger = logging.getLogger()
        level = vae_logger.level
        vae_logger.setLevel(logging.ERROR)  # the VAE is built without a state dict: silence "missing keys"
        try:
            vae = demo_models.build_vae(seed)
        finally:
            vae_logger.setLevel(level)
        return io.NodeOutput(model, clip, vae)


NODES = [DemoCheckpointLoaderNode]
