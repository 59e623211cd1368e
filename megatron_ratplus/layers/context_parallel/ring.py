"""Dense attention under context parallelism as a ring (docs/DESIGN.md §4): O(T / CP) memory per rank.

Dense attention makes every earlier token visible, so exchanging "public" tokens would gather
all of K~/V~. Instead the ranks pass their K~/V~ around a ring one rank's worth at a time: at
step s rank r holds rank (r - s)'s two slices, attends them with its own two query slices
(megatron's load-balanced layout: query chunk qc against key chunk kc is full attention for
kc < qc, causal for kc == qc, nothing for kc > qc), and merges the partial results by their
log-sum-exp. The next step's K/V transfer is posted before the current step's attention, so it
overlaps the compute. A rank holds its own q, k, v, output and LSE plus two K/V blocks in flight.

The backward is the same ring: each step's gradient uses the merged output and LSE (so the
partial softmaxes need no rescaling), dQ accumulates locally, and dK/dV (fp32) travel with
their K/V, arriving back at their owner after the last step.

The transfer is an injectable :class:`Exchange`, so a test can run the ranks as threads.
Per-step attention uses torch's flash ops that return the LSE: the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``) and, on CUDA, FlashAttention
(``_scaled_dot_product_flash_attention``, which takes bf16/fp16 only: the GPU mixer's dtype;
not yet run on a GPU). megatron-core's own
ring lives in Transformer Engine's attention, which the RAT+ mixer (q against recurrence
states k~, v~) does not use.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ratplus.layers.context_parallel.layout import chunk_ids

KV_TAGS, GRAD_TAGS = (0, 1), (2, 3)  # distinct gloo tags: a block never pairs with another kind


class Pending:
    """A posted receive (and its send); :meth:`wait` returns the received tensor."""

    def __init__(self, requests, sent: torch.Tensor, received: torch.Tensor):
        self.requests, self.sent, self.received = requests, sent, received  # ``sent`` lives until the wait

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


class Exchange:
    """Send a tensor to the next CP rank while receiving the previous rank's, asynchronously."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensor: torch.Tensor, tag: int) -> Pending:
        tensor = tensor.contiguous()  # the mixer's k~, v~ may be strided views; p2p needs dense buffers
        received = torch.empty_like(tensor)
        if tensor.is_cuda:
            ops = [dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
                   dist.P2POp(dist.irecv, received, self.prev, self.group, tag)]
            return Pending(dist.batch_isend_irecv(ops), tensor, received)
        # gloo: unbatched, matched by (peer, tag) in posting order (see training/schedule.py)
        return Pending([dist.isend(tensor, self.next, self.group, tag=tag),
                        dist.irecv(received, self.prev, self.group, tag=tag)], tensor, received)


def attend_with_lse(q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over k, v ([s, b, heads, d_h]) -> (out [s, b, h, d], LSE [s, b, h] fp32)."""
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    if q.device.type != "cpu":  # CUDA (or meta, where the tests check the arguments against the op)
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dense context-parallel attention on CUDA runs FlashAttention, which needs bf16 or "
                             f"fp16 activations, not {q.dtype}")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    return out.permute(2, 0, 1, 3), lse.float().permute(2, 0, 1)


def attend_with_lse_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one step given the *merged* output and LSE of the queries."""
    qh, kh, vh, oh, gh = (t.permute(1, 2, 0, 3) for t in (q, k, v, out, grad_out))
    lse = lse.permute(1, 2, 0).contiguous()
    if q.device.type != "cpu":
        # what the forward returns for a dense call: no cumulative sequence lengths (a defined
        # tensor there selects the variable-length kernel) and, without dropout, an unused RNG state
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            gh, qh, kh, vh, oh, lse, None, None, q.shape[0], k.shape[0], 0.0, causal, seed, offset, scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gh, qh, kh, vh, oh, lse, 0.0, causal, scale=scale)
    return tuple(g.permute(2, 0, 1, 3) for g in grads)


def step_pairs(rank: int, source: int, size: int) -> List[Tuple[int, int, bool]]:
    """(query slice, key slice, causal) pairs rank ``rank`` computes against ``source``'s K/V."""
    pairs = []
    for q_piece, q_chunk in enumerate(chunk_ids(rank, size)):
        for k_piece, k_chunk in enumerate(chunk_ids(source, size)):
            if k_chunk <= q_chunk:
                pairs.append((q_piece, k_piece, k_chunk == q_chunk))
    return pairs


def pass_on(exchange, tensors, tags) -> List[Pending]:
    """Post each tensor's transfer to the next rank (no packing copy), one tag each."""
    return [exchange.start(t, tag) for t, tag in zip(tensors, tags)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, exchange, rank, size, scale):
        q, k, v = q.detach(), k.detach(), v.detach()
        out = [None, None]
        lse = [None, None]
        held = (k, v)
        for step in range(size):
            pending = pass_on(exchange, held, KV_TAGS) if step < size - 1 else []
            for qi, ki, causal in step_pairs(rank, (rank - step) % size, size):
                o, l = attend_with_lse(q.chunk(2)[qi], held[0].chunk(2)[ki], held[1].chunk(2)[ki], causal, scale)
                if out[qi] is None:
                    out[qi], lse[qi] = o.float(), l
                else:  # merge two partial softmaxes by their log-sum-exp
                    merged = torch.logaddexp(lse[qi], l)
                    out[qi].mul_(torch.exp(lse[qi] - merged).unsqueeze(-1))
                    out[qi].add_(o.float() * torch.exp(l - merged).unsqueeze(-1))
                    lse[qi] = merged
            held = tuple(p.wait() for p in pending) or held
        out, lse = torch.cat(out).to(q.dtype), torch.cat(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (exchange, rank, size, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        exchange, rank, size, scale = ctx.meta
        c = q.shape[0] // 2
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        held = (k, v)
        grads = tuple(torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))  # travel with K/V
        for step in range(size):
            pending = pass_on(exchange, held, KV_TAGS) if step < size - 1 else []
            for qi, ki, causal in step_pairs(rank, (rank - step) % size, size):
                rows, cols = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
                dq, dk, dv = attend_with_lse_backward(grad_out[rows], q[rows], held[0][cols], held[1][cols], out[rows],
                                                      lse[rows], causal, scale)
                grad_q[rows] += dq
                grads[0][cols] += dk
                grads[1][cols] += dv
            pending_grads = pass_on(exchange, grads, GRAD_TAGS)
            held = tuple(p.wait() for p in pending) or held
            grads = tuple(p.wait() for p in pending_grads)  # after the last step: this rank's own dK/dV
        return grad_q.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exchange, rank: int, size: int,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal dense attention for this rank's [2 c, b, heads, d_h] q, k, v (load-balanced layout),
    with ``exchange`` (an :class:`Exchange`, or a stand-in with the same ``start``) moving K/V."""
    scale = float(softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
    return _RingAttention.apply(q, k, v, exchange, rank, size, scale)
