"""Decode attention over a decode cache's slots (flash-decoding split over the slots).

Contract of ``megatron_ratplus.ops.decode.decode_attention`` with the pattern as plain numbers:
slot s of sequence b holds position slot_positions[b, s] (-1: empty or a duplicate, never
attended), and the query at query_positions[b] attends it iff ``visible_rule`` admits the pair
(D, W, P; a pattern without dilation passes a D larger than any position + 1). The same kernel
serves the compact ``[sinks | ring | chunk ends]`` layout and the full one (position = slot).

One query per (sequence, head) is too little work for one program per pair on a large GPU, so
the filled slots of each pair are cut into splits: every program reduces its split to a partial
(max, sum, weighted values) and a second small kernel merges the partials. With one split the
first kernel writes the output directly (one launch per step, which is what decode latency is
made of).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LOG2E, visible_rule

MIN_SPLIT = 256  # slots per split below which splitting costs more than it gains


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, slot_pos_ptr, query_pos_ptr, o_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                  H, S, split_len, D, W, P, q_b, q_h, c_b, c_h, c_s, sp_b, o_b, o_h, qk_scale,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, FINAL: tl.constexpr):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(q_ptr + b * q_b + h * q_h + offs_d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
    t = tl.load(query_pos_ptr + b)
    start = split * split_len
    stop = tl.minimum(start + split_len, S)
    base = b.to(tl.int64) * c_b + h * c_h
    m_i = tl.full([], -1.0e30, tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        pos = tl.load(slot_pos_ptr + b * sp_b + s, mask=s < stop, other=-1)
        ok = (pos >= 0) & visible_rule(t, pos, D, W, P)
        off = base + s.to(tl.int64)[:, None] * c_s + offs_d[None, :]
        tile_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + off, mask=tile_mask, other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        p = tl.exp2(scores - m_new)
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_ptr + off, mask=tile_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if FINAL:
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        tl.store(o_ptr + b * o_b + h * o_h + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)
    else:
        part = pid_bh * tl.num_programs(1) + split
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
        tl.store(part_acc_ptr + part * BLOCK_D + offs_d, acc)


@triton.jit
def _merge_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, o_ptr, H, n_splits, o_b, o_h,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.arange(0, SPLITS)
    ok = split < n_splits
    part = pid_bh * n_splits + split
    m = tl.load(part_m_ptr + part, mask=ok, other=-1.0e30)
    weight = tl.where(ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    l_sum = tl.sum(weight * tl.load(part_l_ptr + part, mask=ok, other=0.0), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(o_ptr + (pid_bh // H) * o_b + (pid_bh % H) * o_h + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_D)


def _num_splits(pairs: int, capacity: int, device: torch.device) -> int:
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(-(-target // pairs), -(-capacity // MIN_SPLIT)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_positions: torch.Tensor,
                     query_positions: torch.Tensor, dilation: int, window: int, sinks: int,
                     softmax_scale: Optional[float] = None, splits: Optional[int] = None) -> torch.Tensor:
    """q [b, h, d], k_cache/v_cache [b, h, S, d], slot_positions [b, S], query_positions [b] -> [b, h, d].

    (dilation, window, sinks) = (D, W, P) of the pattern. No host sync. ``splits`` overrides the
    number of slot splits (tests use it to cover the merge kernel).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[:2] != q.shape[:2] or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"decode_attention: expected q [b, h, d] and caches [b, h, S, d], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention: v_cache must match k_cache in shape and layout")
    batch, heads, slots, head_dim = k_cache.shape
    if slot_positions.shape != (batch, slots) or query_positions.shape != (batch,):
        raise ValueError(f"decode_attention: expected slot_positions [b, S] = [{batch}, {slots}] and "
                         f"query_positions [b] = [{batch}], got {tuple(slot_positions.shape)} and "
                         f"{tuple(query_positions.shape)}")
    if k_cache.stride(3) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    slot_positions = slot_positions.to(device=q.device, dtype=torch.int32).contiguous()
    query_positions = query_positions.to(device=q.device, dtype=torch.int32).contiguous()
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_splits = splits or _num_splits(batch * heads, slots, q.device)
    split_len = -(-slots // n_splits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_m = torch.empty((batch * heads * n_splits,), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((batch * heads * n_splits, block_d), dtype=torch.float32, device=q.device)
    _split_kernel[(batch * heads, n_splits)](
        q, k_cache, v_cache, slot_positions, query_positions, out, part_m, part_l, part_acc,
        heads, slots, split_len, dilation, window, sinks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), slot_positions.stride(0),
        out.stride(0), out.stride(1), scale * LOG2E,
        HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_S=64, FINAL=n_splits == 1)
    if n_splits > 1:
        _merge_kernel[(batch * heads,)](part_m, part_l, part_acc, out, heads, n_splits, out.stride(0), out.stride(1),
                                        HEAD_D=head_dim, BLOCK_D=block_d, SPLITS=triton.next_power_of_2(n_splits))
    return out
