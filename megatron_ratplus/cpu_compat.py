"""The one CPU compatibility shim for megatron-core (active only when CUDA is absent).

megatron-core 0.16 hard-codes CUDA in a few places that are otherwise device-agnostic:
``torch.cuda.current_device()`` (RoPE, checkpoint loading), ``torch.cuda.synchronize()``
(dist_checkpointing, pipeline p2p), ``device="cuda"`` in tensor factories (pipeline schedules),
``pin_memory=True`` plus ``Tensor.cuda()`` (RoPE slicing under context parallelism, the tied
embedding sync across pipeline stages), and ``torch.cuda.get_rng_state()`` (the model-parallel
RNG tracker that sequence-parallel embeddings fork; it then tracks the CPU generator's state,
and RAT+ has no dropout to draw from it), and ``Tensor.type()`` compared with
``"torch.cuda.FloatTensor"``/``"torch.cuda.BFloat16Tensor"`` (megatron's Float16 and distributed
optimizers accept parameters by that name and raise ``TypeError`` otherwise; a CPU tensor's
``type()`` here reports the CUDA name of its dtype, the only CPU-visible effect). Without CUDA each
of these raises, so this module redirects exactly those calls to the CPU. With CUDA
present :func:`install` does nothing, so the GPU path is never touched.
"""

from __future__ import annotations

import functools

import torch

# Tensor factories megatron-core calls with device="cuda" (schedules, RNG tracker, RoPE).
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint")
_installed = False


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in megatron-core's calls
    return torch.device(device).type == "cuda"


def _cpu_device(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator; meaningless on CPU
        return factory(*args, **kwargs)

    wrapper.__wrapped_by_ratplus__ = True
    return wrapper


def _cuda_type_name(real_type):
    """``Tensor.type()`` with no argument names a dense CPU tensor by its CUDA type (the tensor
    stands in for the CUDA one, as ``Tensor.cuda`` returns it unchanged); conversions pass through."""

    @functools.wraps(real_type)
    def type_name(self, *args, **kwargs):
        if args or kwargs or self.device.type != "cpu" or self.is_sparse:
            return real_type(self, *args, **kwargs)
        return real_type(self).replace("torch.", "torch.cuda.", 1)

    return type_name


def install() -> bool:
    """Install the shim when CUDA is unavailable; returns whether it is active. Idempotent."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
        torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
        for name in _FACTORIES:
            setattr(torch, name, _cpu_device(getattr(torch, name)))
        _installed = True
    return True


def is_active() -> bool:
    return _installed
