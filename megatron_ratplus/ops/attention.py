"""Reference pattern attention (DESIGN §1, §4): causal softmax attention restricted to a pattern.

FlexAttention has no CPU backward, and a dense T x T mask would cost as much as dense attention,
so sparse patterns are computed block by block over a *compact* key set. For the queries of one
block [t0, t1) the visible keys split into three disjoint groups, all gathered as contiguous
slices:

    sinks      j in [0, min(P, lo))                    always visible
    dilated    chunk ends j = mD - 1 in [P, lo)        always visible (a strided view of K)
    near       j in [lo, t1), lo = max(0, t0 - W)      masked per query by the full rule

and each block is one `scaled_dot_product_attention` call (torch's fused CPU kernel, with
backward) on about P + t0/D + W + block keys instead of t1. Total work is O(T (T/D + W + P)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ratplus.patterns import AttentionPattern, parse_pattern

QUERY_BLOCK = 128


def _near_mask(pattern: AttentionPattern, t0: int, t1: int, lo: int, device) -> torch.Tensor:
    t = torch.arange(t0, t1, device=device).unsqueeze(1)
    j = torch.arange(lo, t1, device=device).unsqueeze(0)
    allowed = (t - j <= pattern.window) | (j < pattern.sinks)
    if pattern.dilation is not None:
        allowed |= (j + 1) % pattern.dilation == 0
    return allowed & (j <= t)


def _key_groups(pattern: AttentionPattern, t0: int, t1: int):
    """The disjoint key groups of query block [t0, t1): (sinks end, dilated state range, near range)."""
    lo = max(0, t0 - pattern.window)
    n_sink = min(pattern.sinks, lo)
    first = last = 0
    if pattern.dilation:
        first = max(0, -(-(pattern.sinks + 1) // pattern.dilation) - 1)  # first state at j >= P
        last = max(first, lo // pattern.dilation)  # states m with (m + 1) D - 1 < lo
    return n_sink, (first, last), (lo, t1)


class _BlockSparseAttention(torch.autograd.Function):
    """Block loop over compact key sets.

    Autograd through the slices would allocate a full-size zero gradient per slice (T/block of
    them); instead each block's small graph is kept and its key gradients are added back into
    the three source ranges by hand.
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, block):
        seq_len, dilation = q.shape[2], pattern.dilation
        q, k, v = q.detach(), k.detach(), v.detach()
        blocks, outputs = [], []
        with torch.enable_grad():
            for t0 in range(0, seq_len, block):
                t1 = min(seq_len, t0 + block)
                n_sink, (first, last), (lo, hi) = _key_groups(pattern, t0, t1)
                parts = [slice(0, n_sink), slice(lo, hi)]
                if last > first:
                    parts.insert(1, slice((first + 1) * dilation - 1, last * dilation, dilation))
                keys = torch.cat([k[:, :, s] for s in parts], dim=2).requires_grad_()
                values = torch.cat([v[:, :, s] for s in parts], dim=2).requires_grad_()
                n_far = keys.shape[2] - (hi - lo)
                near = _near_mask(pattern, t0, t1, lo, q.device)
                mask = torch.cat([near.new_ones(t1 - t0, n_far), near], dim=1)
                query = q[:, :, t0:t1].detach().requires_grad_()
                out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
                blocks.append((t0, t1, parts, query, keys, values, out))
                outputs.append(out.detach())
        ctx.blocks = blocks
        ctx.shape = k.shape
        return torch.cat(outputs, dim=2)

    @staticmethod
    def backward(ctx, grad_out):
        grad_q = grad_out.new_zeros(ctx.shape)
        grad_k, grad_v = torch.zeros_like(grad_q), torch.zeros_like(grad_q)
        for t0, t1, slices, query, keys, values, out in ctx.blocks:
            gq, gk, gv = torch.autograd.grad(out, (query, keys, values), grad_out[:, :, t0:t1])
            grad_q[:, :, t0:t1] = gq
            offset = 0
            for s in slices:
                n = len(range(*s.indices(ctx.shape[2])))
                grad_k[:, :, s] += gk[:, :, offset:offset + n]
                grad_v[:, :, s] += gv[:, :, offset:offset + n]
                offset += n
        ctx.blocks = None
        return grad_q, grad_k, grad_v, None, None, None


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern,
                      softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention under ``pattern``; q, k, v and the output are [s, b, heads, d_h]."""
    pattern = parse_pattern(pattern)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"pattern_attention: expected q, k, v as [s, b, heads, d_h], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    if pattern.kind == "topk":
        from megatron_ratplus.ops.topk import topk_block_attention

        out = topk_block_attention(qh, kh, vh, pattern, softmax_scale)
    elif pattern.is_dense:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=softmax_scale)
    else:
        out = _BlockSparseAttention.apply(qh, kh, vh, pattern, softmax_scale, QUERY_BLOCK)
    return out.permute(2, 0, 1, 3)
