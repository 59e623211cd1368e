"""Guarded imports of the optional GPU stack (Transformer Engine, apex, DALI), lm-eval and rouge.

None of them is needed on CPU. Each check returns the module or None, and :func:`require`
turns a missing one (or a missing CUDA device) into a single line that says what is missing and
how to get it. :func:`fused_kernels` reports which fused implementations megatron-core itself
picked from what is installed, so a run can log it once.
"""

from __future__ import annotations

import importlib
import sys
from typing import Dict, Optional

import torch

from megatron_ratplus.errors import UserError

from megatron_ratplus.errors import UserError

HOW_TO_GET = {
    "transformer_engine": "pip install 'megatron-ratplus[gpu]' (Transformer Engine needs an NVIDIA GPU and CUDA)",
    "apex": "use an NGC PyTorch container or build NVIDIA apex from source "
            "(github.com/NVIDIA/apex); the PyPI package named 'apex' is unrelated",
    "nvidia.dali": "pip install 'megatron-ratplus[dali]' (needs CUDA 12)",
    "lm_eval": "pip install 'megatron-ratplus[eval]' (lm-evaluation-harness 0.4)",
    "rouge": "pip install 'megatron-ratplus[eval]' (the rouge package 1.0.1, LongBench's Rouge-L)",
    "wonderwords": "pip install 'megatron-ratplus[eval]' (wonderwords 3.0.1, the word lists RULER draws from)",
}
# What must import for the package to be usable from PyTorch (TE's top level imports without its
# torch extension).
_PROBE = {"transformer_engine": "transformer_engine.pytorch"}


class MissingDependency(UserError, ImportError):
    """An optional GPU dependency, or the CUDA device it needs, is missing (one-line message)."""


def optional_import(name: str) -> Optional[object]:
    """Import ``name`` if it is installed and usable, else return None."""
    try:
        importlib.import_module(_PROBE.get(name, name))
        module = importlib.import_module(name)
    except Exception:  # broken GPU installs raise more than ImportError (OSError, RuntimeError)
        return None
    if name == "apex" and not hasattr(module, "amp") and not hasattr(module, "normalization"):
        return None  # the unrelated PyPI 'apex' web toolkit
    return module


def require(name: str, feature: str, cuda: bool = False):
    """Return module ``name`` or raise MissingDependency with a one-line how-to; with ``cuda``,
    also refuse when no CUDA device is visible."""
    module = optional_import(name)
    if module is None:
        raise MissingDependency(f"{feature} needs {name}, which is not installed: {HOW_TO_GET[name]}")
    if cuda and not torch.cuda.is_available():
        raise MissingDependency(f"{feature} needs a CUDA GPU, and none is visible")
    return module


def have(name: str) -> bool:
    return optional_import(name) is not None


def fused_kernels() -> Dict[str, str]:
    """Where megatron-core takes its fused kernels from, as it decided at import time.

    Adam and the multi-tensor ops: Transformer Engine first, then apex, else torch (megatron.core.optimizer).
    Weight-gradient accumulation into fp32 main grads (``config.gradient_accumulation_fusion``):
    apex's ``fused_weight_gradient_mlp_cuda`` extension for megatron's own linears; TE's linears
    fuse it themselves. RMSNorm: megatron-core 0.16 has no apex RMSNorm (its apex FusedLayerNorm
    is LayerNorm only), so the local spec keeps torch's ``rms_norm``, itself one kernel on CUDA.
    """
    from megatron.core import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import layers

    def source(obj) -> str:
        root = getattr(obj, "__module__", "").split(".")[0]
        return {"transformer_engine": "transformer_engine", "apex": "apex", "amp_C": "apex"}.get(root, "torch")

    return {
        "adam": source(megatron_optimizer.Adam),
        "multi_tensor_apply": source(megatron_optimizer.optimizer.multi_tensor_applier),
        "gradient_accumulation_fusion": "apex" if layers._grad_accum_fusion_available else "none",
    }


_logged = False


def log_fused_kernels() -> Dict[str, str]:
    """Print :func:`fused_kernels` once per process (rank 0 only), e.g. when the optimizer is built."""
    global _logged
    found = fused_kernels()
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not _logged and rank0:
        print("fused kernels: " + ", ".join(f"{k} from {v}" for k, v in found.items()), file=sys.stderr)
    _logged = True
    return found
