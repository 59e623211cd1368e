"""The RAT+ mixer against a hand-written, loop-based reference of docs/DESIGN.md §1."""

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_ratplus.config import preset
from megatron_ratplus.layers.specs import get_ratplus_layer_local_spec
from megatron_ratplus.patterns import allowed_mask, parse_pattern
from megatron.core.transformer.spec_utils import build_module

pytestmark = pytest.mark.usefixtures("megatron_single")


def make_mixer(recurrence=True, pattern="dense", seed=0):
    torch.manual_seed(seed)
    config = preset("tiny", hidden_size=32, num_attention_heads=2, recurrence=recurrence,
                    attention_pattern=pattern)
    spec = get_ratplus_layer_local_spec().submodules.self_attention
    return build_module(spec, config=config, layer_number=1), config


def rope(x, base=10000.0):
    """Rotate-half RoPE by token position, x: [s, b, h, d]."""
    s, d = x.shape[0], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)[:, None, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def reference_mixer(x, w_in, w_out, heads, recurrence, pattern, use_rope):
    """docs/DESIGN.md §1 written out with loops, float64, per-head interleaved W_in rows."""
    s, b, d = x.shape
    dh, parts = d // heads, 5 if recurrence else 4
    mixed = (x.double() @ w_in.double().T).view(s, b, heads, parts, dh)
    o, q, k, v = (mixed[:, :, :, i] for i in range(4))
    if recurrence:
        g = torch.sigmoid(mixed[:, :, :, 4])
        ks, vs, kt, vt = [], [], torch.zeros_like(k[0]), torch.zeros_like(v[0])
        for t in range(s):
            kt = g[t] * kt + (1 - g[t]) * k[t]
            vt = g[t] * vt + (1 - g[t]) * v[t]
            ks.append(kt)
            vs.append(vt)
        k, v = torch.stack(ks), torch.stack(vs)
    if use_rope:
        q, k = rope(q), rope(k)
    scores = torch.einsum("tbhd,jbhd->bhtj", q, k) / math.sqrt(dh)
    scores = scores.masked_fill(~allowed_mask(parse_pattern(pattern), s), float("-inf"))
    y = torch.einsum("bhtj,jbhd->tbhd", scores.softmax(-1), v)
    return (torch.sigmoid(o) * y).reshape(s, b, d) @ w_out.double().T


@pytest.mark.parametrize("recurrence", [True, False])
@pytest.mark.parametrize("pattern", ["dense", "dilated:4,w=2,p=1", "local:w=3"])
def test_mixer_matches_reference(recurrence, pattern):
    mixer, config = make_mixer(recurrence, pattern)
    rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000)
    x = torch.randn(23, 2, config.hidden_size, requires_grad=True)
    out, bias = mixer(x, rotary_pos_emb=rotary(23))
    assert bias is None
    ref = reference_mixer(x, mixer.linear_in.weight, mixer.linear_out.weight, config.num_attention_heads,
                          recurrence, pattern, use_rope=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, mixer.linear_in.weight), grad)
    want = torch.autograd.grad(ref, (x, mixer.linear_in.weight), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_dense_equals_dilated_1():
    mixer, config = make_mixer(pattern="dense")
    x = torch.randn(17, 2, config.hidden_size, requires_grad=True)
    out_dense, _ = mixer(x)
    g_dense = torch.autograd.grad(out_dense.sum(), mixer.linear_in.weight)[0]
    mixer.set_attention_pattern("dilated:1")
    out_d1, _ = mixer(x)
    g_d1 = torch.autograd.grad(out_d1.sum(), mixer.linear_in.weight)[0]
    torch.testing.assert_close(out_dense, out_d1)
    torch.testing.assert_close(g_dense, g_d1)


def test_baseline_is_causal_attention_with_output_gate():
    mixer, config = make_mixer(recurrence=False)
    assert mixer.linear_in.weight.shape[0] == 4 * config.hidden_size
    x = torch.randn(19, 3, config.hidden_size)
    out, _ = mixer(x)
    s, b, d = x.shape
    o, q, k, v = (x @ mixer.linear_in.weight.T).view(s, b, 2, 4, d // 2).unbind(3)
    y = torch.nn.functional.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True).permute(2, 0, 1, 3)
    expected = (torch.sigmoid(o) * y).reshape(s, b, d) @ mixer.linear_out.weight.T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_zero_gate_recurrence_is_identity():
    mixer, _ = make_mixer()
    k, v = torch.randn(11, 2, 2, 16), torch.randn(11, 2, 2, 16)
    k_rec, v_rec, last = mixer.recur(k, v, torch.full_like(k, -1e4))
    torch.testing.assert_close(k_rec, k)
    torch.testing.assert_close(v_rec, v)
    # and a gate of one keeps the zero initial state
    k_rec, _, _ = mixer.recur(k, v, torch.full_like(k, 1e4))
    assert torch.count_nonzero(k_rec) == 0
