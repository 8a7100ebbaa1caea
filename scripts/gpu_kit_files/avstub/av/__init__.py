"""Import-only stand-in for PyAV on a GPU machine where its wheel cannot travel (scripts/gpu_kit.sh).

Every name is a placeholder class, and so is every attribute of one (enum members such as
``ColorTrc.BT709`` stay distinct and hashable), so ComfyUI's video types import; using video raises.
"""


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        member = _Placeholder(f"{cls.__name__}.{name}", (_Missing,), {})
        setattr(cls, name, member)
        return member


class _Missing(metaclass=_Placeholder):
    def __init__(self, *args, **kwargs):
        raise ImportError("PyAV (av) is not installed on this machine")


def open(*args, **kwargs):
    raise ImportError("PyAV (av) is not installed on this machine")


def placeholder(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Placeholder(name, (_Missing,), {})


def __getattr__(name):
    return placeholder(name)
