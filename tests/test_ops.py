"""Reference ops against slow, obviously-correct loops and dense-mask softmax."""

import pytest
import torch

from megatron_ratplus.ops import affine_scan, blocked_attention, gated_scan, pattern_attention
from megatron_ratplus.ops.topk import topk_allowed_mask
from megatron_ratplus.patterns import allowed_mask, may_be_seen, parse_pattern, visible


def loop_scan(x, g, h0):
    state, out = h0.double(), []
    for t in range(x.shape[0]):
        state = g[t].double() * state + (1 - g[t].double()) * x[t].double()
        out.append(state)
    return torch.stack(out), state


@pytest.mark.parametrize("seq_len", [1, 37, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_scan_matches_loop(seq_len, dtype):
    torch.manual_seed(seq_len)
    shape = (seq_len, 2, 3, 5) if seq_len < 1000 else (seq_len, 1, 16)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.sigmoid(torch.randn(shape)).to(dtype).requires_grad_()
    h0 = torch.randn(shape[1:], dtype=dtype, requires_grad=True)
    h, h_last = gated_scan(x, g, h0)
    assert h.dtype == dtype and h_last.shape == shape[1:]
    w, w_last = torch.randn(shape), torch.randn(shape[1:])
    grads = torch.autograd.grad((h.float() * w).sum() + (h_last.float() * w_last).sum(), (x, g, h0))

    xs, gs, h0s = (t.detach().double().requires_grad_() for t in (x, g, h0))
    ref, ref_last = loop_scan(xs, gs, h0s)
    ref_grads = torch.autograd.grad((ref * w.double()).sum() + (ref_last * w_last.double()).sum(), (xs, gs, h0s))

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(h.double(), ref.to(dtype).double(), **tol)
    torch.testing.assert_close(h_last.double(), ref_last.to(dtype).double(), **tol)
    for got, want in zip(grads, ref_grads):
        scale = want.abs().max().item() + 1
        torch.testing.assert_close(got.double() / scale, want / scale, **tol)


def test_gated_scan_without_h0_and_zero_gate_is_identity():
    x = torch.randn(9, 2, 4, requires_grad=True)
    h, last = gated_scan(x, torch.zeros_like(x))
    torch.testing.assert_close(h, x)
    torch.testing.assert_close(last, x[-1])


@pytest.mark.parametrize("seq_len", [1, 23, 1025, 3001])  # one chunk; padded; two and three levels of chunks
@pytest.mark.parametrize("reverse", [False, True])
def test_affine_scan_matches_loop(seq_len, reverse):
    a, b, h0 = torch.rand(seq_len, 6) * 0.2 + 0.8, torch.randn(seq_len, 6), torch.randn(6)
    state, out = h0.double(), [None] * seq_len
    for t in (reversed(range(seq_len)) if reverse else range(seq_len)):
        state = a[t].double() * state + b[t].double()
        out[t] = state
    torch.testing.assert_close(affine_scan(a, b, h0, reverse=reverse).double(), torch.stack(out), atol=1e-4, rtol=1e-4)


def test_gated_scan_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        gated_scan(torch.randn(4, 2), torch.rand(4, 3))
    with pytest.raises(ValueError, match="h0"):
        gated_scan(torch.randn(4, 2), torch.rand(4, 2), torch.zeros(3))


def masked_reference(q, k, v, mask, scale=None):
    """Softmax attention with an explicit [T, T] (or [b, h, T, T]) mask, in float64."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("tbhd,jbhd->bhtj", q.double(), k.double()) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhtj,jbhd->tbhd", probs, v.double())


def _compare(pattern, seq_len, mask_fn, seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(seq_len, 2, 3, 8, requires_grad=True) for _ in range(3))
    out = pattern_attention(q, k, v, pattern)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = masked_reference(q, k, v, mask_fn(q, k))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seq_len, d, w, p", [
    (64, 1, 0, 0), (100, 4, 0, 0), (131, 16, 0, 0), (130, 7, 5, 3), (50, 64, 0, 0),
    (300, 16, 8, 2), (257, 3, 150, 200), (20, 1, 4, 2), (140, 200, 3, 1),
])
def test_dilated_attention_matches_mask(seq_len, d, w, p):
    pattern = f"dilated:{d},w={w},p={p}"
    _compare(pattern, seq_len, lambda q, k: allowed_mask(parse_pattern(pattern), seq_len))


@pytest.mark.parametrize("pattern, start, n_q", [
    ("dilated:4,w=3,p=2", 300, 290),   # several query blocks after a gap-riddled prefix
    ("dilated:16,w=40,p=5", 517, 140),
    ("local:w=9,p=3", 260, 131),
    ("dilated:7", 0, 263),             # no earlier keys: the queries' own keys only
])
def test_blocked_attention_over_explicit_key_positions_matches_mask(pattern, start, n_q):
    """Keys at explicit ascending positions (a context-parallel slice: the earlier tokens the
    queries may see, with gaps, then the queries' own), queries at start.. : equal to softmax
    over the rule's mask on exactly those keys, gradients included."""
    rule = parse_pattern(pattern)
    earlier = torch.arange(start)
    positions = torch.cat([earlier[may_be_seen(rule, earlier, start)], torch.arange(start, start + n_q)])
    torch.manual_seed(start + n_q)
    q = torch.randn(n_q, 2, 3, 8, requires_grad=True)
    k, v = (torch.randn(len(positions), 2, 3, 8, requires_grad=True) for _ in range(2))
    out = blocked_attention(q, k, v, rule, 0.3, start, positions)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = visible(rule, torch.arange(start, start + n_q).unsqueeze(1), positions.unsqueeze(0))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    probs = (torch.einsum("tbhd,jbhd->bhtj", q64, k64) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1)
    ref = torch.einsum("bhtj,jbhd->tbhd", probs, v64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the no-graph path (evaluation, serving prefill) computes the same
        torch.testing.assert_close(blocked_attention(q, k, v, rule, 0.3, start, positions), out)


@pytest.mark.parametrize("pattern", ["local:w=0", "local:w=9,p=3", "dense"])
def test_local_and_dense_attention_match_mask(pattern):
    _compare(pattern, 150, lambda q, k: allowed_mask(parse_pattern(pattern), 150))


def brute_force_topk_mask(q, k, pattern, scale):
    """Per-query Python loop implementing the top-k rule from its definition."""
    pattern = parse_pattern(pattern)
    seq_len, batch, heads, _ = q.shape
    d = pattern.dilation or 1
    states = [j for j in range(seq_len) if (j + 1) % d == 0]
    blocks = [states[i:i + pattern.block] for i in range(0, len(states), pattern.block)]
    mask = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for t in range(seq_len):
                visible = [j for j in states if j <= t]
                chosen = set()
                if visible:
                    own = (len(visible) - 1) // pattern.block
                    chosen |= set(j for j in blocks[own] if j <= t)
                    scored = []
                    for i in range(own):
                        keys = k[blocks[i], b, h].double()
                        pooled = keys.mean(0) if pattern.pool == "mean" else keys.max(0).values
                        scored.append(((q[t, b, h].double() @ pooled).item() * scale, i))
                    for _, i in sorted(scored, reverse=True)[:pattern.topk]:
                        chosen |= set(blocks[i])
                for j in range(t + 1):
                    if j in chosen or t - j <= pattern.window or j < pattern.sinks:
                        mask[b, h, t, j] = True
    return mask


@pytest.mark.parametrize("pattern", ["topk:k=2,block=4", "topk:k=1,block=3,d=2,w=2,p=1,pool=max",
                                     "topk:k=0,block=5,w=1", "topk:k=3,block=2,d=5"])
def test_topk_mask_matches_brute_force(pattern):
    torch.manual_seed(3)
    q, k = torch.randn(29, 1, 2, 8), torch.randn(29, 1, 2, 8)
    scale = 8 ** -0.5
    got = topk_allowed_mask(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), parse_pattern(pattern), scale)
    assert torch.equal(got, brute_force_topk_mask(q, k, pattern, scale))


def test_topk_attention_matches_mask():
    pattern = "topk:k=2,block=4,d=2,w=3,p=1"
    _compare(pattern, 61, lambda q, k: topk_allowed_mask(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), parse_pattern(pattern), 8 ** -0.5))
