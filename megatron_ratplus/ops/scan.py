"""Reference gated scan: h_t = g_t * h_{t-1} + (1 - g_t) * x_t along dim 0 (docs/DESIGN.md §3).

The scan is an affine recurrence h_t = a_t * h_{t-1} + b_t. Autograd through T elementwise
steps would keep T graph nodes and run T Python iterations each way, so this is a custom
autograd function whose backward is the same recurrence run in reverse time.

On CPU a per-step loop is dominated by per-op overhead, so both directions use a chunked
scan: every chunk is scanned from a zero state with the loop vectorised over all
chunks, the states entering the chunks come from the same recurrence over the chunks' ends
(scanned the same way, recursively), and each chunk is corrected by the cumulative product of
its gates times its incoming state. That is about 2 sqrt(T) Python steps for short
sequences and CHUNK log_CHUNK(T) for long ones instead of T, with identical math (the same
decomposition the context-parallel scan and the Triton kernel use).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch


CHUNK = 32  # most steps per chunk: each level of the recursion below is that many times shorter


def affine_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None,
                reverse: bool = False) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t over dim 0 of fp32 [T, N] tensors; ``reverse`` runs from T-1 down.

    Returns all states [T, N] (fp32). ``h0`` [N] is the state before the first step.
    """
    seq_len, width = a.shape
    chunk = min(CHUNK, math.isqrt(seq_len - 1) + 1)  # ceil(sqrt(T)) for short sequences
    n_chunks = -(-seq_len // chunk)
    pad = n_chunks * chunk - seq_len
    if pad:  # identity steps (a = 1, b = 0) at the end leave the state unchanged either way
        a = torch.cat([a, a.new_ones(pad, width)])
        h = torch.cat([b, b.new_zeros(pad, width)]).view(n_chunks, chunk, width)
    else:
        h = b.reshape(n_chunks, chunk, width).clone()
    a = a.view(n_chunks, chunk, width)
    decay = torch.empty_like(h)  # product of the gates from the chunk's first step (in scan order) up to t
    first, last = (chunk - 1, 0) if reverse else (0, chunk - 1)
    decay[:, first] = a[:, first]
    for i in (range(chunk - 2, -1, -1) if reverse else range(1, chunk)):  # all chunks at once, from zero
        prev = i + 1 if reverse else i - 1
        h[:, i].addcmul_(a[:, i], h[:, prev])
        torch.mul(decay[:, prev], a[:, i], out=decay[:, i])  # (torch.cumprod along dim 1 is slower)
    if n_chunks == 1 and h0 is None:
        return h.view(seq_len, width)
    initial = h0.unsqueeze(0) if h0 is not None else a.new_zeros(1, width)
    if n_chunks == 1:
        entering = initial
    else:  # the state entering each chunk: the same recurrence over the chunks' ends
        ends = affine_scan(decay[:, last], h[:, last], h0, reverse)
        entering = torch.cat([ends[1:], initial]) if reverse else torch.cat([initial, ends[:-1]])
    h.addcmul_(decay, entering.unsqueeze(1))
    return h.view(n_chunks * chunk, width)[:seq_len]


class _GatedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, h0):
        shape, dtype = x.shape, x.dtype
        x32 = x.reshape(shape[0], -1).float()
        g32 = g.reshape(shape[0], -1).float()
        h0_32 = None if h0 is None else h0.reshape(-1).float()
        h = affine_scan(g32, (1.0 - g32) * x32, h0_32)
        ctx.save_for_backward(x32, g32, h, h0_32)
        ctx.meta = (shape, x.dtype, g.dtype, None if h0 is None else h0.dtype)
        h_last = h[-1].to(dtype).reshape(shape[1:])
        return h.to(dtype).reshape(shape), h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        x32, g32, h, h0_32 = ctx.saved_tensors
        shape, x_dtype, g_dtype, h0_dtype = ctx.meta
        grad = grad_h.reshape(shape[0], -1).float() if grad_h is not None else torch.zeros_like(h)
        if grad_last is not None:
            grad = grad.clone()
            grad[-1] += grad_last.reshape(-1).float()
        # adjoint: lam_t = grad_t + g_{t+1} * lam_{t+1}
        next_gate = torch.cat([g32[1:], g32.new_zeros(1, g32.shape[1])])
        lam = affine_scan(next_gate, grad, reverse=True)
        prev = torch.cat([(h0_32 if h0_32 is not None else h.new_zeros(h.shape[1])).unsqueeze(0), h[:-1]])
        grad_x = ((1.0 - g32) * lam).to(x_dtype).reshape(shape)
        grad_g = (lam * (prev - x32)).to(g_dtype).reshape(shape)
        grad_h0 = None
        if h0_32 is not None and ctx.needs_input_grad[2]:
            grad_h0 = (g32[0] * lam[0]).to(h0_dtype).reshape(shape[1:])
        return grad_x, grad_g, grad_h0


def gated_scan(x: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gated linear recurrence along dim 0.

    x, g: [s, b, ...] (g already in (0, 1), e.g. a sigmoid); h0: like x[0] or None (zeros).
    Accumulates in fp32, returns (h in x's dtype, h_last = h[-1]).
    """
    if x.shape != g.shape:
        raise ValueError(f"gated_scan: x {tuple(x.shape)} and g {tuple(g.shape)} must have the same shape")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("gated_scan: x needs a non-empty leading (sequence) dimension")
    if h0 is not None and h0.shape != x.shape[1:]:
        raise ValueError(f"gated_scan: h0 {tuple(h0.shape)} must be shaped like x[0] {tuple(x.shape[1:])}")
    return _GatedScan.apply(x, g, h0)


def shared_gate_scan(k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, state: Optional[torch.Tensor] = None,
                     scan: Callable = gated_scan) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RAT+'s recurrence (docs/DESIGN.md §1): k and v [s, b, heads, d_h] scanned under one fp32
    sigmoid(gate_logits); ``state`` and the final state are [b, 2, heads, d_h] (keys, values).

    ``scan`` is any function with :func:`gated_scan`'s contract (the context-parallel scan is one).
    Returns (k~, v~, final state).
    """
    gate = torch.sigmoid(gate_logits.float())
    kv = torch.stack([k, v], dim=2)  # [s, b, 2, heads, d_h]
    kv, last = scan(kv, gate.unsqueeze(2).expand_as(kv), state)
    return kv[:, :, 0], kv[:, :, 1], last
