"""dinm: detoxify a language model with one surgical DINM edit, kept as a small, revertible delta.

The public names below are imported on first use (PEP 562), so that `import dinm.config` (the CLI's option lists)
does not import torch. No public name shadows a submodule: `dinm.edit` is the function, `dinm.editing` its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the submodule that defines it
_PUBLIC = {
    "EditConfig": "config",
    "Delta": "delta",
    "Step": "history",
    "edit": "editing",
    "locate": "locating",
    "LocateResult": "locating",
    "evaluate": "evaluation",
    "Instance": "instance",
    "load_instance": "instance",
    "load_instances": "instance",
    "load_model": "models",
    "apply_delta": "checkpoint",
}

__all__ = sorted([*_PUBLIC, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports them
    from .checkpoint import apply_delta
    from .config import EditConfig
    from .delta import Delta
    from .editing import edit
    from .evaluation import evaluate
    from .history import Step
    from .instance import Instance, load_instance, load_instances
    from .locating import LocateResult, locate
    from .models import load_model


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dinm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
