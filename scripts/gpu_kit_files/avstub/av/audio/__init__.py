"""Part of the PyAV stand-in (see av/__init__.py)."""

from av import placeholder as __getattr__  # noqa: F401
