"""Checks every node of the pack applies to its inputs before it runs.

ComfyUI compares a FLOAT widget's value with its ``min``/``max``, which NaN passes (every comparison with NaN
is false), and values arriving through a link are not checked at all. A NaN factor or strength then runs to
the end and yields a NaN model or image; a NaN ``grad_clip`` silently turns clipping off. So every FLOAT input
of every node is refused here when it is not a finite number, before the node's own code runs.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

from .compat import io

_CHECKED = "_dm_numbers_checked"


def float_inputs(node_cls: type[io.ComfyNode]) -> tuple[tuple[str, ...], str]:
    """(ids of the node's FLOAT inputs, its display name), read from its schema once."""
    cached = node_cls.__dict__.get("_dm_float_inputs")
    if cached is None:
        schema = node_cls.define_schema()
        ids = tuple(item.id for item in schema.inputs if isinstance(item, io.Float.Input))
        cached = (ids, schema.display_name or schema.node_id)
        node_cls._dm_float_inputs = cached
    return cached


def nonfinite_problem(node_cls: type[io.ComfyNode], values: dict) -> str | None:
    """Why ``values`` (input name → value) cannot run: the first FLOAT input holding NaN or ±Inf, named."""
    ids, display_name = float_inputs(node_cls)
    for name in ids:
        value = values.get(name)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(float(value)):
            return (
                f"{display_name}: input '{name}' is {float(value)}; numbers must be finite (NaN and ±Inf are "
                "refused). Enter a number, or check the node that feeds it."
            )
    return None


def refuse_nonfinite_numbers(node_cls: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Make the node's ``execute`` refuse a NaN/±Inf FLOAT input with a ValueError naming node and input."""
    if node_cls.__dict__.get(_CHECKED):
        return node_cls
    execute = node_cls.__dict__["execute"].__func__
    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        problem = nonfinite_problem(node_cls, signature.bind_partial(cls, *args, **kwargs).arguments)
        if problem:
            raise ValueError(problem)
        return execute(cls, *args, **kwargs)

    node_cls.execute = classmethod(checked)
    setattr(node_cls, _CHECKED, True)
    return node_cls
