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


def attend_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, public: torch.Tensor,
                  pattern: AttentionPattern, rank: int, size: int, softmax_scale: float) -> torch.Tensor:
    """Each local slice attends the earlier chunks' public tokens (``public``: every rank's
    :func:`pack_public`, [CP * 2, ...]) and its own slice.

    Queries go in blocks of QUERY_BLOCK, each over its compact key set (the keys some query of
    the block may see), as the single-rank reference does: O(c (c / D + W + P + block)) per slice.
    """
    chunk_len = q.shape[0] // 2
    outputs = []
    for piece, chunk in enumerate(chunk_ids(rank, size)):
        start = chunk * chunk_len
        own = slice(piece * chunk_len, (piece + 1) * chunk_len)
        keys, values, positions = [], [], []
        for earlier in range(chunk):
            owner, owner_piece = chunk_owner(earlier, size)
            pos = public_offsets(pattern, earlier, chunk_len) + earlier * chunk_len
            rows = torch.nonzero(may_be_seen(pattern, pos, start)).flatten().to(k.device)
            keys.append(public[2 * owner + owner_piece, 0, rows])
            values.append(public[2 * owner + owner_piece, 1, rows])
            positions.append(pos[rows.cpu()])
        keys, values = torch.cat(keys + [k[own]]), torch.cat(values + [v[own]])
        positions = torch.cat(positions + [torch.arange(start, start + chunk_len)])
        for t0 in range(start, start + chunk_len, QUERY_BLOCK):
            t1 = min(start + chunk_len, t0 + QUERY_BLOCK)
            near = (positions >= t0) & (positions < t1)
            cols = torch.nonzero(near | ((positions < t0) & may_be_seen(pattern, positions, t0))).flatten()
            mask = visible(pattern, torch.arange(t0, t1), positions[cols]).to(q.device)
            cols = cols.to(k.device)
            rows = slice(own.start + t0 - start, own.start + t1 - start)
            qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q[rows], keys[cols], values[cols]))
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=softmax_scale)
            outputs.append(out.permute(2, 0, 1, 3))
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
