"""Reference pattern attention (docs/DESIGN.md §2): causal softmax attention restricted to a pattern.

FlexAttention has no CPU backward, and a dense T x T mask would cost as much as dense attention,
so sparse patterns are computed block by block over a *compact* key set. For the queries of one
block [t0, t1) the visible keys are the sinks and dilated states before lo = max(0, t0 - W),
which every query of the block sees (``patterns.may_be_seen`` at t0), and the near keys
[lo, t1), masked per query by the rule (``patterns.visible``). Each block is one
`scaled_dot_product_attention` call (torch's fused CPU kernel, with backward) on about
P + t0/D + W + block keys instead of t1: total work O(T (T/D + W + P)).

:func:`blocked_attention` takes the keys' positions explicitly, so the same code serves one rank
(keys 0..T-1) and a context-parallel slice, whose keys are the exchanged public tokens of
earlier chunks plus its own slice (docs/DESIGN.md §4).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ratplus.patterns import AttentionPattern, may_be_seen, parse_pattern, visible

QUERY_BLOCK = 128


def _as_index(cols: torch.Tensor, device):
    """CPU column indices as a slice when they are one contiguous run (no copy), else on ``device``."""
    first, last = int(cols[0]), int(cols[-1])
    return slice(first, last + 1) if last - first + 1 == len(cols) else cols.to(device)


class _BlockedAttention(torch.autograd.Function):
    """Query blocks over their compact key sets.

    Autograd through per-block gathers would allocate a full-size zero key gradient per block
    (T/block of them); instead each block's small graph is kept and its key gradients are added
    back into one buffer by index.
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, query_start, key_positions):
        q, k, v = q.detach(), k.detach(), v.detach()
        n_q = q.shape[0]
        blocks, outputs = [], []
        with torch.enable_grad():
            for t0 in range(query_start, query_start + n_q, QUERY_BLOCK):
                t1 = min(query_start + n_q, t0 + QUERY_BLOCK)
                near = (key_positions >= t0) & (key_positions < t1)
                far = (key_positions < t0) & may_be_seen(pattern, key_positions, t0)
                cols = torch.nonzero(near | far).flatten()
                mask = visible(pattern, torch.arange(t0, t1).unsqueeze(1), key_positions[cols].unsqueeze(0))
                cols = _as_index(cols, k.device)
                rows = slice(t0 - query_start, t1 - query_start)
                qb, kb, vb = (t.requires_grad_() for t in (q[rows], k[cols], v[cols]))
                out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (qb, kb, vb)),
                                                     attn_mask=mask.to(q.device), scale=scale).permute(2, 0, 1, 3)
                blocks.append((rows, cols, qb, kb, vb, out))
                outputs.append(out.detach())
        ctx.blocks, ctx.shapes = blocks, (q.shape, k.shape)
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_out):
        q_shape, k_shape = ctx.shapes
        grad_q = grad_out.new_zeros(q_shape)
        grad_k, grad_v = grad_out.new_zeros(k_shape), grad_out.new_zeros(k_shape)
        for rows, cols, qb, kb, vb, out in ctx.blocks:
            gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), grad_out[rows])
            grad_q[rows] = gq
            if isinstance(cols, slice):
                grad_k[cols] += gk
                grad_v[cols] += gv
            else:
                grad_k.index_add_(0, cols, gk)
                grad_v.index_add_(0, cols, gv)
        ctx.blocks = None
        return grad_q, grad_k, grad_v, None, None, None, None


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern,
                      softmax_scale: Optional[float] = None, query_start: int = 0,
                      key_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of queries at positions query_start.. over keys at ``key_positions`` under the rule.

    q [s_q, b, heads, d_h]; k, v [s_k, b, heads, d_h]; ``key_positions``: [s_k] ascending global
    positions (a CPU tensor; default 0..s_k-1) that must include every key the queries may see.
    Returns [s_q, b, heads, d_h]. Top-k selection is not applied (see ops.topk).
    """
    if key_positions is None:
        key_positions = torch.arange(k.shape[0])
    return _BlockedAttention.apply(q, k, v, pattern, softmax_scale, query_start, key_positions)


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern,
                      softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention under ``pattern``; q, k, v and the output are [s, b, heads, d_h]."""
    pattern = parse_pattern(pattern)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"pattern_attention: expected q, k, v as [s, b, heads, d_h], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if pattern.kind == "topk":
        from megatron_ratplus.ops.topk import topk_block_attention

        qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
        return topk_block_attention(qh, kh, vh, pattern, softmax_scale).permute(2, 0, 1, 3)
    if pattern.is_dense:
        qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=softmax_scale).permute(2, 0, 1, 3)
    return blocked_attention(q, k, v, pattern, softmax_scale)
