"""The SDXL UNet's parameter names and shapes, taken from ComfyUI's own model definition.

Running this script builds ComfyUI's ``UNetModel`` with the SDXL configuration on the meta device (no
weights are allocated), checks that ComfyUI's model detection recognises the resulting key/shape list as
SDXL, and writes it to ``bench/sdxl_unet_shapes.json``. The benchmarks read only that JSON, so they run
without ComfyUI::

    .venv/bin/python bench/sdxl_shapes.py [--comfyui ../shared/ComfyUI]

Keys are named as in the UNet's own ``state_dict`` (``input_blocks.0.0.weight`` …); checkpoints store them
under ``model.diffusion_model.``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SHAPES_PATH = Path(__file__).with_name("sdxl_unet_shapes.json")
DEFAULT_COMFYUI = Path(__file__).resolve().parents[1].parent / "shared" / "ComfyUI"

# comfy/model_detection.py's SDXL configuration (unet_config_from_diffusers_unet); checked below against
# comfy/supported_models.py SDXL.unet_config so that a drift between the two is noticed.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
EXPECTED_PARAMETERS = 2_567_463_684  # SDXL base 1.0's UNet


def load_shapes(path: Path = SHAPES_PATH) -> dict[str, tuple[int, ...]]:
    """The cached SDXL UNet key → shape list, in state-dict order."""
    with open(path) as handle:
        table = json.load(handle)
    return {key: tuple(shape) for key, shape in table["shapes"].items()}


def shapes_from_comfyui(comfyui: Path) -> dict[str, tuple[int, ...]]:
    """Build ComfyUI's SDXL UNet on the meta device and read its parameter shapes."""
    sys.dont_write_bytecode = True  # never write into the ComfyUI checkout
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import comfy.model_detection
    import comfy.model_management
    import comfy.ops
    import comfy.supported_models
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    for name, value in comfy.supported_models.SDXL.unet_config.items():
        if SDXL_UNET_CONFIG.get(name) != value:
            raise RuntimeError(
                f"ComfyUI's SDXL.unet_config has {name}={value!r}, this script {SDXL_UNET_CONFIG.get(name)!r}"
            )
    model = UNetModel(
        **SDXL_UNET_CONFIG, dtype=torch.float16, device=torch.device("meta"), operations=comfy.ops.disable_weight_init
    )
    state = model.state_dict()
    detected = comfy.model_detection.model_config_from_unet(state, "")
    if type(detected) is not comfy.supported_models.SDXL:
        raise RuntimeError(f"ComfyUI detects the generated key list as {type(detected).__name__}, not SDXL")
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def write_shape_table(shapes: dict, out: Path, expected_parameters: int, model: str) -> None:
    """Check the parameter count and write the key → shape table as JSON (shared with ``flux_shapes.py``)."""
    parameters = sum(math.prod(shape) for shape in shapes.values())
    if parameters != expected_parameters:
        raise RuntimeError(f"{parameters:,} parameters, expected {expected_parameters:,} ({model})")
    table = {
        "model": model,
        "keys": len(shapes),
        "parameters": parameters,
        "shapes": {key: list(shape) for key, shape in shapes.items()},
    }
    out.write_text(json.dumps(table, indent=1) + "\n")
    logger.info("%d keys, %s parameters → %s", len(shapes), f"{parameters:,}", out)


def run(
    shapes_path: Path,
    description: str,
    read_shapes: Callable[[Path], dict[str, tuple[int, ...]]],
    expected_parameters: int,
    model: str,
) -> None:
    """A shape script's command line (shared with ``flux_shapes.py``): ``read_shapes`` from the ComfyUI at
    ``--comfyui``, checked and written to ``--out`` (default ``shapes_path``)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH", DEFAULT_COMFYUI)))
    parser.add_argument("--out", type=Path, default=shapes_path)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = parser.parse_args()
    write_shape_table(read_shapes(options.comfyui.resolve()), options.out, expected_parameters, model)


def main() -> None:
    model = "SDXL base UNet (ComfyUI UNetModel, comfy/model_detection.py SDXL config)"
    run(SHAPES_PATH, __doc__, shapes_from_comfyui, EXPECTED_PARAMETERS, model)


if __name__ == "__main__":
    main()
