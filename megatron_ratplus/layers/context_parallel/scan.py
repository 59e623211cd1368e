"""The gated recurrence under context parallelism, by passing state instead of tokens (docs/DESIGN.md §4).

h_t = g_t h_{t-1} + (1 - g_t) x_t is affine in h, so a chunk of the sequence acts on its
incoming state as h -> A h + b with A = prod of its gates and b = its final state when scanned
from zero. Each CP rank scans its two slices from zero, the ranks all-gather the (A, b) pairs
(two per rank, [*state] each: O(state) bytes, independent of sequence length), every rank
composes all 2 CP maps in *global* chunk order (its two slices are not adjacent) to get the
state entering each of its slices, and corrects them with h_t += (prod_{s<=t} g_s) h_in.

The backward pass is autograd through the same steps: megatron's differentiable all-gather
(backward: reduce-scatter) carries the adjoint of (A, b) back to the rank that produced it,
again O(state) bytes. The two stages are separate functions so a test can run all ranks in
one process with a plain stack in place of the all-gather. The local scans go through
``backend.gated_scan`` (the Triton kernel on CUDA), like the single-rank path.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_ratplus import backend
from megatron_ratplus.layers.context_parallel.layout import chunk_owner
from megatron_ratplus.ops import shared_gate_scan


def scan_slices(x: torch.Tensor, g: torch.Tensor):
    """Scan both local slices from a zero state.

    Returns (states, decays, summary): per slice the zero-start states and the running gate
    product (fp32), and ``summary`` [2 slices, 2 (A, b), *state] for the exchange.
    """
    half = x.shape[0] // 2
    states, decays, summary = [], [], []
    for piece in (slice(0, half), slice(half, None)):
        h, last = backend.gated_scan(x[piece], g[piece])
        decay = torch.cumprod(g[piece].float(), dim=0)
        states.append(h)
        decays.append(decay)
        summary.append(torch.stack([decay[-1], last.float()]))
    return states, decays, torch.stack(summary)


def compose_and_correct(states: List[torch.Tensor], decays: List[torch.Tensor], summaries: torch.Tensor,
                        h0: Optional[torch.Tensor], rank: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Given every rank's summary [CP, 2, 2, *state], correct this rank's slices.

    Returns (h for both local slices, the global final state), in the dtype of ``states``.
    """
    state = summaries.new_zeros(summaries.shape[3:]) if h0 is None else h0.float()
    incoming = [None, None]
    for chunk in range(2 * size):  # global order: exclusive prefix of the affine maps
        owner, piece = chunk_owner(chunk, size)
        if owner == rank:
            incoming[piece] = state
        decay, last = summaries[owner, piece]
        state = decay * state + last
    dtype = states[0].dtype
    corrected = [(h.float() + d * h_in).to(dtype) for h, d, h_in in zip(states, decays, incoming)]
    return torch.cat(corrected), state.to(dtype)


def cp_gated_scan(x: torch.Tensor, g: torch.Tensor, group, h0: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``gated_scan`` over a sequence split across ``group`` in megatron's load-balanced layout.

    x, g: this rank's [2 c, b, ...] (its two slices back to back); h0: the state before global
    token 0 (same on every rank) or None. Returns (h for the local tokens, the global final state).
    """
    if x.shape[0] % 2:
        raise ValueError(f"context-parallel scan: local length {x.shape[0]} must hold two equal slices")
    states, decays, summary = scan_slices(x, g)
    summaries = gather_from_sequence_parallel_region(summary.unsqueeze(0), True, group=group)
    return compose_and_correct(states, decays, summaries, h0, group.rank(), group.size())


def cp_shared_gate_scan(k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, group,
                        state: Optional[torch.Tensor] = None):
    """``backend.shared_gate_scan`` (k, v under one sigmoid gate) with :func:`cp_gated_scan` as the scan."""
    return shared_gate_scan(k, v, gate_logits, state, scan=lambda x, g, h0: cp_gated_scan(x, g, group, h0))
