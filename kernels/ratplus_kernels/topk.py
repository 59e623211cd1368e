"""Top-k block attention over already chosen blocks.

Semantics are those of the reference op ``ops/topk.py`` (docs/DESIGN.md §2): the candidates are
the dilated states (every position without ``d=``), cut into blocks of B; query t attends the
candidates of its chosen earlier blocks, the visible candidates of its own block, its window
and its sinks. The choice itself (q . pooled block key, the K best) is torch ops and is made by
the caller (the backend runs ``ops.topk.select_blocks``); this kernel takes the chosen block
indices. The attention is one Triton program per (query, head), since every query has its own
key set: it walks four disjoint key groups in one online softmax (chosen blocks and own block
minus the window/sink keys, then sinks, then window). Backward recomputes
the probabilities from the saved log-sum-exp; key gradients are scattered with atomic adds
because a key's readers are data-dependent.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LOG2E


@triton.jit
def _step(acc, m_i, l_i, q, do, lse, delta, pos, ok, k_ptr, v_ptr, dk_ptr, dv_ptr, s_s, offs_d, qk_scale, scale,
          HEAD_D: tl.constexpr, BACKWARD: tl.constexpr):
    """One key tile: an online-softmax update (forward) or the dq update and dk/dv scatter (backward)."""
    off = pos.to(tl.int64)[:, None] * s_s + offs_d[None, :]
    tile_mask = ok[:, None] & (offs_d < HEAD_D)[None, :]
    k = tl.load(k_ptr + off, mask=tile_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=tile_mask, other=0.0).to(tl.float32)
    s = tl.where(ok, tl.sum(k * q[None, :], axis=1) * qk_scale, float("-inf"))
    if BACKWARD:
        p = tl.exp2(s - lse)
        ds = p * (tl.sum(v * do[None, :], axis=1) - delta)
        acc += tl.sum(ds[:, None] * k, axis=0)
        tl.atomic_add(dk_ptr + off, ds[:, None] * q[None, :] * scale, mask=tile_mask)
        tl.atomic_add(dv_ptr + off, p[:, None] * do[None, :], mask=tile_mask)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _topk_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr, do_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
                 T, H, K, s_b, s_h, s_s, n_cand, dil, W, P, BLOCK, qk_scale, scale,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BACKWARD: tl.constexpr):
    t, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    k_ptr, v_ptr, dk_ptr, dv_ptr = k_ptr + base, v_ptr + base, dk_ptr + base, dv_ptr + base
    offs_d = tl.arange(0, BLOCK_D)
    row = base + t.to(tl.int64) * s_s + offs_d
    d_ok = offs_d < HEAD_D
    q = tl.load(q_ptr + row, mask=d_ok, other=0.0).to(tl.float32)
    do = q
    lse = 0.0
    delta = 0.0
    if BACKWARD:
        do = tl.load(do_ptr + row, mask=d_ok, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + pid_bh * T + t)
        delta = tl.load(delta_ptr + pid_bh * T + t)
    acc = tl.zeros([BLOCK_D], tl.float32)
    m_i = tl.full([], -1.0e30, tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    lanes = tl.arange(0, BLOCK_K)
    n_visible = (t + 1) // dil
    own = (n_visible + BLOCK - 1) // BLOCK - 1  # block of the last visible candidate (-1: none)
    # chosen blocks (i < K) and the own block (i == K): candidates not already window or sink keys
    for i in range(0, K + 1):
        if i < K:
            blk = tl.load(idx_ptr + (pid_bh * T + t) * K + i)
            c_hi = tl.where(blk >= 0, tl.minimum(blk * BLOCK + BLOCK, n_cand), 0)
        else:
            blk = own
            c_hi = tl.where(own >= 0, n_visible, 0)
        c_lo = tl.maximum(blk, 0) * BLOCK
        for c0 in range(c_lo, c_hi, BLOCK_K):
            pos = (c0 + lanes + 1) * dil - 1
            # not the rule's inverse: skips the candidates the window and sink loops below count
            ok = (c0 + lanes < c_hi) & (t - pos > W) & (pos >= P)
            acc, m_i, l_i = _step(acc, m_i, l_i, q, do, lse, delta, pos, ok, k_ptr, v_ptr, dk_ptr, dv_ptr, s_s,
                                  offs_d, qk_scale, scale, HEAD_D, BACKWARD)
    n_sink = tl.minimum(P, t + 1)
    for j0 in range(0, n_sink, BLOCK_K):
        pos = j0 + lanes
        acc, m_i, l_i = _step(acc, m_i, l_i, q, do, lse, delta, pos, pos < n_sink, k_ptr, v_ptr, dk_ptr, dv_ptr,
                              s_s, offs_d, qk_scale, scale, HEAD_D, BACKWARD)
    for j0 in range(tl.maximum(P, t - W), t + 1, BLOCK_K):
        pos = j0 + lanes
        acc, m_i, l_i = _step(acc, m_i, l_i, q, do, lse, delta, pos, pos <= t, k_ptr, v_ptr, dk_ptr, dv_ptr,
                              s_s, offs_d, qk_scale, scale, HEAD_D, BACKWARD)
    if BACKWARD:
        tl.store(dq_ptr + row, (acc * scale).to(dq_ptr.dtype.element_ty), mask=d_ok)
    else:
        tl.store(o_ptr + row, (acc / l_i).to(o_ptr.dtype.element_ty), mask=d_ok)
        tl.store(lse_ptr + pid_bh * T + t, m_i + tl.log2(l_i))


def _launch(q, k, v, idx, dilation, window, sinks, block, scale, out, lse, grad_out=None, delta=None, dq=None,
            dk=None, dv=None):
    seq_len, batch, heads, head_dim = q.shape
    backward = grad_out is not None
    chosen = idx if idx.numel() else torch.full((1,), -1, dtype=torch.int32, device=q.device)  # K = 0: no null pointer
    _topk_kernel[(seq_len, batch * heads)](
        q, k, v, chosen, out, lse, grad_out if backward else q, delta if backward else lse,
        dq if backward else q, dk if backward else q, dv if backward else q,
        seq_len, heads, idx.shape[2], q.stride(1), q.stride(2), q.stride(0), seq_len // dilation, dilation,
        window, sinks, block, scale * LOG2E, scale,
        HEAD_D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_K=32, BACKWARD=backward)


class _TopkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, numbers, scale):
        q, k, v = (t.contiguous() for t in (q, k, v))
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1] * q.shape[2], q.shape[0]), dtype=torch.float32, device=q.device)
        _launch(q, k, v, idx, *numbers, scale, out, lse)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.meta = (numbers, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, idx, out, lse = ctx.saved_tensors
        numbers, scale = ctx.meta
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).permute(1, 2, 0).contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
        _launch(q, k, v, idx, *numbers, scale, out, lse, grad_out, delta, dq, dk, dv)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor,
                   dilation: Optional[int], window: int, sinks: int, block: int,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v, out [s, b, heads, d_h] attending each query's chosen blocks (differentiable in q, k, v).

    ``selected``: [b, heads, s, K] indices of each query's chosen earlier blocks of ``block``
    candidates (-1: none), e.g. from ``ops.topk.select_blocks``; candidates are every
    ``dilation``-th position (None: every position). Window W and sinks P as in the rule.
    """
    seq_len, batch, heads, _ = q.shape
    if selected.shape[:3] != (batch, heads, seq_len):
        raise ValueError(f"topk_attention: selected {tuple(selected.shape)} must be [b, heads, s, K] = "
                         f"[{batch}, {heads}, {seq_len}, K]")
    idx = selected.reshape(batch * heads, seq_len, selected.shape[3]).to(torch.int32).contiguous()
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _TopkAttention.apply(q, k, v, idx, (dilation or 1, window, sinks, block), float(scale))


__all__ = ["topk_attention"]
