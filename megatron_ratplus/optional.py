"""Guarded imports of the optional GPU stack (Transformer Engine, apex, DALI).

None of them is needed on CPU. Each check returns the module or None, and :func:`require`
turns a missing one into a single line that says what is missing and how to get it.
"""

from __future__ import annotations

import importlib
from typing import Optional

from megatron_ratplus.errors import UserError

HOW_TO_GET = {
    "transformer_engine": "pip install 'megatron-ratplus[gpu]' (Transformer Engine needs an NVIDIA GPU and CUDA)",
    "apex": "use an NGC PyTorch container or build NVIDIA apex from source "
            "(github.com/NVIDIA/apex); the PyPI package named 'apex' is unrelated",
    "nvidia.dali": "pip install 'megatron-ratplus[dali]' (needs CUDA 12)",
}


class MissingDependency(UserError):
    """An optional GPU dependency is not installed."""


def optional_import(name: str) -> Optional[object]:
    """Import ``name`` if it is installed and usable, else return None."""
    try:
        module = importlib.import_module(name)
    except Exception:  # broken GPU installs raise more than ImportError (OSError, RuntimeError)
        return None
    if name == "apex" and not hasattr(module, "amp") and not hasattr(module, "normalization"):
        return None  # the unrelated PyPI 'apex' web toolkit
    return module


def require(name: str, feature: str):
    """Return module ``name`` or raise MissingDependency with a one-line how-to."""
    module = optional_import(name)
    if module is None:
        raise MissingDependency(f"{feature} needs {name}, which is not installed: {HOW_TO_GET[name]}")
    return module


def have(name: str) -> bool:
    return optional_import(name) is not None
