"""Reference pattern attention (docs/DESIGN.md §2): causal softmax attention restricted to a pattern.

FlexAttention has no CPU backward, and a dense T x T mask would cost as much as dense attention,
so sparse patterns are computed block by block over a *compact* key set. For the queries of one
block [t0, t1) the visible keys are the far keys (sinks and dilated states) before
lo = max(0, t0 - W), which every query of the block sees, and the near keys [lo, t1), masked per
query by the rule (``patterns.visible``). The far keys are gathered once, so a block's keys are
a prefix of them followed by one contiguous run. Each block is one
`scaled_dot_product_attention` call (torch's fused CPU kernel, with backward) on about
P + t0/D + W + block keys instead of t1: total work O(T (T/D + W + P)).

:func:`blocked_attention` takes the keys' positions explicitly, so the same code serves one rank
(keys 0..T-1) and a context-parallel slice, whose keys are the exchanged public tokens of
earlier chunks plus its own slice (docs/DESIGN.md §4).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ratplus.patterns import AttentionPattern, may_be_seen, parse_pattern, visible

QUERY_BLOCK = 256


class _BlockedAttention(torch.autograd.Function):
    """Query blocks over their compact key sets.

    The far keys (sinks and dilated states) are gathered once; a block's keys are a prefix of
    them plus one contiguous run of near keys, so a block needs no index of its own. Autograd
    through per-block gathers would allocate a full-size zero key gradient per block (T/block of
    them); instead each block's small graph is kept and its key gradients are added back into one
    buffer per key set.
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, query_start, key_positions, keep_graphs):
        q, k, v = q.detach(), k.detach(), v.detach()
        n_q = q.shape[0]
        far = torch.nonzero(may_be_seen(pattern, key_positions, math.inf)).flatten()  # sinks and states
        far_positions, far = key_positions[far], far.to(k.device)
        k_far, v_far = k[far], v[far]
        out = q.new_empty(q.shape[:3] + v.shape[3:])
        blocks = []
        with torch.set_grad_enabled(keep_graphs):  # no backward to come (evaluation, recomputation's first pass): no graphs
            for t0 in range(query_start, query_start + n_q, QUERY_BLOCK):
                t1 = min(query_start + n_q, t0 + QUERY_BLOCK)
                lo = t0 - pattern.window
                n_far = int(torch.searchsorted(far_positions, lo))  # far keys before the block's window
                a, b = (int(i) for i in torch.searchsorted(key_positions, torch.tensor([lo, t1])))
                # every query of the block sees its far keys; the near keys [lo, t1) by the rule
                near = visible(pattern, torch.arange(t0, t1).unsqueeze(1), key_positions[a:b].unsqueeze(0))
                mask = torch.zeros(t1 - t0, n_far + b - a, dtype=q.dtype)
                mask[:, n_far:].masked_fill_(~near, -math.inf)
                rows = slice(t0 - query_start, t1 - query_start)
                parts = [q[rows], k_far[:n_far], k[a:b], v_far[:n_far], v[a:b]]
                if keep_graphs:
                    parts = [t.requires_grad_() for t in parts]
                qb, kb, vb = parts[0], torch.cat(parts[1:3]), torch.cat(parts[3:])
                block = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (qb, kb, vb)),
                                                       attn_mask=mask.to(q.device), scale=scale).permute(2, 0, 1, 3)
                if keep_graphs:
                    blocks.append((rows, n_far, slice(a, b), parts, block))
                out[rows] = block.detach()
        ctx.blocks, ctx.far, ctx.shapes = blocks, far, (q.shape, k.shape, v.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_shape, k_shape, v_shape = ctx.shapes
        grad_q = grad_out.new_zeros(q_shape)
        grad_k, grad_v = grad_out.new_zeros(k_shape), grad_out.new_zeros(v_shape)
        grad_k_far = grad_out.new_zeros((len(ctx.far),) + k_shape[1:])
        grad_v_far = grad_out.new_zeros((len(ctx.far),) + v_shape[1:])
        for rows, n_far, near, parts, block in ctx.blocks:
            gq, gkf, gk, gvf, gv = torch.autograd.grad(block, parts, grad_out[rows])
            grad_q[rows] = gq
            grad_k_far[:n_far] += gkf
            grad_v_far[:n_far] += gvf
            grad_k[near] += gk
            grad_v[near] += gv
        grad_k.index_add_(0, ctx.far, grad_k_far)
        grad_v.index_add_(0, ctx.far, grad_v_far)
        ctx.blocks = None
        return grad_q, grad_k, grad_v, None, None, None, None, None


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
    keep_graphs = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _BlockedAttention.apply(q, k, v, pattern, softmax_scale, query_start, key_positions, keep_graphs)


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
