"""Run by ``test_compat.py`` in its own process: a dynamic-VRAM patcher swapped for training.

``ModelPatcherDynamic`` needs comfy-aimdo's native library, loaded here as ComfyUI's ``main.py`` loads it.
Prints one JSON line of findings. Usage: ``python dynamic_patcher_check.py <SD1.5 diffusion-model file>``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def main(path: str) -> None:
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy_aimdo.control

    comfy_aimdo.control.init()
    import comfy.model_patcher
    import comfy.sd
    import torch

    spec = importlib.util.spec_from_file_location(
        "diffusion_merge", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["diffusion_merge"] = pack
    spec.loader.exec_module(pack)
    from diffusion_merge.nodes import compat

    dynamic_class = comfy.model_patcher.ModelPatcherDynamic
    loaded = comfy.sd.load_diffusion_model(path)
    cpu = torch.device("cpu")
    found = {"cpu_device_gets_classic_patcher": type(dynamic_class(loaded.model, cpu, cpu)) is not dynamic_class}
    # any non-CPU load device gets the dynamic patcher; "meta" stands in for a GPU (nothing is loaded here)
    dynamic = dynamic_class(loaded.model, torch.device("meta"), cpu)
    found["gpu_device_gets_dynamic_patcher"] = compat.is_dynamic(dynamic)
    dynamic.add_patches({"diffusion_model.out.2.bias": (torch.ones(4),)}, 1.0)
    try:
        compat.training_patcher(dynamic)
        found["built_in_code_refused"] = False
    except ValueError as error:
        found["built_in_code_refused"] = "cannot reload it" in str(error)
    dynamic.cached_patcher_init = loaded.cached_patcher_init  # as ComfyUI's loaders set it
    trainable = compat.training_patcher(dynamic)
    found["delegate_is_classic"] = not compat.is_dynamic(trainable)
    found["delegate_has_its_own_weights"] = trainable.model is not dynamic.model
    found["delegate_keeps_the_patches"] = trainable.patches.keys() == dynamic.patches.keys() != set()
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1])
