"""Socket types of the pack (type strings are global across packs, so they carry the DM_ prefix)."""

from .compat import io

TaskVectorType = io.Custom("DM_TASK_VECTOR")
TaskVectorStackType = io.Custom("DM_TASK_VECTOR_STACK")
ExpertListType = io.Custom("DM_EXPERT_LIST")
ComponentsType = io.Custom("DM_SUPERDIFF_COMPONENTS")  # a SuperDiff component chain
TraceType = io.Custom("DM_SUPERDIFF_TRACE")
CurriculumType = io.Custom("DM_TIMESTEP_CURRICULUM")
MomentumDecayType = io.Custom("DM_MOMENTUM_DECAY")
ChannelProjectionType = io.Custom("DM_CHANNEL_PROJECTION")

CATEGORY = "diffusion_merge"
NONFINITE_CHOICES = ["error", "skip key"]
DTYPE_CHOICES = ["fp16", "bf16", "fp32"]


def nonfinite_policy(choice: str) -> str:
    return "skip" if choice == "skip key" else "error"


def nonfinite_input() -> io.Combo.Input:
    return io.Combo.Input(
        "nonfinite",
        options=NONFINITE_CHOICES,
        default="error",
        optional=True,
        tooltip="What to do when a key's delta has NaN/Inf values: stop with an error naming the key, "
        "or skip that key (treat it as unchanged) and log a warning.",
    )


def key_filter_input() -> io.String.Input:
    return io.String.Input(
        "key_filter",
        default="",
        optional=True,
        tooltip="Regular expression on parameter names; only matching keys are kept. Empty = all keys. "
        r"Examples: 'input_blocks\.|middle_block\.' (SD1/SDXL encoder half), 'double_blocks\.' (Flux).",
    )


OVERFLOW_CHOICES = ["error", "clamp"]


def overflow_input() -> io.Combo.Input:
    return io.Combo.Input(
        "overflow",
        options=OVERFLOW_CHOICES,
        default="error",
        optional=True,
        tooltip="What to do when a value does not fit the file's dtype (beyond ±65504 in fp16): stop with an "
        "error naming the tensor (nothing is written), or clamp it to the largest storable value and log the "
        "tensors. NaN/Inf are always refused.",
    )
