"""The built-in Wan demo: a tiny Wan-architecture expert, text encoder and video VAE, built in memory."""

from __future__ import annotations

from . import demo_models
from .common import without_missing_key_log
from .compat import io
from .types import CATEGORY


class DemoWanLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_DemoWanLoader",
            display_name="Load Demo Wan Expert (tiny, built in)",
            category=f"{CATEGORY}/demo",
            description="A miniature Wan-architecture video model (ComfyUI's Wan 2.1 network, which Wan 2.2 A14B's "
            "high- and low-noise experts use) with seeded weights, plus stand-ins for its text encoder (a tiny "
            "CLIP) and VAE (16-channel latents, decoded frame by frame). It lets the Wan 2.2 template run anywhere "
            "without the 2 × 14 B downloads; its videos are noise.",
            inputs=[
                io.Combo.Input(
                    "expert",
                    options=list(demo_models.WAN_EXPERTS),
                    default="high_noise",
                    tooltip="Which of two independently seeded networks: the stand-in for Wan 2.2's high-noise "
                    "expert or for its low-noise expert.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,  # weights, not sampling: the editor must never randomise it
                    tooltip="Seed of the weights; the same seed and expert always build the same model.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The tiny Wan expert (flow matching, 16-channel video latents)."),
                io.Clip.Output(tooltip="A tiny CLIP whose 64-wide output the tiny Wan model takes as text."),
                io.Vae.Output(tooltip="A tiny VAE for 16-channel latents; video latents decode frame by frame."),
            ],
        )

    @classmethod
    def execute(cls, expert="high_noise", seed=0):
        model = demo_models.build_wan(seed, expert)
        clip = demo_models.build_clip(seed)
        vae = without_missing_key_log(demo_models.build_video_vae, seed)  # built without a state dict
        return io.NodeOutput(model, clip, vae)


NODES = [DemoWanLoaderNode]
