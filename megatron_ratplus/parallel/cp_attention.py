"""Pattern attention under context parallelism: exchange only the keys/values someone can see.

A query t sees key j < t iff j < P (sink), (j + 1) % D == 0 (dilated state) or t - j <= W
(window). For queries in a later chunk than j, that means j is a sink, a dilated state, or in the
last W tokens before the query's chunk. So each rank all-gathers, per slice, only its "public"
tokens (sinks, every D-th state, the last W tokens: the window halo) of the already-rotated
K~/V~: about c / D + W + P per slice instead of c. Dense attention (D = 1) makes every token
public, which is a plain all-gather of K~/V~. Each local slice then attends the earlier chunks'
public tokens plus its own slice, with the pattern's rule applied on global positions.

Top-k patterns choose keys by content and are inference-time only; they are refused under CP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_ratplus.ops.attention import QUERY_BLOCK
from megatron_ratplus.parallel.layout import chunk_ids, chunk_owner
from megatron_ratplus.patterns import AttentionPattern


def may_be_seen(pattern: AttentionPattern, j: torch.Tensor, before: int) -> torch.Tensor:
    """Whether key position j can be visible to some query at position >= ``before``."""
    keep = (j < pattern.sinks) | (j >= before - pattern.window)
    if pattern.dilation is not None:
        keep |= (j + 1) % pattern.dilation == 0
    return keep


def visible(pattern: AttentionPattern, t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The DESIGN §1 rule on explicit global positions: [len(t), len(j)] booleans."""
    t, j = t.unsqueeze(1), j.unsqueeze(0)
    return may_be_seen(pattern, j, t) & (j <= t)


def public_offsets(pattern: AttentionPattern, chunk: int, chunk_len: int) -> torch.Tensor:
    """Offsets inside global chunk ``chunk`` of the tokens later chunks may see."""
    start = chunk * chunk_len
    positions = torch.arange(start, start + chunk_len)
    return torch.nonzero(may_be_seen(pattern, positions, start + chunk_len)).flatten()


def exchanged_tokens(pattern: AttentionPattern, chunk_len: int, size: int) -> int:
    """Tokens (per slice, padded to the largest chunk) each rank sends: the all-gather's width."""
    return max(len(public_offsets(pattern, c, chunk_len)) for c in range(2 * size))


def pack_public(k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, rank: int, size: int):
    """This rank's contribution to the exchange: [2 slices, k/v, width, b, heads, d_h], zero-padded."""
    chunk_len = k.shape[0] // 2
    width = exchanged_tokens(pattern, chunk_len, size)

    def pack(piece, chunk):
        idx = public_offsets(pattern, chunk, chunk_len).to(k.device) + piece * chunk_len
        return F.pad(torch.stack([k[idx], v[idx]]), (0, 0) * (k.dim() - 1) + (0, width - len(idx)))

    return torch.stack([pack(piece, chunk) for piece, chunk in enumerate(chunk_ids(rank, size))])


class _BlockedSliceAttention(torch.autograd.Function):
    """One slice's queries in blocks of QUERY_BLOCK, each over its compact key set.

    As in the single-rank reference (ops/attention.py), autograd through per-block gathers would
    zero-fill a full-size key gradient per block; each block's small graph is kept instead and
    its key gradients are index-added into one buffer.
    """

    @staticmethod
    def forward(ctx, q, keys, values, positions, start, pattern, scale):
        q, keys, values = q.detach(), keys.detach(), values.detach()
        blocks, outputs = [], []
        with torch.enable_grad():
            for t0 in range(start, start + q.shape[0], QUERY_BLOCK):
                t1 = min(start + q.shape[0], t0 + QUERY_BLOCK)
                near = (positions >= t0) & (positions < t1)
                cols = torch.nonzero(near | ((positions < t0) & may_be_seen(pattern, positions, t0))).flatten()
                mask = visible(pattern, torch.arange(t0, t1), positions[cols]).to(q.device)
                cols = cols.to(keys.device)
                rows = slice(t0 - start, t1 - start)
                contiguous = int(cols[-1]) - int(cols[0]) + 1 == len(cols)  # dense: a prefix, no copy
                span = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
                qb, kb, vb = (t.requires_grad_() for t in (q[rows], keys[span], values[span]))
                out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (qb, kb, vb)),
                                                     attn_mask=mask, scale=scale).permute(2, 0, 1, 3)
                blocks.append((rows, cols, qb, kb, vb, out))
                outputs.append(out.detach())
        ctx.blocks, ctx.shapes = blocks, (q.shape, keys.shape)
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_out):
        q_shape, k_shape = ctx.shapes
        grad_q = grad_out.new_zeros(q_shape)
        grad_k, grad_v = grad_out.new_zeros(k_shape), grad_out.new_zeros(k_shape)
        for rows, cols, qb, kb, vb, out in ctx.blocks:
            gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), grad_out[rows])
            grad_q[rows] = gq
            grad_k.index_add_(0, cols, gk)
            grad_v.index_add_(0, cols, gv)
        ctx.blocks = None
        return grad_q, grad_k, grad_v, None, None, None, None


def attend_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, public: torch.Tensor,
                  pattern: AttentionPattern, rank: int, size: int, softmax_scale: float) -> torch.Tensor:
    """Each local slice attends the earlier chunks' public tokens (``public``: every rank's
    :func:`pack_public`, [CP * 2, ...]) and its own slice: O(c (c / D + W + P + block)) per slice."""
    chunk_len = q.shape[0] // 2
    outputs = []
    for piece, chunk in enumerate(chunk_ids(rank, size)):
        start = chunk * chunk_len
        own = slice(piece * chunk_len, (piece + 1) * chunk_len)
        keys, values, positions = [], [], []
        for earlier in range(chunk):
            owner, owner_piece = chunk_owner(earlier, size)
            pos = public_offsets(pattern, earlier, chunk_len) + earlier * chunk_len
            rows = torch.nonzero(may_be_seen(pattern, pos, start)).flatten()
            keys.append(public[2 * owner + owner_piece, 0, rows.to(k.device)])
            values.append(public[2 * owner + owner_piece, 1, rows.to(k.device)])
            positions.append(pos[rows])
        positions = torch.cat(positions + [torch.arange(start, start + chunk_len)])
        outputs.append(_BlockedSliceAttention.apply(q[own], torch.cat(keys + [k[own]]), torch.cat(values + [v[own]]),
                                                    positions, start, pattern, softmax_scale))
    return torch.cat(outputs)


def cp_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern,
                         group, softmax_scale: float) -> torch.Tensor:
    """Causal pattern attention for this rank's [2 c, b, heads, d_h] q, k, v (load-balanced layout)."""
    if pattern.kind == "topk":
        raise ValueError("top-k attention patterns are not supported under context parallelism")
    if q.shape[0] % 2:
        raise ValueError(f"context-parallel attention: local length {q.shape[0]} must hold two equal slices")
    rank, size = group.rank(), group.size()
    public = gather_from_sequence_parallel_region(pack_public(k, v, pattern, rank, size), True, group=group)
    return attend_slices(q, k, v, public, pattern, rank, size, softmax_scale)
