"""Per-key multipliers on the merged delta: regular expressions and named blocks.

A key's multiplier is the product of every matching ``key_weights`` rule and of its block's entry in
``block_weights``; keys nothing matches keep 1. Block names are matched on key names (any prefix such as
``diffusion_model.`` is allowed). The coarse presets:

========  ==========================  ====================
name      SD1.x / SD2 / SDXL UNet      Flux
========  ==========================  ====================
input     ``input_blocks.*``
middle    ``middle_block.*``
output    ``output_blocks.*``
double                                 ``double_blocks.*``
single                                 ``single_blocks.*``
========  ==========================  ====================

and one name per block of SD1.x/SD2, SDXL, SD3, Flux, Wan 2.1/2.2 and Qwen-Image (``embed``, ``IN04``,
``M00``, ``OUT03``, ``J12``, ``D05``, ``S20``, ``B17``, ``T30``, ``final``): see :mod:`merging.blocks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from .blocks import LEGACY_PRESETS, NAMING_HELP, block_pattern, canonical_block_name

BLOCK_PRESETS: dict[str, str] = LEGACY_PRESETS  # the coarse presets (named blocks: merging.blocks)


def compile_key_weights(
    key_weights: Iterable[Sequence] | None, block_weights: Mapping[str, float] | None
) -> tuple[tuple[re.Pattern, float], ...]:
    """Validate both forms and turn them into one list of (compiled regex, multiplier) rules."""
    rules: list[tuple[re.Pattern, float]] = []
    for rule in key_weights or ():
        if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"key_weights entries must be (regex, multiplier) pairs, not {rule!r}")
        pattern, multiplier = rule
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"key_weights: '{pattern}' is not a valid regular expression: {error}") from None
        rules.append((compiled, _finite(multiplier, f"key_weights multiplier for '{pattern}'")))
    for name, multiplier in (block_weights or {}).items():
        try:
            pattern = block_pattern(name)
        except (ValueError, AttributeError):
            raise ValueError(f"block_weights: unknown block {name!r} (known: {NAMING_HELP})") from None
        rules.append((re.compile(pattern), _finite(multiplier, f"block_weights['{name}']")))
    return tuple(rules)


def key_multiplier(key: str, rules: Sequence[tuple[re.Pattern, float]]) -> float:
    """The product of the multipliers of every rule whose regex is found in ``key``."""
    return math.prod(multiplier for pattern, multiplier in rules if pattern.search(key))


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def parse_weight_rules(text: str) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Parse one rule per line into (key_weights, block_weights) — the form the merge nodes take.

    ``regex = multiplier`` scales keys matching the regex; ``@block = multiplier`` scales a named block: a
    coarse preset (``@input``, ``@middle``, ``@output``, ``@double``, ``@single``) or one block of
    :mod:`merging.blocks` (``@embed``, ``@IN04``, ``@M00``, ``@D05``, ``@B17``, ``@final`` …). Blank lines and
    ``#`` comments are ignored. Example: ``@input = 0.5`` and ``attn2 = 0`` (keep cross-attention out of the
    merge). A later line for the same block replaces an earlier one; regex lines all apply.
    """
    key_weights: list[tuple[str, float]] = []
    block_weights: dict[str, float] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pattern, sep, value = line.rpartition("=")
        try:
            multiplier = float(value)
        except ValueError:
            multiplier = None
        if not sep or not pattern.strip() or multiplier is None:
            raise ValueError(
                f"weight rule line {number} ('{raw.strip()}') must look like 'regex = 0.5' or '@input = 0.5'"
            )
        if not math.isfinite(multiplier):
            raise ValueError(f"weight rule line {number} ('{raw.strip()}'): the multiplier must be a finite number")
        pattern = pattern.strip()
        if pattern.startswith("@"):
            try:
                block_weights[canonical_block_name(pattern[1:])] = multiplier
            except ValueError as error:
                raise ValueError(f"weight rule line {number} ('{raw.strip()}'): {error}") from None
        else:
            key_weights.append((pattern, multiplier))
    compile_key_weights(key_weights, block_weights)  # validates regexes, block names and numbers now
    return key_weights, block_weights
