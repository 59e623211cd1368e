"""Triton kernels against their reference ops, run by Triton's interpreter on CPU.

Every kernel output and gradient buffer is poisoned with NaN before the launch (see ``poisoned``),
so an element a kernel forgets to write fails the comparison. Shapes are small and deliberately
ragged (T not a multiple of the tile or of D, D > T, W = 0, P = 0, P > T); the interpreter is
slow, so the longer cases carry @pytest.mark.slow.
"""

import contextlib
import logging

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

from megatron_ratplus import backend
from megatron_ratplus.ops import gated_scan as reference_scan
from megatron_ratplus.ops import pattern_attention as reference_attention
from megatron_ratplus.ops.decode import decode_attention as reference_decode
from megatron_ratplus.patterns import parse_pattern
from ratplus_kernels import attention as attention_kernels
from ratplus_kernels.attention import dilated_attention as dilated_kernel
from ratplus_kernels.decode import decode_attention
from ratplus_kernels.scan import gated_scan, gated_scan_kv

TINY_BLOCKS = ((16, 16, 1), (16, 16, 1))


@pytest.fixture(autouse=True, scope="module")
def interpreter_bf16_dot():
    """Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits; feed it
    the fp32 values instead (the compiled kernel accumulates bf16 products in fp32 as well)."""
    original = interpreter.InterpreterBuilder.create_dot

    def as_fp32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, as_fp32(a), as_fp32(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot
    yield
    interpreter.InterpreterBuilder.create_dot = original


@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return NaN-filled floating tensors while active."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_close_rel(got, want, tol):
    """Max-abs error relative to the reference's scale, at least 1 (gradients may be ~0 exactly)."""
    assert torch.isfinite(got).all(), "kernel left non-finite (unwritten) elements"
    scale = max(want.double().abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def check_with_grads(kernel_fn, reference_fn, inputs, tol):
    """Forward outputs and input gradients of kernel_fn vs reference_fn under the same weights."""
    ours, ref = leaves(*inputs), leaves(*inputs)
    with poisoned():
        out = kernel_fn(*ours)
        out = out if isinstance(out, tuple) else (out,)
        weights = [torch.randn_like(o, dtype=torch.float32) for o in out]
        loss = sum((o.float() * w).sum() for o, w in zip(out, weights))
        grads = torch.autograd.grad(loss, ours)
    want = reference_fn(*ref)
    want = want if isinstance(want, tuple) else (want,)
    want_grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(want, weights)), ref)
    for got, exp in zip(out + grads, want + want_grads):
        assert got.shape == exp.shape and got.dtype == exp.dtype
        assert_close_rel(got, exp, tol)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ---- gated scan ---------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len, segments, dtype", [
    (37, None, torch.float32), (40, 3, torch.float32), (5, 2, torch.float32), (29, 2, torch.bfloat16),
])
def test_gated_scan_matches_reference(seq_len, segments, dtype):
    torch.manual_seed(seq_len)
    shape = (seq_len, 2, 3, 5)
    x = torch.randn(shape).to(dtype)
    g = torch.sigmoid(torch.randn(shape)).to(dtype)
    h0 = torch.randn(shape[1:]).to(dtype)
    check_with_grads(lambda a, b, c: gated_scan(a, b, c, segments=segments), reference_scan, (x, g, h0), TOL[dtype])


def test_gated_scan_without_initial_state():
    torch.manual_seed(1)
    x, g = torch.randn(21, 40), torch.sigmoid(torch.randn(21, 40))  # 40 channels: two channel blocks
    check_with_grads(gated_scan, reference_scan, (x, g), TOL[torch.float32])


@pytest.mark.parametrize("segments, dtype", [(None, torch.float32), (2, torch.bfloat16)])
def test_shared_gate_scan_matches_reference_on_projection_views(monkeypatch, segments, dtype):
    """k, v, gate logits as strided slices of one fused projection, like the mixer's."""
    monkeypatch.setenv(backend.ENV_VAR, "reference")  # the backend's reference path is the ground truth
    torch.manual_seed(2)
    seq_len, batch, heads, head_dim = 23, 2, 2, 4
    fused = torch.randn(seq_len, batch, heads, 5, head_dim).to(dtype)
    state = torch.randn(batch, 2, heads, head_dim).to(dtype)

    def run(scan):
        return lambda f, s: scan(f[:, :, :, 2], f[:, :, :, 3], f[:, :, :, 4], s)

    check_with_grads(run(lambda k, v, lg, s: gated_scan_kv(k, v, lg, s, segments=segments)), run(backend.shared_gate_scan),
                     (fused, state), TOL[dtype])


def test_scan_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        gated_scan(torch.randn(4, 2), torch.rand(4, 3))
    with pytest.raises(ValueError, match="state"):
        gated_scan_kv(torch.randn(4, 1, 2, 3), torch.randn(4, 1, 2, 3), torch.randn(4, 1, 2, 3), torch.zeros(1, 2))


