"""Per-key multipliers on the merged delta: regular expressions and named block presets.

A key's multiplier is the product of every matching ``key_weights`` rule and of its block's entry in
``block_weights``; keys nothing matches keep 1. Block presets name the top-level blocks of the
architectures ComfyUI loads, matched on key names (any prefix such as ``diffusion_model.`` is allowed):

========  ==========================  ====================
name      SD1.x / SD2 / SDXL UNet      Flux
========  ==========================  ====================
input     ``input_blocks.*``
middle    ``middle_block.*``
output    ``output_blocks.*``
double                                 ``double_blocks.*``
single                                 ``single_blocks.*``
========  ==========================  ====================
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

BLOCK_PRESETS: dict[str, str] = {
    "input": r"(^|\.)input_blocks\.",
    "middle": r"(^|\.)middle_block\.",
    "output": r"(^|\.)output_blocks\.",
    "double": r"(^|\.)double_blocks\.",
    "single": r"(^|\.)single_blocks\.",
}


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
        if name not in BLOCK_PRESETS:
            raise ValueError(f"block_weights: unknown block '{name}' (known: {', '.join(BLOCK_PRESETS)})")
        rules.append((re.compile(BLOCK_PRESETS[name]), _finite(multiplier, f"block_weights['{name}']")))
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

    ``regex = multiplier`` scales keys matching the regex; ``@block = multiplier`` uses a preset
    (``@input``, ``@middle``, ``@output``, ``@double``, ``@single``). Blank lines and ``#`` comments are
    ignored. Example: ``@input = 0.5`` and ``attn2 = 0`` (keep cross-attention out of the merge).
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
        pattern = pattern.strip()
        if pattern.startswith("@"):
            block_weights[pattern[1:]] = multiplier
        else:
            key_weights.append((pattern, multiplier))
    compile_key_weights(key_weights, block_weights)  # validates regexes, block names and numbers now
    return key_weights, block_weights
