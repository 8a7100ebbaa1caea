"""Named blocks of the diffusion models ComfyUI loads: which architecture a key list is, and its block groups.

A *block group* is a set of top-level modules one slider (or one ``@NAME = x`` weight rule) scales together:

==========  ==========================================================================================
name        what it holds
==========  ==========================================================================================
``embed``   the input side: patch/latent embedders, time, text and class embeddings
``IN00``…   SD1.x / SD2 / SDXL UNet ``input_blocks.N`` (supermerger's names), ``M00`` the ``middle_block``,
            ``OUT00``… ``output_blocks.N``
``J00``…    SD3 / SD3.5 MMDiT ``joint_blocks.N``
``D00``…    Flux ``double_blocks.N``; ``S00``… ``single_blocks.N``
``B00``…    Wan 2.1 / 2.2 ``blocks.N``
``T00``…    Qwen-Image ``transformer_blocks.N``
``final``   the output side: ``out`` (UNets), ``final_layer`` (SD3, Flux), ``head`` (Wan), ``norm_out`` +
            ``proj_out`` (Qwen-Image)
==========  ==========================================================================================

Each name resolves to one regular expression anchored at the top-level module (any ``model.`` /
``diffusion_model.`` prefix allowed), so a rule needs no architecture to be applied; the architecture is
detected from the keys only to list its groups (the web editor's sliders) and to explain a name that
matches nothing. The groups of every supported architecture partition its diffusion-model keys: each key
is in exactly one group (pinned by tests on key lists ComfyUI's own model classes produce).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .keys import UNET_PREFIX

_ROOT = r"^(?:model\.)?(?:diffusion_model\.)?"
_CHECKPOINT_PREFIX = "model." + UNET_PREFIX


@dataclass(frozen=True)
class Series:
    """Numbered top-level blocks: ``<module>.<N>.…`` is group ``<prefix><NN>``."""

    prefix: str
    module: str
    label: str


@dataclass(frozen=True)
class Architecture:
    """A diffusion-model family whose keys name their blocks the same way."""

    id: str
    label: str
    markers: tuple[str, ...]  # top-level modules that must all be present
    embed: tuple[str, ...]  # top-level modules of the 'embed' group
    series: tuple[Series, ...]
    final: tuple[str, ...]
    single: Mapping[str, str] = field(default_factory=dict)  # unnumbered block groups: {name: module}
    presets: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # {model: {series prefix: count}}

    def preset_groups(self, preset: str) -> list[str]:
        """The group names of one named model of this family, in order (what its key list groups into)."""
        if preset not in self.presets:
            raise ValueError(f"{self.label} has no preset '{preset}' (presets: {', '.join(self.presets)})")
        counts = self.presets[preset]
        names = ["embed"]
        for series in self.series:
            names += [numbered_block_name(series.prefix, index) for index in range(counts[series.prefix])]
            if series.prefix == "IN":
                names += list(self.single)
        return [*names, "final"]


_UNET: dict[str, Any] = dict(
    series=(
        Series("IN", "input_blocks", "input block"),
        Series("OUT", "output_blocks", "output block"),
    ),
    final=("out",),
    single={"M00": "middle_block"},
)
ARCHITECTURES: dict[str, Architecture] = {
    arch.id: arch
    for arch in (
        Architecture(
            "sd3",
            "SD3 / SD3.5",
            markers=("joint_blocks", "x_embedder"),
            embed=("pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder", "context_processor"),
            series=(Series("J", "joint_blocks", "joint block"),),
            final=("final_layer",),
            presets={"SD3 Medium / SD3.5 Medium": {"J": 24}, "SD3.5 Large": {"J": 38}},
        ),
        Architecture(
            "flux",
            "Flux",
            markers=("double_blocks", "single_blocks"),
            embed=("img_in", "time_in", "guidance_in", "vector_in", "txt_in"),
            series=(Series("D", "double_blocks", "double block"), Series("S", "single_blocks", "single block")),
            final=("final_layer",),
            presets={"Flux.1 dev / schnell": {"D": 19, "S": 38}},
        ),
        Architecture(
            "qwen_image",
            "Qwen-Image",
            markers=("transformer_blocks", "txt_norm", "img_in"),
            embed=("img_in", "txt_norm", "txt_in", "time_text_embed"),
            series=(Series("T", "transformer_blocks", "transformer block"),),
            final=("norm_out", "proj_out"),
            presets={"Qwen-Image": {"T": 60}},
        ),
        Architecture(
            "wan",
            "Wan 2.1 / 2.2",
            markers=("blocks", "patch_embedding", "head"),
            embed=("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb"),
            series=(Series("B", "blocks", "block"),),
            final=("head",),
            presets={"Wan 2.1 14B / Wan 2.2 A14B": {"B": 40}, "Wan 2.1 1.3B / Wan 2.2 5B": {"B": 30}},
        ),
        Architecture(
            "sdxl",
            "SDXL",
            markers=("input_blocks", "label_emb"),
            embed=("time_embed", "label_emb"),
            presets={"SDXL base": {"IN": 9, "OUT": 9}, "SDXL refiner": {"IN": 12, "OUT": 12}},
            **_UNET,
        ),
        Architecture(
            "sd1",
            "SD1.x / SD2",
            markers=("input_blocks", "time_embed"),
            embed=("time_embed",),
            presets={"SD1.x / SD2": {"IN": 12, "OUT": 12}},
            **_UNET,
        ),
    )
}

# The coarse presets that came first: matched anywhere in a key, kept as they were for saved workflows.
LEGACY_PRESETS: dict[str, str] = {
    "input": r"(^|\.)input_blocks\.",
    "middle": r"(^|\.)middle_block\.",
    "output": r"(^|\.)output_blocks\.",
    "double": r"(^|\.)double_blocks\.",
    "single": r"(^|\.)single_blocks\.",
}
_SERIES = {series.prefix: series for arch in ARCHITECTURES.values() for series in arch.series}
_SINGLE = {name: module for arch in ARCHITECTURES.values() for name, module in arch.single.items()}
_EMBED = tuple(dict.fromkeys(module for arch in ARCHITECTURES.values() for module in arch.embed))
_FINAL = tuple(dict.fromkeys(module for arch in ARCHITECTURES.values() for module in arch.final))
_NUMBERED = re.compile(r"^([A-Za-z]+?)(\d+)$")
NAMING_HELP = (
    "input, middle, output, double, single, embed, final, or a numbered block: IN00…, M00, OUT00… (SD1.x/SD2/"
    "SDXL UNets), J00… (SD3), D00…/S00… (Flux), B00… (Wan), T00… (Qwen-Image)"
)


def numbered_block_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:02d}"


def canonical_block_name(name: str) -> str:
    """``in4`` → ``IN04``; other known names unchanged; ValueError for a name no architecture has."""
    name = name.strip()
    if name in LEGACY_PRESETS or name in ("embed", "final"):
        return name
    match = _NUMBERED.match(name)
    if match and match.group(1).upper() in _SERIES:
        return numbered_block_name(match.group(1).upper(), int(match.group(2)))
    if match and numbered_block_name(match.group(1).upper(), int(match.group(2))) in _SINGLE:
        return numbered_block_name(match.group(1).upper(), int(match.group(2)))
    raise ValueError(f"unknown block '{name}' (known: {NAMING_HELP})")


def block_pattern(name: str) -> str:
    """The regular expression a block name stands for (see the module docstring)."""
    name = canonical_block_name(name)
    if name in LEGACY_PRESETS:
        return LEGACY_PRESETS[name]
    if name == "embed":
        return _ROOT + _alternatives(_EMBED)
    if name == "final":
        return _ROOT + _alternatives(_FINAL)
    if name in _SINGLE:
        return _ROOT + re.escape(_SINGLE[name]) + r"(?:\.|$)"
    prefix, index = _numbered(name)
    return _ROOT + re.escape(_SERIES[prefix].module) + rf"\.{int(index)}\."


def _alternatives(modules: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(module) for module in modules) + r")(?:\.|$)"  # SD3's pos_embed is a key


# -- detection and grouping ---------------------------------------------------------------------------


class UnknownArchitecture(ValueError):
    """The keys are not those of an architecture with named blocks."""


def module_paths(keys: Iterable[str]) -> list[str]:
    """The diffusion-model keys of a key list, as module paths (``input_blocks.0.0.weight``): checkpoint,
    ``diffusion_model.`` and bare diffusion-model layouts; text encoder, VAE and other keys are left out."""
    keys = list(keys)
    for prefix in (_CHECKPOINT_PREFIX, UNET_PREFIX):
        found = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
        if found:
            return found
    return keys  # a bare diffusion-model file (Qwen-Image's names look like diffusers' and are accepted)


def detect_architecture(keys: Iterable[str]) -> Architecture:
    """The architecture whose marker modules a key list has; UnknownArchitecture naming what was found."""
    paths = module_paths(keys)
    tops = {path.split(".", 1)[0] for path in paths}
    for arch in ARCHITECTURES.values():
        if all(marker in tops for marker in arch.markers):
            return arch
    found = ", ".join(sorted(tops)[:12]) + (" …" if len(tops) > 12 else "") if tops else "no diffusion-model keys"
    raise UnknownArchitecture(
        f"cannot tell the architecture of these {len(paths)} diffusion-model keys (top-level modules: {found}); "
        "named blocks exist for SD1.x/SD2, SDXL, SD3/SD3.5, Flux, Wan 2.1/2.2 and Qwen-Image. "
        "Use regex rules ('double_blocks\\.3\\. = 0.5') for other models"
    )


@dataclass(frozen=True)
class BlockGroups:
    """A key list split into the block groups of its architecture."""

    architecture: Architecture
    groups: dict[str, list[str]]  # {group name: module paths}, in the architecture's order
    ungrouped: list[str]  # module paths no group holds (a variant with modules the table does not know)

    def summary(self) -> str:
        """``embed, IN00–IN08, M00, OUT00–OUT08, final`` (numbered runs collapsed)."""
        return describe_groups(list(self.groups))


def group_of(path: str, arch: Architecture) -> str | None:
    """The block group of one module path in ``arch`` (None when no group holds it)."""
    top, _, rest = path.partition(".")
    if top in arch.embed:
        return "embed"
    if top in arch.final:
        return "final"
    for name, module in arch.single.items():
        if top == module:
            return name
    for series in arch.series:
        if top == series.module:
            index = rest.split(".", 1)[0]
            return numbered_block_name(series.prefix, int(index)) if index.isdigit() else None
    return None


def _numbered(name: str) -> tuple[str, str]:
    """(series prefix, index digits) of a numbered block name such as ``IN04``."""
    match = _NUMBERED.match(name)
    if match is None:
        raise ValueError(f"'{name}' is not a numbered block name")
    return match.group(1), match.group(2)


def _numbered_prefix(name: str) -> str | None:
    match = _NUMBERED.match(name)
    return match.group(1) if match else None


def group_keys(keys: Iterable[str], architecture: Architecture | None = None) -> BlockGroups:
    """Split a key list into its architecture's block groups (detected unless given)."""
    keys = list(keys)
    arch = architecture or detect_architecture(keys)
    found: dict[str, list[str]] = {}
    ungrouped: list[str] = []
    for path in module_paths(keys):
        group = group_of(path, arch)
        (found.setdefault(group, []) if group else ungrouped).append(path)
    order = {name: position for position, name in enumerate(_group_order(arch, found))}
    return BlockGroups(arch, {name: found[name] for name in sorted(found, key=order.__getitem__)}, ungrouped)


