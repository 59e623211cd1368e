"""Reference top-k block attention (docs/DESIGN.md §2, top-k).

Candidate keys are all positions, or with ``d=D`` only the dilated states j = mD - 1. They are
cut into blocks of B candidates; each block is summarised by the mean (or max) of its keys. A
query t scores the blocks that lie wholly before its own block, keeps the K best, and attends
their candidates, the visible candidates of its own block, its window and the sinks.

The selection (:func:`select_blocks`) is a discrete choice (no gradient flows through it) and
is shared with the Triton path: the backend selects here and hands the indices to the kernel.
The attention over the selected keys is differentiable. :func:`topk_allowed_mask` materialises
a [b, h, T, T] mask: it is the readable ground truth for tests, the kernel and the decode
cache, not a fast path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ratplus.patterns import AttentionPattern, visible

SELECT_CHUNK = 4096  # queries scored at once: bounds the [chunk, blocks] score matrix


def _pool_blocks(keys: torch.Tensor, block: int, pool: str) -> torch.Tensor:
    """[b, h, M, d] candidate keys -> [b, h, ceil(M / block), d] pooled block keys."""
    b, h, m, d = keys.shape
    n_blocks = -(-m // block)
    pad = n_blocks * block - m
    if pool == "mean":
        padded = F.pad(keys, (0, 0, 0, pad))
        counts = torch.full((n_blocks,), float(block), device=keys.device)
        counts[-1] = block - pad
        return padded.view(b, h, n_blocks, block, d).sum(3) / counts.view(1, 1, -1, 1).to(keys.dtype)
    padded = F.pad(keys, (0, 0, 0, pad), value=float("-inf"))
    return padded.view(b, h, n_blocks, block, d).amax(3)


def _own_block(pattern: AttentionPattern, query_pos: torch.Tensor) -> torch.Tensor:
    """Block of the last candidate visible to each query position (-1: none yet)."""
    n_visible = (query_pos + 1) // (pattern.dilation or 1)
    return torch.div(n_visible - 1, pattern.block, rounding_mode="floor")


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, pattern: AttentionPattern,
                  softmax_scale: Optional[float] = None, query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b, h, Tq, K'] indices of each query's K' = min(K, blocks) best earlier blocks (-1 where fewer exist).

    q: [b, h, Tq, d] at positions ``query_pos`` ([b, Tq]; default 0..Tq-1); k: [b, h, Tk, d] at
    positions 0..Tk-1. Scores are q . pooled block key (fp32), over blocks wholly before the
    query's own block.
    """
    b, h, n_q = q.shape[:3]
    dilation = pattern.dilation or 1
    if query_pos is None:
        query_pos = torch.arange(n_q, device=q.device).expand(b, n_q)
    candidates = k[:, :, dilation - 1::dilation]
    n_blocks = -(-candidates.shape[2] // pattern.block)
    kk = min(pattern.topk, n_blocks)
    if kk == 0:
        return torch.empty((b, h, n_q, 0), dtype=torch.long, device=q.device)
    pooled = _pool_blocks(candidates.float(), pattern.block, pattern.pool)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    own = _own_block(pattern, query_pos).view(b, 1, n_q, 1)
    block_ids = torch.arange(n_blocks, device=q.device)
    chosen = []
    for t0 in range(0, n_q, SELECT_CHUNK):
        rows = slice(t0, t0 + SELECT_CHUNK)
        scores = torch.einsum("bhtd,bhnd->bhtn", q[:, :, rows].float(), pooled) * scale
        best = scores.masked_fill(block_ids >= own[:, :, rows], float("-inf")).topk(kk, dim=-1)
        chosen.append(torch.where(best.values > float("-inf"), best.indices, -1))
    return torch.cat(chosen, dim=2)


def topk_allowed_mask(q: torch.Tensor, k: torch.Tensor, pattern: AttentionPattern,
                      softmax_scale: Optional[float] = None,
                      query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [b, h, Tq, Tk] mask of the keys each query attends under a top-k pattern.

    q: [b, h, Tq, d] at positions ``query_pos`` ([b, Tq]; default 0..Tq-1); k: [b, h, Tk, d] at
    positions 0..Tk-1. Decoding passes one query per sequence and the whole key cache; keys
    after a query's position never count (they may be unwritten cache slots).
    """
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    dilation = pattern.dilation or 1
    if query_pos is None:
        query_pos = torch.arange(n_q, device=q.device).expand(b, n_q)
    best = select_blocks(q, k, pattern, softmax_scale, query_pos)
    n_blocks = -(-(n_k // dilation) // pattern.block)
    own = _own_block(pattern, query_pos).view(b, 1, n_q, 1)
    # column n_blocks collects the -1 picks (fewer than K earlier blocks); no key reads it
    selected = torch.zeros(b, h, n_q, n_blocks + 1, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, torch.where(best >= 0, best, n_blocks), True)
    selected[..., :n_blocks] |= torch.arange(n_blocks, device=q.device) == own

    pos = torch.arange(n_k, device=q.device)
    is_state = (pos + 1) % dilation == 0
    key_block = torch.where(is_state, ((pos + 1) // dilation - 1) // pattern.block, -1)
    gather_index = key_block.clamp(min=0).view(1, 1, 1, n_k).expand(b, h, n_q, n_k)
    by_block = selected.gather(-1, gather_index) & (key_block >= 0)
    t = query_pos.view(b, 1, n_q, 1)
    j = pos.view(1, 1, 1, n_k)
    # the dilated states are candidates here, visible only through their block
    return (by_block & (j <= t)) | visible(pattern, t, j, states=False)


def topk_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern,
                         softmax_scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v: [b, h, T, d] -> [b, h, T, d] under a top-k block pattern."""
    with torch.no_grad():
        mask = topk_allowed_mask(q, k, pattern, softmax_scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
