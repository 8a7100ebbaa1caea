"""The Flux-dev transformer's parameter names and shapes, taken from ComfyUI's own model definition.

Running this script builds ComfyUI's ``Flux`` with the flux-dev configuration (the values
``comfy/model_detection.py`` fills in for a Flux state dict) on the meta device, so nothing is allocated,
checks that ComfyUI's model detection recognises the resulting key/shape list as Flux with guidance, and
writes it to ``bench/flux_unet_shapes.json`` in the format of ``sdxl_unet_shapes.json``. The benchmarks
read only that JSON, so they run without ComfyUI::

    .venv/bin/python bench/flux_shapes.py [--comfyui ../shared/ComfyUI]

Keys are named as in the model's own ``state_dict`` (``double_blocks.0.img_attn.qkv.weight`` …).

The committed table comes from ComfyUI 0.3.64, whose module names match Flux files. ComfyUI 0.33.0 names the
QK-norms' parameters ``…norm.weight`` in memory (files say ``…norm.scale``; its loader renames them), so a
table written there differs in those 152 keys.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sdxl_shapes import run

SHAPES_PATH = Path(__file__).with_name("flux_unet_shapes.json")

# flux-dev, as comfy/model_detection.py detect_unet_config builds it for a Flux state dict with guidance_in
FLUX_DEV_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
EXPECTED_PARAMETERS = 11_901_408_320  # FLUX.1-dev's transformer


def shapes_from_comfyui(comfyui: Path) -> dict[str, tuple[int, ...]]:
    """Build ComfyUI's Flux transformer on the meta device and read its parameter shapes."""
    sys.dont_write_bytecode = True  # never write into the ComfyUI checkout
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import comfy.model_detection
    import comfy.model_management
    import comfy.ops
    import comfy.supported_models
    import torch
    from comfy.ldm.flux.model import Flux, FluxParams

    # newer ComfyUI requires fields flux-dev's config predates: the pack's compatibility module fills them in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import comfy_in_process

    comfy_in_process.import_pack()
    compat = importlib.import_module(f"{comfy_in_process.PACK_PACKAGE}.nodes.compat")
    config = compat.complete_dit_config(FLUX_DEV_CONFIG, FluxParams)
    model = Flux(**config, dtype=torch.bfloat16, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    state = model.state_dict()
    detected = comfy.model_detection.model_config_from_unet(state, "")
    if type(detected) is not comfy.supported_models.Flux:
        raise RuntimeError(f"ComfyUI detects the generated key list as {type(detected).__name__}, not Flux")
    unet_config = comfy.model_detection.detect_unet_config(state, "")
    for name, value in FLUX_DEV_CONFIG.items():
        if unet_config.get(name) != value:
            raise RuntimeError(f"ComfyUI detects {name}={unet_config.get(name)!r}, this script has {value!r}")
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def main() -> None:
    model = "FLUX.1-dev transformer (ComfyUI comfy.ldm.flux.model.Flux, comfy/model_detection.py Flux config)"
    run(SHAPES_PATH, __doc__, shapes_from_comfyui, EXPECTED_PARAMETERS, model)


if __name__ == "__main__":
    main()
