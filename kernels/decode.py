"""Decode attention over a compact sparse KV cache (flash-decoding split over cache slots).

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

from ._common import LOG2E

MIN_SPLIT = 256  # slots per split below which splitting costs more than it gains


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, H, split_len,
                  q_b, q_h, c_b, c_h, c_s, o_b, o_h, qk_scale,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, FINAL: tl.constexpr):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(q_ptr + b * q_b + h * q_h + offs_d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
    length = tl.load(len_ptr + b)
    start = split * split_len
    stop = tl.minimum(start + split_len, length)
    base = b.to(tl.int64) * c_b + h * c_h
    m_i = tl.full([], -1.0e30, tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < stop
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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     softmax_scale: Optional[float] = None, splits: Optional[int] = None) -> torch.Tensor:
    """Same contract as the reference ``ops.decode.decode_attention`` (no host sync).

    ``splits`` overrides the number of slot splits (tests use it to cover the merge kernel).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[:2] != q.shape[:2] or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"decode_attention: expected q [b, h, d] and caches [b, h, S, d], got "
                         f"{tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention: v_cache must match k_cache in shape and layout")
    if k_cache.stride(3) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    batch, heads, capacity, head_dim = k_cache.shape
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    lengths = lengths.to(device=q.device, dtype=torch.int32).clamp(0, capacity).contiguous()
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_splits = splits or _num_splits(batch * heads, capacity, q.device)
    split_len = -(-capacity // n_splits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_m = torch.empty((batch * heads * n_splits,), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((batch * heads * n_splits, block_d), dtype=torch.float32, device=q.device)
    _split_kernel[(batch * heads, n_splits)](
        q, k_cache, v_cache, lengths, out, part_m, part_l, part_acc, heads, split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), scale * LOG2E,
        HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_S=64, FINAL=n_splits == 1)
    if n_splits > 1:
        _merge_kernel[(batch * heads,)](part_m, part_l, part_acc, out, heads, n_splits, out.stride(0), out.stride(1),
                                        HEAD_D=head_dim, BLOCK_D=block_d, SPLITS=triton.next_power_of_2(n_splits))
    return out