# ---- fused pattern attention --------------------------------------------------------------

def dilated_attention(q, k, v, pattern, softmax_scale=None, blocks=None):
    """The kernel under a pattern string (the kernel itself takes D, W, P)."""
    pattern = parse_pattern(pattern)
    return dilated_kernel(q, k, v, pattern.dilation, pattern.window, pattern.sinks, softmax_scale, blocks)


def attention_inputs(seq_len, head_dim=16, dtype=torch.float32, batch=2, heads=2, seed=0):
    torch.manual_seed(seed)
    return tuple(torch.randn(seq_len, batch, heads, head_dim).to(dtype) for _ in range(3))


@pytest.mark.parametrize("seq_len, pattern", [
    (37, "dilated:4,w=3,p=2"),     # T not a multiple of the tile or of D
    (50, "dilated:64"),            # D > T, W = P = 0
    (41, "dilated:3"),             # W = P = 0
    (40, "local:w=0"),             # no dilation, W = 0
    (45, "local:w=7,p=3"),
    (30, "dilated:5,w=20,p=40"),   # P > T, W > tile
    (33, "dense"),                 # D = 1 through the kernel
])
def test_pattern_attention_matches_reference(seq_len, pattern):
    inputs = attention_inputs(seq_len, seed=seq_len)
    check_with_grads(lambda q, k, v: dilated_attention(q, k, v, pattern, blocks=TINY_BLOCKS),
                     lambda q, k, v: reference_attention(q, k, v, pattern), inputs, 1e-5)


def test_pattern_attention_bf16_odd_head_dim_and_scale():
    inputs = attention_inputs(35, head_dim=24, dtype=torch.bfloat16, batch=1, seed=7)
    pattern = "dilated:6,w=5,p=1"
    check_with_grads(lambda q, k, v: dilated_attention(q, k, v, pattern, 0.3, blocks=TINY_BLOCKS),
                     lambda q, k, v: reference_attention(q, k, v, pattern, 0.3), inputs, TOL[torch.bfloat16])


@pytest.mark.slow
@pytest.mark.parametrize("seq_len, pattern, head_dim, blocks", [
    (200, "dilated:16,w=8,p=2", 64, ((32, 16, 1), (16, 32, 1))),
    (130, "dilated:7,w=5,p=3", 32, ((32, 32, 1), (32, 16, 1))),
    (150, "local:w=9,p=3", 16, TINY_BLOCKS),
    (100, "dilated:8,w=6,p=2", 128, ((64, 32, 4), (32, 32, 4))),  # the CUDA tiles of fp32 at d_h 128
])
def test_pattern_attention_larger(seq_len, pattern, head_dim, blocks):
    inputs = attention_inputs(seq_len, head_dim=head_dim, batch=1, seed=seq_len)
    check_with_grads(lambda q, k, v: dilated_attention(q, k, v, pattern, blocks=blocks),
                     lambda q, k, v: reference_attention(q, k, v, pattern), inputs, 1e-5)


# ---- top-k block ----------------------------------------------------------------------------

