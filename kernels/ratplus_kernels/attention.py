"""Fused pattern attention (dilated + window + sinks), forward and backward, in one online softmax.

Query t attends key j <= t iff (j + 1) % D == 0, or t - j <= W, or j < P (docs/DESIGN.md §2;
``visible_rule`` in _common.py). For a query tile [t0, t1) with lo = max(0, t0 - W) the visible
keys fall into three disjoint groups, which one program walks in a single online-softmax pass
(the same split as the reference op):

    far sinks    j in [0, min(P, lo))                 all visible
    far states   j = (m + 1) D - 1, m in [first, lo // D), first = P // D (the first state >= P)
    near         j in [lo, t1)                        masked by the full rule

so the work is O(T (P + T/D + W)) instead of O(T^2). A local pattern (no dilation) uses
D = T + 1, which has no states.

Backward (FlashAttention-2 style, recomputing probabilities from the saved log-sum-exp):
dQ walks the same key groups per query tile. dK/dV are computed per key tile so there are no
atomics: "near" key tiles (every position) loop over the query tiles whose near range holds them,
and compact "far" tiles (the sinks, then the states, gathered) loop over the query tiles that see
them as far keys. The far tiles write a compact buffer that is added into dK/dV by position.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LOG2E, visible_rule


@triton.jit
def _visible(t, j, D, W, P):
    """[M, N] visibility of key positions j [N] to query positions t [M]."""
    return visible_rule(t[:, None], j[None, :], D, W, P)


@triton.jit
def _rows(ptr, pos, ok, stride, offs_d, HEAD_D: tl.constexpr):
    return tl.load(ptr + pos.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=ok[:, None] & (offs_d < HEAD_D)[None, :],
                   other=0.0)


@triton.jit
def _groups(t0, T, D, W, P, BLOCK_M: tl.constexpr):
    """Key groups of query tile [t0, t0 + BLOCK_M): (n_sink, first state, last state, lo, hi)."""
    lo = tl.maximum(t0 - W, 0)
    first = P // D  # the first state (m + 1) D - 1 at or after P
    return tl.minimum(P, lo), first, tl.maximum(first, lo // D), lo, tl.minimum(t0 + BLOCK_M, T)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, t, t_ok, k_ptr, v_ptr, idx, pos, ok, stride_s, offs_d, qk_scale, D, W, P,
              HEAD_D: tl.constexpr):
    """One online-softmax step over the key tile in rows ``idx`` at positions ``pos`` (scores in log2 units)."""
    k = _rows(k_ptr, idx, ok, stride_s, offs_d, HEAD_D)
    v = _rows(v_ptr, idx, ok, stride_s, offs_d, HEAD_D)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    mask = t_ok[:, None] & ok[None, :] & _visible(t, pos, D, W, P)
    m_new = tl.maximum(m_i, tl.max(tl.where(mask, s, -1.0e30), axis=1))
    p = tl.exp2(tl.where(mask, s - m_new[:, None], float("-inf")))
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, t, t_ok, k_ptr, v_ptr, idx, pos, ok, stride_s, offs_d, qk_scale, D, W, P,
             HEAD_D: tl.constexpr):
    """dQ contribution of the key tile in rows ``idx`` at positions ``pos``."""
    k = _rows(k_ptr, idx, ok, stride_s, offs_d, HEAD_D)
    v = _rows(v_ptr, idx, ok, stride_s, offs_d, HEAD_D)
    mask = t_ok[:, None] & ok[None, :] & _visible(t, pos, D, W, P)
    p = tl.exp2(tl.where(mask, tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None], float("-inf")))
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _dkv_tile(dk, dv, k, v, pos, mask_keys, q_ptr, do_ptr, lse_ptr, delta_ptr, t0, T, stride_s, offs_d,
              qk_scale, D, W, P, Q0, NEAR: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Gradient of the key tile ``k``, ``v`` from query tile [t0, t0 + BLOCK_M), transposed layout.

    Queries are positions [Q0, T), read from q_ptr etc. at the position (callers shift the
    pointers by Q0). NEAR: keys count only where they lie in the tile's near range
    (j >= lo); otherwise only where they are far keys (j < max(lo, Q0)), masked by the rule.
    """
    t = t0 + tl.arange(0, BLOCK_M)
    t_ok = t < T
    q = _rows(q_ptr, t, t_ok, stride_s, offs_d, HEAD_D)
    do = _rows(do_ptr, t, t_ok, stride_s, offs_d, HEAD_D)
    lse = tl.load(lse_ptr + t, mask=t_ok, other=0.0)
    delta = tl.load(delta_ptr + t, mask=t_ok, other=0.0)
    lo = tl.maximum(t0 - W, 0)
    if NEAR:
        mask = visible_rule(t[None, :], pos[:, None], D, W, P) & (pos >= lo)[:, None]
    else:
        mask = visible_rule(t[None, :], pos[:, None], D, W, P) & (pos < tl.maximum(lo, Q0))[:, None]
    mask = mask & mask_keys[:, None] & t_ok[None, :]
    p_t = tl.exp2(tl.where(mask, tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :], float("-inf")))
    dv += tl.dot(p_t.to(do.dtype), do)
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, H, s_b, s_h, s_s, o_b, o_h, o_s,
                D, W, P, qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    q_ptr, k_ptr, v_ptr = q_ptr + base, k_ptr + base, v_ptr + base
    t0 = pid_m * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    t_ok = t < T
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    q = _rows(q_ptr, t, t_ok, s_s, offs_d, HEAD_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_sink, first, last, lo, hi = _groups(t0, T, D, W, P, BLOCK_M)
    for j0 in range(0, n_sink, BLOCK_N):
        pos = j0 + cols
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, t, t_ok, k_ptr, v_ptr, pos, pos, pos < n_sink, s_s, offs_d,
                                  qk_scale, D, W, P, HEAD_D)
    for m0 in range(first, last, BLOCK_N):
        m = m0 + cols
        pos = (m + 1) * D - 1
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, t, t_ok, k_ptr, v_ptr, pos, pos, m < last, s_s,
                                  offs_d, qk_scale, D, W, P, HEAD_D)
    for j0 in range(lo, hi, BLOCK_N):
        pos = j0 + cols
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, t, t_ok, k_ptr, v_ptr, pos, pos, pos < hi, s_s, offs_d,
                                  qk_scale, D, W, P, HEAD_D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = o_ptr + (pid_bh // H) * o_b + (pid_bh % H) * o_h
    tl.store(o_base + t.to(tl.int64)[:, None] * o_s + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_d < HEAD_D)[None, :])
    tl.store(lse_ptr + pid_bh * T + t, m_i + tl.log2(l_safe), mask=t_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T, H, s_b, s_h, s_s,
               D, W, P, qk_scale, scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    k_ptr, v_ptr = k_ptr + base, v_ptr + base
    t0 = pid_m * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    t_ok = t < T
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    q = _rows(q_ptr + base, t, t_ok, s_s, offs_d, HEAD_D)
    do = _rows(do_ptr + base, t, t_ok, s_s, offs_d, HEAD_D)
    lse = tl.load(lse_ptr + pid_bh * T + t, mask=t_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * T + t, mask=t_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_sink, first, last, lo, hi = _groups(t0, T, D, W, P, BLOCK_M)
    for j0 in range(0, n_sink, BLOCK_N):
        pos = j0 + cols
        dq = _dq_tile(dq, q, do, lse, delta, t, t_ok, k_ptr, v_ptr, pos, pos, pos < n_sink, s_s, offs_d, qk_scale,
                      D, W, P, HEAD_D)
    for m0 in range(first, last, BLOCK_N):
        m = m0 + cols
        pos = (m + 1) * D - 1
        dq = _dq_tile(dq, q, do, lse, delta, t, t_ok, k_ptr, v_ptr, pos, pos, m < last, s_s, offs_d,
                      qk_scale, D, W, P, HEAD_D)
    for j0 in range(lo, hi, BLOCK_N):
        pos = j0 + cols
        dq = _dq_tile(dq, q, do, lse, delta, t, t_ok, k_ptr, v_ptr, pos, pos, pos < hi, s_s, offs_d, qk_scale,
                      D, W, P, HEAD_D)
    tl.store(dq_ptr + base + t.to(tl.int64)[:, None] * s_s + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_d < HEAD_D)[None, :])


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, T, H, s_b, s_h, s_s,
                g_b, g_h, g_s, D, W, P, n_sink, first, n_states, qk_scale, scale, NEAR: tl.constexpr,
                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """NEAR: key tile = positions [pid * BLOCK_N, ...), gradients to dk/dv [T, ...].

    Far: tile pid covers compact slots; slots [0, n_sink) are the sinks, the rest the states
    first, first + 1, ...; gradients go to the compact dk/dv [slots, ...].
    """
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    base = (pid_bh // H) * s_b + (pid_bh % H) * s_h
    offs_d = tl.arange(0, BLOCK_D)
    slot = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if NEAR:
        pos = slot
        ok = pos < T
        t_start = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        t_stop = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1 + W + 1, T)
    else:
        n_sink_tiles = tl.cdiv(n_sink, BLOCK_N)
        is_sink = pid_n < n_sink_tiles
        sink_pos = slot
        state_pos = (first + slot - n_sink_tiles * BLOCK_N + 1) * D - 1
        pos = tl.where(is_sink, sink_pos, state_pos)
        ok = tl.where(is_sink, sink_pos < n_sink, (slot - n_sink_tiles * BLOCK_N) < n_states - first)
        j_min = tl.min(tl.where(ok, pos, T), axis=0)
        t_start = (j_min + W + 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # first tile with lo > j_min
        t_stop = T
    k = _rows(k_ptr + base, pos, ok, s_s, offs_d, HEAD_D)
    v = _rows(v_ptr + base, pos, ok, s_s, offs_d, HEAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_M):
        dk, dv = _dkv_tile(dk, dv, k, v, pos, ok, q_ptr + base, do_ptr + base, lse_ptr + pid_bh * T,
                           delta_ptr + pid_bh * T, t0, T, s_s, offs_d, qk_scale, D, W, P, 0, NEAR, HEAD_D, BLOCK_M)
    if NEAR:
        out = slot
    else:
        out = tl.where(is_sink, slot, n_sink + slot - n_sink_tiles * BLOCK_N)
    g_base = (pid_bh // H) * g_b + (pid_bh % H) * g_h
    g_off = g_base + out.to(tl.int64)[:, None] * g_s + offs_d[None, :]
    g_mask = ok[:, None] & (offs_d < HEAD_D)[None, :]
    tl.store(dk_ptr + g_off, dk * scale, mask=g_mask)
    tl.store(dv_ptr + g_off, dv, mask=g_mask)


def _blocks(device: torch.device, dtype: torch.dtype, head_dim: int):
    """(query tile, key tile, warps) for the forward pass and the backward pass.

    On a GPU the tiles and their pipelined copies live in shared memory, whose size scales with
    the bytes of one row (element size x padded head dim): rows of up to 256 bytes (bf16 up to
    d_h 128, fp32 up to d_h 64) take the large tiles, longer rows (fp32 at d_h 128) tiles half as
    big, so that every kernel fits the opt-in limit of sm_80 (163 KiB) and sm_90 (227 KiB);
    tools/kernels_aot.py compiles them for both and reports the shared memory.
    """
    if device.type != "cuda":
        return (16, 16, 1), (16, 16, 1)
    if dtype.itemsize * max(16, triton.next_power_of_2(head_dim)) <= 256:
        return (128, 64, 8), (64, 64, 4)
    return (64, 32, 4), (32, 32, 4)


class _PatternAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dil, window, sinks, scale, blocks):
        seq_len, batch, heads, head_dim = q.shape
        q, k, v = (t.contiguous() for t in (q, k, v))
        (bm, bn, warps), bwd_blocks = blocks or _blocks(q.device, q.dtype, head_dim)
        out = torch.empty_like(q)
        lse = torch.empty((batch * heads, seq_len), dtype=torch.float32, device=q.device)
        block_d = max(16, triton.next_power_of_2(head_dim))
        grid = (triton.cdiv(seq_len, bm), batch * heads)
        _fwd_kernel[grid](q, k, v, out, lse, seq_len, heads, q.stride(1), q.stride(2), q.stride(0),
                          out.stride(1), out.stride(2), out.stride(0), dil, window, sinks, scale * LOG2E,
                          HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (dil, window, sinks, scale, bwd_blocks, block_d)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dil, window, sinks, scale, (bm, bn, warps), block_d = ctx.meta
        seq_len, batch, heads, head_dim = q.shape
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).permute(1, 2, 0).contiguous()
        strides = (heads, q.stride(1), q.stride(2), q.stride(0))
        consts = dict(HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        dq = torch.empty_like(q)
        _dq_kernel[(triton.cdiv(seq_len, bm), batch * heads)](
            q, k, v, grad_out, lse, delta, dq, seq_len, *strides, dil, window, sinks, scale * LOG2E, scale, **consts)

        dk = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
        _dkv_kernel[(triton.cdiv(seq_len, bn), batch * heads)](
            q, k, v, grad_out, lse, delta, dk, dv, seq_len, *strides, dk.stride(1), dk.stride(2), dk.stride(0),
            dil, window, sinks, 0, 0, 0, scale * LOG2E, scale, NEAR=True, **consts)

        n_sink = min(sinks, seq_len)
        n_states = seq_len // dil
        first = min(sinks // dil, n_states)  # as in _groups
        slots = n_sink + n_states - first
        if slots:
            far_k = torch.empty((slots, batch, heads, head_dim), dtype=torch.float32, device=q.device)
            far_v = torch.empty_like(far_k)
            tiles = triton.cdiv(n_sink, bn) + triton.cdiv(n_states - first, bn)
            _dkv_kernel[(tiles, batch * heads)](
                q, k, v, grad_out, lse, delta, far_k, far_v, seq_len, *strides,
                far_k.stride(1), far_k.stride(2), far_k.stride(0), dil, window, sinks, n_sink, first, n_states,
                scale * LOG2E, scale, NEAR=False, **consts)
            positions = torch.cat([torch.arange(n_sink, device=q.device),
                                   torch.arange(first + 1, n_states + 1, device=q.device) * dil - 1])
            dk.index_add_(0, positions, far_k)
            dv.index_add_(0, positions, far_v)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: Optional[int], window: int = 0,
                      sinks: int = 0, softmax_scale: Optional[float] = None, blocks=None) -> torch.Tensor:
    """Causal attention of q, k, v [s, b, heads, d_h] (-> out, same shape) under the rule with
    dilation D (None: no dilated term; 1: dense), window W and sinks P.

    ``blocks`` overrides the tile sizes ((fwd M, N, warps), (bwd M, N, warps)), for tests.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"dilated_attention: expected q, k, v as [s, b, heads, d_h], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    dil = dilation or q.shape[0] + 1  # no dilation: D = T + 1 has no states
    return _PatternAttention.apply(q, k, v, dil, window, sinks, float(scale), blocks)


__all__ = ["dilated_attention"]
