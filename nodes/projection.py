"""DeMe's channel projections on a ComfyUI UNet through its block-output patches.

ComfyUI's UNet (``openaimodel``) offers two patch points that see block outputs without touching the skip
connections, which DeMe leaves unprojected:

- ``input_block_patch_after_skip`` gets the output of input block i after it was stored as a skip: the
  projection ``input.<i>`` maps what flows on to the next block (the last one feeds the middle block);
- ``output_block_patch`` runs at the start of output block j on h, the output of the block before it: the
  middle block for j = 0 (projection ``middle.0``), output block j − 1 otherwise (``output.<j−1>``).

There is no patch point between the last output block and the output layer, so that block's output is not
projected. The projections ride on the MODEL as these patches plus an attachment holding the matrices, which
task-vector extraction, merging and saving read back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..merging.channel_projection import project, projections_with_deltas

ATTACHMENT = "diffusion_merge.channel_projection"
AFTER_INPUT_PATCH, BEFORE_OUTPUT_PATCH = "input_block_patch_after_skip", "output_block_patch"


def projection_block_of(block: tuple[str, int] | None, before_output: bool) -> str | None:
    """The projection that a patch call applies, from ``transformer_options["block"]``."""
    if block is None:
        return None
    kind, index = block
    if not before_output:
        return f"input.{index}" if kind == "input" else None
    return "middle.0" if index == 0 else f"output.{index - 1}"


class ProjectionSet:
    """Projection matrices {block: W}, applied where a block's name has one (others pass unchanged)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], switch=None):
        self.weights = dict(weights)
        self.switch = switch  # training: the frozen-base forward turns projections off with the adapters
        self.probed_channels: dict[str, int] | None = None  # set to {} to record channel counts instead

    def apply(self, hidden: torch.Tensor, block: str | None) -> torch.Tensor:
        if self.probed_channels is not None:
            if block is not None:
                self.probed_channels[block] = hidden.shape[1]
            return hidden
        weight = self.weights.get(block) if block is not None else None
        if weight is None or (self.switch is not None and not self.switch.enabled):
            return hidden
        return project(hidden, weight)

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; the matrices are shared
        return self


class AfterInputBlock:
    def __init__(self, projections: ProjectionSet):
        self.projections = projections

    def __call__(self, hidden, transformer_options):
        return self.projections.apply(
            hidden, projection_block_of(transformer_options.get("block"), before_output=False)
        )

    def __deepcopy__(self, memo):
        return self


class BeforeOutputBlock:
    def __init__(self, projections: ProjectionSet):
        self.projections = projections

    def __call__(self, hidden, skip, transformer_options):
        block = projection_block_of(transformer_options.get("block"), before_output=True)
        return self.projections.apply(hidden, block), skip

    def __deepcopy__(self, memo):
        return self


def check_unet(patcher) -> None:
    """Refuse models without ComfyUI's UNet block patch points (DiTs such as Flux, SD3, Wan)."""
    network = patcher.model.diffusion_model
    if not all(hasattr(network, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(
            f"channel projections need a UNet (SD1.x, SD2, SDXL); this model is a {type(network).__name__}. "
            "Turn channel_projection off for it."
        )


def install(patcher, projections: ProjectionSet) -> None:
    """Add the patches of ``projections`` to ``patcher`` (a clone), replacing any projections it had."""
    check_unet(patcher)
    patches = patcher.model_options.setdefault("transformer_options", {}).setdefault("patches", {})
    for name in (AFTER_INPUT_PATCH, BEFORE_OUTPUT_PATCH):
        kept = [p for p in patches.get(name, []) if not isinstance(p, (AfterInputBlock, BeforeOutputBlock))]
        patches[name] = kept
    patcher.set_model_patch(AfterInputBlock(projections), AFTER_INPUT_PATCH)
    patcher.set_model_patch(BeforeOutputBlock(projections), BEFORE_OUTPUT_PATCH)
    patcher.set_attachments(ATTACHMENT, projections)


def projections_of(patcher) -> dict[str, torch.Tensor]:
    """The projection matrices a MODEL carries ({} when none)."""
    found = patcher.get_attachment(ATTACHMENT) if hasattr(patcher, "get_attachment") else None
    return dict(found.weights) if found is not None else {}


def with_projections(model, weights: Mapping[str, torch.Tensor]):
    """A clone of ``model`` with inference projections ``weights`` (frozen fp32 copies)."""
    patched = model.clone()
    frozen = {block: weight.detach().float().cpu().clone() for block, weight in weights.items()}
    install(patched, ProjectionSet(frozen))
    return patched


def add_projection_deltas(patcher, deltas: Mapping[str, torch.Tensor], strength: float) -> None:
    """Add ``strength · (W − I)`` deltas to the projections of ``patcher`` (a clone; identity where none)."""
    weights = projections_with_deltas(deltas, strength, projections_of(patcher))
    install(patcher, ProjectionSet(weights))
