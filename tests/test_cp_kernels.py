"""The context-parallel attention on the Triton kernels (docs/DESIGN.md §4), run by Triton's
interpreter on CPU: the slice kernel over explicit key positions against the reference blocked
attention, and a whole CP forward + backward (every rank simulated in one process) with the
kernels forced against single-rank attention."""

import pytest
import torch

from megatron_ratplus import backend, ops
from megatron_ratplus.layers.context_parallel.attention import attend_slices, pack_public, public_offsets
from megatron_ratplus.patterns import may_be_seen, parse_pattern
from ratplus_kernels import scan as scan_kernels
from ratplus_kernels import slice_attention as slice_kernels
from test_kernels import check_with_grads
from test_parallel_units import from_ranks, simulated_cp_scan, to_ranks


def spy(monkeypatch, module, name):
    """Count calls of ``module.name`` (the backend imports kernels at call time)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def slice_key_positions(pattern, chunk_len, chunk):
    """The key positions a CP slice attends: earlier chunks' public tokens it may see, then itself."""
    start = chunk * chunk_len
    earlier = [public_offsets(pattern, c, chunk_len) + c * chunk_len for c in range(chunk)]
    earlier = torch.cat(earlier) if earlier else torch.zeros(0, dtype=torch.long)
    return torch.cat([earlier[may_be_seen(pattern, earlier, start)], torch.arange(start, start + chunk_len)])


@pytest.mark.parametrize("pattern, chunk_len, chunk", [
    ("dilated:4,w=3,p=2", 19, 2),     # slice not a multiple of D or of the tile
    ("dilated:5,w=30,p=1", 11, 5),    # W > chunk: the halo spans several chunks
    ("local:w=7,p=3", 13, 4),         # no dilation
    ("dilated:16,w=8,p=20", 18, 3),   # P > chunk; D near the slice length
    ("dilated:3,w=2", 21, 0),         # first chunk: no far public keys, own states only
])
def test_slice_kernel_matches_reference(monkeypatch, pattern, chunk_len, chunk):
    pattern = parse_pattern(pattern)
    positions = slice_key_positions(pattern, chunk_len, chunk)
    torch.manual_seed(chunk_len * 10 + chunk)
    q = torch.randn(chunk_len, 2, 2, 16)
    k, v = (torch.randn(len(positions), 2, 2, 16) for _ in range(2))
    start = chunk * chunk_len
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    calls = spy(monkeypatch, slice_kernels, "slice_attention")
    check_with_grads(lambda q, k, v: backend.blocked_attention(q, k, v, pattern, 0.3, start, positions),
                     lambda q, k, v: ops.blocked_attention(q, k, v, pattern, 0.3, start, positions), (q, k, v), 1e-5)
    assert calls == [1]


def test_slice_kernel_refuses_keys_that_are_not_the_own_slice(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    q = torch.randn(4, 1, 1, 16)
    with pytest.raises(ValueError, match="own slice"):
        backend.blocked_attention(q, q, q, parse_pattern("dilated:2"), None, 4, torch.tensor([4, 5, 6, 8]))


@pytest.mark.parametrize("pattern, size, seq", [("dilated:5,w=3,p=1", 2, 76), ("local:w=9,p=2", 3, 66)])
def test_cp_attention_on_kernels_matches_single_rank(monkeypatch, pattern, size, seq):
    torch.manual_seed(seq)
    pattern = parse_pattern(pattern)
    q, k, v = (torch.randn(seq, 2, 2, 16, requires_grad=True) for _ in range(3))
    weight = torch.randn(seq, 2, 2, 16)
    ref = ops.pattern_attention(q, k, v, pattern, 0.3)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))

    monkeypatch.setenv(backend.ENV_VAR, "triton")
    calls = spy(monkeypatch, slice_kernels, "slice_attention")
    ks, vs, qs = to_ranks(k, size), to_ranks(v, size), to_ranks(q, size)
    public = torch.cat([pack_public(kr, vr, pattern, r, size) for r, (kr, vr) in enumerate(zip(ks, vs))])
    out = from_ranks([attend_slices(qs[r], ks[r], vs[r], public, pattern, r, size, 0.3) for r in range(size)], size)
    assert len(calls) == 2 * size  # every slice on the kernel
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_cp_scan_on_kernels_matches_single_rank(monkeypatch):
    """The CP scan's local step (backend.gated_scan from a zero state) on the scan kernel."""
    torch.manual_seed(3)
    x = torch.randn(44, 2, 3, requires_grad=True)
    g = torch.rand(44, 2, 3).clamp(0.05, 0.95).requires_grad_()
    h0 = torch.randn(2, 3, requires_grad=True)
    weight = torch.randn(44, 2, 3)
    ref, _ = ops.gated_scan(x, g, h0)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (x, g, h0))
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    calls = spy(monkeypatch, scan_kernels, "gated_scan")
    out, _ = simulated_cp_scan(x, g, h0, 2)
    assert len(calls) == 4  # two slices on each of two ranks
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "g", "h0"), torch.autograd.grad((out * weight).sum(), (x, g, h0)), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
