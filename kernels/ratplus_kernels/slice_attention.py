"""Pattern attention of one context-parallel slice over keys at explicit positions, forward and backward.

A CP slice holds queries at positions [Q0, Q0 + c) and attends (docs/DESIGN.md §4) the public
tokens of earlier chunks, which sit at scattered positions, plus its own slice. The rule
(``visible_rule``) is applied per tile on (query position, key position); no mask is stored.
The keys come in two groups, as in attention.py's far/near split:

    far    a compact list at int32 positions ``far_pos`` (ascending): the earlier chunks'
           public tokens and the own slice's sinks and dilated states; a far key counts for a
           query tile [t0, t1) when its position is < max(t0 - W, Q0)
    near   the own slice [max(t0 - W, Q0), t1), contiguous

so a tile's work is O(far + W + tile). The caller gathers the far list (own states included)
with autograd, which scatters their gradients back.

Backward as in attention.py (FlashAttention-2 style from the saved log-sum-exp): dQ walks the
same groups; dK/dV per key tile, near tiles over the query tiles whose near range holds them,
far tiles over the query tiles that see them as far keys, so there are no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LOG2E
from .attention import _blocks, _dkv_tile, _dq_tile, _fwd_tile, _rows


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, kf_ptr, vf_ptr, pf_ptr, o_ptr, lse_ptr, C, NF, Q0, H, s_b, s_h, s_s,
                f_b, f_h, f_s, D, W, P, qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    f_base = (pid_bh // H) * f_b + (pid_bh % H) * f_h
    t0 = Q0 + pid_m * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    end = Q0 + C
    t_ok = t < end
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    q = _rows(q_ptr + base, t - Q0, t_ok, s_s, offs_d, HEAD_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lo = tl.maximum(t0 - W, Q0)
    for f0 in range(0, NF, BLOCK_N):
        slot = f0 + cols
        pos = tl.load(pf_ptr + slot, mask=slot < NF, other=0)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, t, t_ok, kf_ptr + f_base, vf_ptr + f_base, slot, pos,
                                  (slot < NF) & (pos < lo), f_s, offs_d, qk_scale, D, W, P, HEAD_D)
    hi = tl.minimum(t0 + BLOCK_M, end)
    for j0 in range(lo, hi, BLOCK_N):
        pos = j0 + cols
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, t, t_ok, k_ptr + base, v_ptr + base, pos - Q0, pos, pos < hi,
                                  s_s, offs_d, qk_scale, D, W, P, HEAD_D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + base + (t - Q0).to(tl.int64)[:, None] * s_s + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_d < HEAD_D)[None, :])
    tl.store(lse_ptr + pid_bh * C + t - Q0, m_i + tl.log2(l_safe), mask=t_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, kf_ptr, vf_ptr, pf_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, C, NF, Q0, H,
               s_b, s_h, s_s, f_b, f_h, f_s, D, W, P, qk_scale, scale, HEAD_D: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    f_base = (pid_bh // H) * f_b + (pid_bh % H) * f_h
    t0 = Q0 + pid_m * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    end = Q0 + C
    t_ok = t < end
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    q = _rows(q_ptr + base, t - Q0, t_ok, s_s, offs_d, HEAD_D)
    do = _rows(do_ptr + base, t - Q0, t_ok, s_s, offs_d, HEAD_D)
    lse = tl.load(lse_ptr + pid_bh * C + t - Q0, mask=t_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * C + t - Q0, mask=t_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(t0 - W, Q0)
    for f0 in range(0, NF, BLOCK_N):
        slot = f0 + cols
        pos = tl.load(pf_ptr + slot, mask=slot < NF, other=0)
        dq = _dq_tile(dq, q, do, lse, delta, t, t_ok, kf_ptr + f_base, vf_ptr + f_base, slot, pos,
                      (slot < NF) & (pos < lo), f_s, offs_d, qk_scale, D, W, P, HEAD_D)
    hi = tl.minimum(t0 + BLOCK_M, end)
    for j0 in range(lo, hi, BLOCK_N):
        pos = j0 + cols
        dq = _dq_tile(dq, q, do, lse, delta, t, t_ok, k_ptr + base, v_ptr + base, pos - Q0, pos, pos < hi, s_s,
                      offs_d, qk_scale, D, W, P, HEAD_D)
    tl.store(dq_ptr + base + (t - Q0).to(tl.int64)[:, None] * s_s + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=t_ok[:, None] & (offs_d < HEAD_D)[None, :])


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, pf_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, C, NF, Q0, H,
                s_b, s_h, s_s, k_b, k_h, k_s, g_b, g_h, g_s, D, W, P, qk_scale, scale, NEAR: tl.constexpr,
                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """NEAR: key tile = own rows [pid * BLOCK_N, ...) (k_ptr is the own slice). Far: k_ptr is the
    far list, rows = slots, positions from pf_ptr. Gradients go to dk/dv rows of the same index."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    k_base = (pid_bh // H) * k_b + (pid_bh % H) * k_h
    offs_d = tl.arange(0, BLOCK_D)
    idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    end = Q0 + C
    if NEAR:
        pos = Q0 + idx
        ok = pos < end
        t_start = Q0 + (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        t_stop = tl.minimum(Q0 + pid_n * BLOCK_N + BLOCK_N - 1 + W + 1, end)
    else:
        ok = idx < NF
        pos = tl.load(pf_ptr + idx, mask=ok, other=0)
        j_min = tl.min(tl.where(ok, pos, end), axis=0)
        # an own-slice key is far only for tiles with t0 - W > j; earlier chunks' keys for every tile
        skip = tl.where(j_min >= Q0, (tl.maximum(j_min + W + 1 - Q0, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        t_start = Q0 + skip
        t_stop = end
    k = _rows(k_ptr + k_base, idx, ok, k_s, offs_d, HEAD_D)
    v = _rows(v_ptr + k_base, idx, ok, k_s, offs_d, HEAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_M):  # query rows sit at position - Q0: shift the pointers
        dk, dv = _dkv_tile(dk, dv, k, v, pos, ok, q_ptr + base - Q0 * s_s, do_ptr + base - Q0 * s_s,
                           lse_ptr + pid_bh * C - Q0, delta_ptr + pid_bh * C - Q0, t0, end, s_s, offs_d,
                           qk_scale, D, W, P, Q0, NEAR, HEAD_D, BLOCK_M)
    g_off = (pid_bh // H) * g_b + (pid_bh % H) * g_h + idx.to(tl.int64)[:, None] * g_s + offs_d[None, :]
    g_mask = ok[:, None] & (offs_d < HEAD_D)[None, :]
    tl.store(dk_ptr + g_off, dk * scale, mask=g_mask)
    tl.store(dv_ptr + g_off, dv, mask=g_mask)


class _SliceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, far_k, far_v, far_pos, query_start, dil, window, sinks, scale, blocks):
        c, batch, heads, head_dim = q.shape
        q, k, v, far_k, far_v = (t.contiguous() for t in (q, k, v, far_k, far_v))
        far_pos = far_pos.to(device=q.device, dtype=torch.int32).contiguous()
        (bm, bn, warps), bwd_blocks = blocks or _blocks(q.device, q.dtype, head_dim)
        out = torch.empty_like(q)
        lse = torch.empty((batch * heads, c), dtype=torch.float32, device=q.device)
        block_d = max(16, triton.next_power_of_2(head_dim))
        _fwd_kernel[(triton.cdiv(c, bm), batch * heads)](
            q, k, v, far_k, far_v, far_pos, out, lse, c, far_pos.numel(), query_start, heads,
            q.stride(1), q.stride(2), q.stride(0), far_k.stride(1), far_k.stride(2), far_k.stride(0),
            dil, window, sinks, scale * LOG2E, HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps)
        ctx.save_for_backward(q, k, v, far_k, far_v, far_pos, out, lse)
        ctx.meta = (query_start, dil, window, sinks, scale, bwd_blocks, block_d)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, far_k, far_v, far_pos, out, lse = ctx.saved_tensors
        query_start, dil, window, sinks, scale, (bm, bn, warps), block_d = ctx.meta
        c, batch, heads, head_dim = q.shape
        n_far = far_pos.numel()
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).permute(1, 2, 0).contiguous()
        q_strides = (q.stride(1), q.stride(2), q.stride(0))
        f_strides = (far_k.stride(1), far_k.stride(2), far_k.stride(0))
        consts = dict(HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        rule = (dil, window, sinks, scale * LOG2E, scale)
        dq = torch.empty_like(q)
        _dq_kernel[(triton.cdiv(c, bm), batch * heads)](
            q, k, v, far_k, far_v, far_pos, grad_out, lse, delta, dq, c, n_far, query_start, heads,
            *q_strides, *f_strides, *rule, **consts)
        grads = []
        for near, keys, values, rows in ((True, k, v, c), (False, far_k, far_v, n_far)):
            dk = torch.zeros((rows, batch, heads, head_dim), dtype=torch.float32, device=q.device)
            dv = torch.zeros_like(dk)
            if rows:
                _dkv_kernel[(triton.cdiv(rows, bn), batch * heads)](
                    q, keys, values, far_pos, grad_out, lse, delta, dk, dv, c, n_far, query_start, heads,
                    *q_strides, keys.stride(1), keys.stride(2), keys.stride(0), dk.stride(1), dk.stride(2),
                    dk.stride(0), *rule, NEAR=near, **consts)
            grads += [dk.to(keys.dtype), dv.to(values.dtype)]
        return (dq, *grads, None, None, None, None, None, None, None)


def slice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, far_k: torch.Tensor, far_v: torch.Tensor,
                    far_positions: torch.Tensor, query_start: int, dilation: Optional[int], window: int = 0,
                    sinks: int = 0, softmax_scale: Optional[float] = None, blocks=None) -> torch.Tensor:
    """Attention of queries at positions [query_start, query_start + c) over their own keys k, v
    [c, b, heads, d_h] (same positions) and the far keys far_k, far_v [n, b, heads, d_h] at
    ascending ``far_positions`` [n] (< query_start, or own sinks/states), under the rule with
    dilation D (None: none), window W, sinks P. Returns [c, b, heads, d_h].

    ``blocks`` overrides the tile sizes ((fwd M, N, warps), (bwd M, N, warps)), for tests.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or far_k.shape[1:] != q.shape[1:] \
            or far_v.shape != far_k.shape or far_positions.shape != far_k.shape[:1]:
        raise ValueError(f"slice_attention: expected q, k, v [c, b, heads, d_h] and far keys [n, b, heads, d_h] "
                         f"with [n] positions, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(far_k.shape)}, "
                         f"{tuple(far_positions.shape)}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    dil = dilation or query_start + q.shape[0] + 1  # no dilation: a D past every position has no states
    return _SliceAttention.apply(q, k, v, far_k, far_v, far_positions, int(query_start), dil, window, sinks,
                                 float(scale), blocks)


__all__ = ["slice_attention"]
