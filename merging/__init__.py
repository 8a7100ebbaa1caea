"""diffusion-merge's library: task vectors and merging on key→tensor mappings, in pure torch.

Nothing here imports ComfyUI. With the pack's root on ``sys.path``::

    import merging
    tau = merging.task_vector(finetuned_sd, base_sd)           # dict of fp32 deltas
    lazy = merging.task_vector_from_files("ft.safetensors", "base.safetensors")
    merging.save_task_vector(lazy.scale(0.8), "tau.safetensors", dtype="fp16")
    merged = merging.merge_task_vectors([tau_a, tau_b], "ties", k=0.2)   # see README "Merging"
    merging.extract_lora(lazy, "tau_r64.safetensors", rank=64)   # a LoRA of a task vector
    merging.run_recipe("tau.safetensors", "again.safetensors")   # re-run what a saved file was made from
"""

from .io import SafetensorsFile, write_safetensors
from .lora import lora_delta, lora_deltas
from .lora_extract import extract_lora, load_lora
from .merge import MergeCancelled, iter_merged, merge_task_vectors
from .merge_files import merge_checkpoint_files
from .recipes import read_recipe, recipe_of, run_recipe, save_recipe
from .task_vector_files import (
    load_task_vector,
    open_diffusion_model,
    save_task_vector,
    task_vector_from_files,
)
from .task_vectors import (
    ComputedDeltas,
    Difference,
    StoredDeltas,
    TaskVector,
    apply_task_vector,
    extract_task_vector,
    summarize,
    task_vector,
)

__version__ = "0.1.0"

__all__ = [
    "ComputedDeltas",
    "Difference",
    "MergeCancelled",
    "SafetensorsFile",
    "StoredDeltas",
    "TaskVector",
    "__version__",
    "apply_task_vector",
    "extract_lora",
    "extract_task_vector",
    "iter_merged",
    "load_lora",
    "load_task_vector",
    "lora_delta",
    "lora_deltas",
    "merge_checkpoint_files",
    "merge_task_vectors",
    "open_diffusion_model",
    "read_recipe",
    "recipe_of",
    "run_recipe",
    "save_recipe",
    "save_task_vector",
    "summarize",
    "task_vector",
    "task_vector_from_files",
    "write_safetensors",
]