def _group_order(arch: Architecture, found: Iterable[str]) -> list[str]:
    """embed, the series in the architecture's order (each by index; M00 after the IN blocks), final."""
    names = set(found)
    ordered = ["embed"]
    for series in arch.series:
        ordered += sorted(
            (n for n in names if _numbered_prefix(n) == series.prefix),
            key=lambda n: int(_numbered(n)[1]),
        )
        if series.prefix == "IN":
            ordered += list(arch.single)
    ordered.append("final")
    return [name for name in ordered if name in names]


def describe_groups(names: list[str]) -> str:
    """Group names with numbered runs collapsed: ``embed, IN00–IN08, M00, OUT00–OUT08, final``."""
    parts: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            parts.append(run[0] if len(run) == 1 else f"{run[0]}–{run[-1]}")
            run.clear()

    for name in names:
        match = _NUMBERED.match(name)
        previous = _NUMBERED.match(run[-1]) if run else None
        if (
            match
            and previous
            and match.group(1) == previous.group(1)
            and int(match.group(2)) == int(previous.group(2)) + 1
        ):
            run.append(name)
            continue
        flush()
        if match and match.group(1) in _SERIES:
            run.append(name)
        else:
            parts.append(name)
    flush()
    return ", ".join(parts)


def unmatched_blocks(names: Iterable[str], keys: Iterable[str]) -> list[str]:
    """The block names (``block_weights`` keys) whose pattern matches none of ``keys``."""
    keys = list(keys)
    return [name for name in names if not any(re.search(block_pattern(name), key) for key in keys)]


def check_blocks_exist(names: Iterable[str], keys: Iterable[str]) -> None:
    """ValueError when a block name matches no key, naming the detected architecture and its groups: a rule
    for a block the model does not have would otherwise change nothing, silently."""
    keys = list(keys)
    missing = unmatched_blocks(names, keys)
    if not missing:
        return
    try:
        groups = group_keys(keys)
        have = f"these are {groups.architecture.label} keys, whose blocks are {groups.summary()}"
    except ValueError as error:
        have = str(error)
    listed = ", ".join(f"'@{name}'" for name in missing)
    raise ValueError(f"block_weights: {listed} match no key of the task vectors ({have})")
