"""Contracts of the CUDA-only aten ops the code calls, checked on CPU with meta tensors.

The dense context-parallel ring (docs/DESIGN.md §4) calls FlashAttention's forward and backward
directly. Those ops have no CPU kernel, but they have meta kernels and schemas, so the ring is
run on the ``meta`` device (where it takes its CUDA branch) under a dispatch mode that records
every flash call with the exact arguments the code passed. Each call is checked against the
schema (by running it) and against what the CUDA kernel assumes: the backward of a dense call
gets back what the dense forward returned (no cumulative sequence lengths, since a defined
tensor there selects the variable-length kernel; the forward's RNG state kinds; its lengths).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ratplus.layers.context_parallel.ring import ring_attention

FORWARD = torch.ops.aten._scaled_dot_product_flash_attention.default
BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_backward.default


class RecordFlash(TorchDispatchMode):
    """Runs every op; keeps (op, arguments by schema name, result) of the flash ones."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in (FORWARD, BACKWARD):
            names = [a.name for a in func._schema.arguments]
            bound = {a.name: a.default_value for a in func._schema.arguments if a.has_default_value()}
            bound.update(zip(names, args))
            bound.update(kwargs)
            self.calls.append((func, bound, result))
        return result


class Received:
    def __init__(self, tensor):
        self.tensor = tensor

    def wait(self):
        return self.tensor


class OneRank:
    """A one-rank ring: every transfer comes straight back."""

    def start(self, tensor, tag):
        return Received(tensor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_flash_calls_keep_the_cuda_ops_contract(dtype):
    seq, batch, heads, head_dim = 12, 2, 3, 64
    q, k, v = (torch.empty(seq, batch, heads, head_dim, device="meta", dtype=dtype, requires_grad=True)
               for _ in range(3))
    with RecordFlash() as record:
        out = ring_attention(q, k, v, OneRank(), 0, 1, 0.125)
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    assert out.shape == q.shape and all(g.shape == q.shape and g.dtype == dtype for g in grads)

    forwards = [(bound, result) for op, bound, result in record.calls if op is FORWARD]
    backwards = [bound for op, bound, _ in record.calls if op is BACKWARD]
    # one rank holds two query and two key chunks: (0, 0) causal, (1, 0) full, (1, 1) causal
    assert len(forwards) == len(backwards) == 3
    for (fwd, result), bwd in zip(forwards, backwards):
        assert fwd["query"].dtype in (torch.bfloat16, torch.float16) and fwd["dropout_p"] == 0.0
        assert fwd["is_causal"] == bwd["is_causal"] and fwd["scale"] == bwd["scale"] == 0.125
        _, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = result
        assert cum_q is None and cum_k is None  # the dense forward's answer, as the backward must get it
        assert bwd["cum_seq_q"] is None and bwd["cum_seq_k"] is None, \
            "a defined cum_seq_q/cum_seq_k selects FlashAttention's variable-length backward"
        assert (bwd["max_q"], bwd["max_k"]) == (max_q, max_k)
        for name, want in (("philox_seed", seed), ("philox_offset", offset)):
            assert (bwd[name].dtype, bwd[name].shape) == (want.dtype, want.shape), name
        assert bwd["dropout_p"] == 0.0
        assert bwd["logsumexp"].dtype == lse.dtype and bwd["logsumexp"].shape == lse.shape
        for name in ("grad_out", "query", "key", "value", "out"):
            assert bwd[name].dtype == fwd["query"].dtype and bwd[name].stride(-1) == 1, name


def test_ring_refuses_fp32_on_flash():
    q = torch.empty(8, 1, 2, 64, device="meta")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        ring_attention(q, q, q, OneRank(), 0, 1)