TOPK_CASES = [
    pytest.param(20, "topk:k=2,block=4"),
    pytest.param(21, "topk:k=1,block=3,d=2,w=2,p=1,pool=max"),
    pytest.param(29, "topk:k=0,block=5,w=1", marks=pytest.mark.slow),
    pytest.param(31, "topk:k=3,block=2,d=5", marks=pytest.mark.slow),
    pytest.param(40, "topk:k=2,block=4,d=2,w=3,p=1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("seq_len, pattern", TOPK_CASES)
def test_topk_attention_matches_reference(seq_len, pattern):
    inputs = attention_inputs(seq_len, batch=1, heads=1 if seq_len < 25 else 2, seed=seq_len)
    check_with_grads(lambda q, k, v: backend.kernel_attention(q, k, v, parse_pattern(pattern)),
                     lambda q, k, v: reference_attention(q, k, v, pattern), inputs, 1e-5)


# ---- decode -------------------------------------------------------------------------------

def decode_inputs(dtype, slots, full, seed):
    """Random q and caches [3, 2, slots, 24], per-slot positions (ragged queries, empty and
    duplicate slots marked -1) and query positions. ``full``: slot = position."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, 24, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(3, 2, slots, 24, generator=gen).to(dtype) for _ in range(2))
    query_pos = torch.tensor([slots - 1, 0, slots // 2]) if full else torch.tensor([400, 5, 97])
    if full:
        slot_pos = torch.arange(slots).expand(3, slots).clone()
    else:  # distinct positions <= the query's, shuffled as a ring would hold them; a quarter -1
        slot_pos = torch.stack([torch.randperm(int(t) + 1, generator=gen)[:slots] for t in query_pos.clamp(min=slots)])
        slot_pos = torch.where(slot_pos <= query_pos.unsqueeze(1), slot_pos, -1)
        slot_pos[torch.rand(3, slots, generator=gen) < 0.25] = -1
    never = (slot_pos < 0) | (slot_pos > query_pos.unsqueeze(1))  # empty, duplicate or future: never attended
    k_cache.masked_fill_(never[:, None, :, None], float("inf"))
    return q, k_cache, v_cache, slot_pos, query_pos


@pytest.mark.parametrize("pattern", ["dense", "dilated:4,w=3,p=2", "dilated:7", "local:w=5,p=1", "local:w=0"])
@pytest.mark.parametrize("full, splits, dtype", [(True, None, torch.float32), (False, None, torch.float32),
                                                 (True, 3, torch.float32), (False, 4, torch.bfloat16),
                                                 (True, 2, torch.bfloat16)])
def test_decode_matches_reference(pattern, full, splits, dtype):
    slots = 150
    q, k_cache, v_cache, slot_pos, query_pos = decode_inputs(dtype, slots, full, seed=slots + len(pattern))
    p = parse_pattern(pattern)
    with poisoned():
        out = decode_attention(q, k_cache, v_cache, slot_pos, query_pos, p.dilation or 2 ** 31 - 1, p.window,
                               p.sinks, splits=splits)
    want = reference_decode(q, k_cache, v_cache, slot_pos, query_pos, p)
    assert out.dtype == dtype and torch.isfinite(want).all()
    assert_close_rel(out, want, TOL[dtype])


def test_decode_with_no_visible_slot_gives_zeros():
    q, k_cache, v_cache, slot_pos, query_pos = decode_inputs(torch.float32, 40, False, seed=3)
    slot_pos[1] = -1
    with poisoned():
        out = decode_attention(q, k_cache, v_cache, slot_pos, query_pos, 4, 1, 0, splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close_rel(out, reference_decode(q, k_cache, v_cache, slot_pos, query_pos, parse_pattern("dilated:4,w=1")),
                     TOL[torch.float32])


def test_decode_reference_rejects_misshaped_positions():
    with pytest.raises(ValueError, match="slot_positions"):
        reference_decode(torch.randn(1, 1, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4),
                         torch.arange(4).unsqueeze(0), torch.tensor([3]), parse_pattern("dense"))


# ---- dispatch -----------------------------------------------------------------------------

@pytest.mark.parametrize("setting, expected", [("reference", False), ("triton", True), ("auto", False), ("", False)])
def test_dispatch_follows_env_var_on_cpu(monkeypatch, setting, expected):
    monkeypatch.setenv(backend.ENV_VAR, setting)
    assert backend.use_kernels(torch.device("cpu")) is expected
    assert backend.use_kernels(torch.device("cuda")) is (setting != "reference")


def test_dispatch_rejects_unknown_setting(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="RATPLUS_KERNELS='fast' is not one of auto, triton, reference"):
        backend.use_kernels(torch.device("cpu"))


def test_dispatch_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        backend.use_kernels(torch.device("cpu"))
    assert backend.use_kernels(torch.device("cuda"))


def test_dispatch_logs_choice_once(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_logged", set())
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    with caplog.at_level(logging.INFO, logger=backend.__name__):
        for _ in range(3):
            backend.use_kernels(torch.device("cpu"))
        monkeypatch.setenv(backend.ENV_VAR, "triton")
        backend.use_kernels(torch.device("cpu"))
    messages = [r.getMessage() for r in caplog.records if r.name == backend.__name__]
    assert len(messages) == 2 and "reference ops" in messages[0] and "Triton kernels" in messages[1]


def test_forced_triton_routes_attention_and_scan_to_kernels(monkeypatch):
    calls = []
    kernel = attention_kernels.dilated_attention
    monkeypatch.setattr(attention_kernels, "dilated_attention", lambda *a: calls.append(a[3:6]) or kernel(*a))
    q, k, v = attention_inputs(19, batch=1, heads=1, seed=3)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    out = backend.pattern_attention(q, k, v, "dilated:4,w=2")
    dense = backend.pattern_attention(q, k, v, "dense")  # dense stays on SDPA
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert calls == [(4, 2, 0)]  # dilated:4,w=2 as the kernel's D, W, P
    torch.testing.assert_close(out, reference_attention(q, k, v, "dilated:4,w=2"))
    torch.testing.assert_close(dense, reference_attention(q, k, v, "dense"))

    monkeypatch.setenv(backend.ENV_VAR, "triton")
    x, g = torch.randn(9, 4), torch.rand(9, 4)
    with poisoned():
        h, last = backend.gated_scan(x, g)
    torch.testing.assert_close(h, reference_scan(x, g)[0])
