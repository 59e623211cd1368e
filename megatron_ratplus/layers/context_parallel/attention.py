"""Pattern attention under context parallelism: exchange only the keys/values someone can see.

A query t sees key j < t iff j < P (sink), (j + 1) % D == 0 (dilated state) or t - j <= W
(window; docs/DESIGN.md §2, §4). For queries in a later chunk than j, that means j is a sink, a
dilated state, or in the last W tokens before the query's chunk (``patterns.may_be_seen``). So
each rank all-gathers, per slice, only its "public" tokens (sinks, every D-th state, the last W
tokens: the window halo) of the already-rotated K~/V~: about c / D + W + P per slice instead of
c. Dense attention (D = 1) makes every token public, which is a plain all-gather of K~/V~. Each
local slice then attends the earlier chunks' public tokens plus its own slice through
``backend.blocked_attention`` (the reference blocked attention over explicit key positions),
the rule applied on global positions.

Top-k patterns choose keys by content and are inference-time only; they are refused under CP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_ratplus import backend
from megatron_ratplus.layers.context_parallel.layout import chunk_ids, chunk_owner
from megatron_ratplus.patterns import AttentionPattern, may_be_seen


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
        outputs.append(backend.blocked_attention(q[own], torch.cat(keys + [k[own]]), torch.cat(values + [v[own]]),
                                                 pattern, softmax_scale, start, positions))
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
