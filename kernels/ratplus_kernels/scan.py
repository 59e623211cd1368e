"""Chunked gated scan: h_t = g_t * h_{t-1} + (1 - g_t) * x_t along dim 0, forward and backward.

The sequence is cut into S segments. Each program owns BLOCK_N channels of one segment and walks
it in [TILE, BLOCK_N] tiles: an associative scan of the affine maps h -> a h + b inside the tile,
then the tile's last state is carried into the next tile in registers. With S = 1 this is one
pass (read x, g; write h). When there are too few channel blocks to fill the device, S > 1: a
first pass stores each segment's map (A = prod a, B = state from zero), and the main pass folds
the maps of the earlier segments into its incoming state (S is small, so that fold is cheap).

The gate arrives as a probability (the ops.gated_scan contract) or as logits with the sigmoid
fused; one gate may drive two inputs (RAT+'s keys and values) so it is read once for both.
States and the adjoint are fp32; inputs/outputs keep their dtype. Backward is the same scan run
in reverse time on the adjoint lam_t = dh_t + g_{t+1} lam_{t+1}; it reads the saved outputs for
h_{t-1}.

Tensors are handled as [T, M, D] views with unit stride on D (a mixer's k and v slices of the
fused projection qualify without a copy).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

MAX_SEGMENTS = 64


def _tiles(device: torch.device):
    """(time steps, channels) per tile; small off-GPU, where Triton's interpreter scans per element."""
    return (32, 64) if device.type == "cuda" else (16, 32)


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _gate(g_ptrs, mask, LOGITS: tl.constexpr):
    """Gate probability (fp32); out-of-range rows get 1 so they leave the state unchanged."""
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    if LOGITS:
        g = tl.sigmoid(g)
    return tl.where(mask, g, 1.0)


@triton.jit
def _scan_tile(a, b, carry):
    """States of one tile given the incoming state ``carry`` [BLOCK_N]; also its last state."""
    acc_a, acc_b = tl.associative_scan((a, b), 0, _affine_combine)
    h = acc_b + acc_a * carry[None, :]
    last = tl.sum(tl.where(tl.arange(0, a.shape[0])[:, None] == a.shape[0] - 1, h, 0.0), axis=0)
    return h, last


@triton.jit
def _channels(N, D, sx_m, sg_m, BLOCK_N: tl.constexpr):
    """This program's channels n of the [T, M, D] views: (n, in range, x column offset, g column offset)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return n, n < N, (n // D) * sx_m + n % D, (n // D) * sg_m + n % D


@triton.jit
def _fold_segments(state1, state2, seg_a_ptr, seg_b_ptr, seg, n, n_ok, N, TWO: tl.constexpr):
    """Apply the maps of segments 0 .. seg - 1 (in processing order) to the incoming states."""
    for s in range(0, seg):
        a_s = tl.load(seg_a_ptr + s * N + n, mask=n_ok, other=1.0)
        state1 = a_s * state1 + tl.load(seg_b_ptr + s * N + n, mask=n_ok, other=0.0)
        if TWO:
            state2 = a_s * state2 + tl.load(seg_b_ptr + (tl.num_programs(1) + s) * N + n, mask=n_ok, other=0.0)
    return state1, state2


@triton.jit
def _store_segment_map(prod, state1, state2, seg_a_ptr, seg_b_ptr, seg, n, n_ok, N, TWO: tl.constexpr):
    tl.store(seg_a_ptr + seg * N + n, prod, mask=n_ok)
    tl.store(seg_b_ptr + seg * N + n, state1, mask=n_ok)
    if TWO:
        tl.store(seg_b_ptr + (tl.num_programs(1) + seg) * N + n, state2, mask=n_ok)


@triton.jit
def _fwd_kernel(x1_ptr, x2_ptr, g_ptr, h1_ptr, h2_ptr, h0_ptr, last_ptr, seg_a_ptr, seg_b_ptr,
                T, N, D, sx_t, sx_m, sg_t, sg_m, seg_len,
                TWO: tl.constexpr, LOGITS: tl.constexpr, HAS_H0: tl.constexpr, SUMMARY: tl.constexpr,
                USE_SEGMENTS: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """SUMMARY: store each segment's map only. Otherwise write states (and the final state)."""
    seg = tl.program_id(1)
    n, n_ok, x_col, g_col = _channels(N, D, sx_m, sg_m, BLOCK_N)
    rows = tl.arange(0, TILE)
    carry1 = tl.zeros([BLOCK_N], tl.float32)
    carry2 = tl.zeros([BLOCK_N], tl.float32)
    prod = tl.full([BLOCK_N], 1.0, tl.float32)
    if not SUMMARY:
        if HAS_H0:
            carry1 = tl.load(h0_ptr + n, mask=n_ok, other=0.0)
            if TWO:
                carry2 = tl.load(h0_ptr + N + n, mask=n_ok, other=0.0)
        if USE_SEGMENTS:
            carry1, carry2 = _fold_segments(carry1, carry2, seg_a_ptr, seg_b_ptr, seg, n, n_ok, N, TWO)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, T)
    for t0 in range(start, stop, TILE):
        t = (t0 + rows).to(tl.int64)  # offsets of long sequences overflow int32
        mask = (t < stop)[:, None] & n_ok[None, :]
        g = _gate(g_ptr + t[:, None] * sg_t + g_col[None, :], mask, LOGITS)
        x_off = t[:, None] * sx_t + x_col[None, :]
        h_off = t[:, None] * N + n[None, :]
        x1 = tl.load(x1_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        h1, carry1 = _scan_tile(g, (1.0 - g) * x1, carry1)
        if TWO:
            x2 = tl.load(x2_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            h2, carry2 = _scan_tile(g, (1.0 - g) * x2, carry2)
        if SUMMARY:
            prod = prod * tl.reduce(g, 0, _mul)
        else:
            tl.store(h1_ptr + h_off, h1.to(h1_ptr.dtype.element_ty), mask=mask)
            if TWO:
                tl.store(h2_ptr + h_off, h2.to(h2_ptr.dtype.element_ty), mask=mask)
    if SUMMARY:
        _store_segment_map(prod, carry1, carry2, seg_a_ptr, seg_b_ptr, seg, n, n_ok, N, TWO)
    elif seg == tl.num_programs(1) - 1:
        tl.store(last_ptr + n, carry1.to(last_ptr.dtype.element_ty), mask=n_ok)
        if TWO:
            tl.store(last_ptr + N + n, carry2.to(last_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _bwd_kernel(x1_ptr, x2_ptr, g_ptr, h1_ptr, h2_ptr, dh1_ptr, dh2_ptr, dlast_ptr, h0_ptr,
                dx1_ptr, dx2_ptr, dg_ptr, dh0_ptr, seg_a_ptr, seg_b_ptr,
                T, N, D, sx_t, sx_m, sg_t, sg_m, seg_len,
                TWO: tl.constexpr, LOGITS: tl.constexpr, HAS_H0: tl.constexpr, HAS_DLAST: tl.constexpr,
                SUMMARY: tl.constexpr, USE_SEGMENTS: tl.constexpr, TILE: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Reverse-time adjoint scan; segment ``seg`` counts from the end of the sequence.

    Row i of a tile is time t = top - i, so the forward associative scan runs backwards in time.
    The adjoint's coefficient at t is g_{t+1} (1 at t = T - 1, where the final-state gradient
    enters as the incoming state).
    """
    seg = tl.program_id(1)
    n, n_ok, x_col, g_col = _channels(N, D, sx_m, sg_m, BLOCK_N)
    rows = tl.arange(0, TILE)
    lam1 = tl.zeros([BLOCK_N], tl.float32)
    lam2 = tl.zeros([BLOCK_N], tl.float32)
    prod = tl.full([BLOCK_N], 1.0, tl.float32)
    dh0_1 = tl.zeros([BLOCK_N], tl.float32)
    dh0_2 = tl.zeros([BLOCK_N], tl.float32)
    if HAS_DLAST:  # (nested ifs: Triton's compiler does not mix constexpr and tensor `and`)
        if seg == 0:
            lam1 = tl.load(dlast_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            if TWO:
                lam2 = tl.load(dlast_ptr + N + n, mask=n_ok, other=0.0).to(tl.float32)
    if not SUMMARY:
        if USE_SEGMENTS:
            lam1, lam2 = _fold_segments(lam1, lam2, seg_a_ptr, seg_b_ptr, seg, n, n_ok, N, TWO)
    top = T - 1 - seg * seg_len  # first (latest) time step of this segment
    bottom = tl.maximum(top - seg_len, -1)
    for i0 in range(0, seg_len, TILE):
        t = (top - i0 - rows).to(tl.int64)
        ok = t > bottom
        mask = ok[:, None] & n_ok[None, :]
        nxt = mask & (t < T - 1)[:, None]
        a = _gate(g_ptr + (t + 1)[:, None] * sg_t + g_col[None, :], nxt, LOGITS)
        h_off = t[:, None] * N + n[None, :]
        lam_t1, lam1 = _scan_tile(a, tl.load(dh1_ptr + h_off, mask=mask, other=0.0).to(tl.float32), lam1)
        if TWO:
            lam_t2, lam2 = _scan_tile(a, tl.load(dh2_ptr + h_off, mask=mask, other=0.0).to(tl.float32), lam2)
        if SUMMARY:
            prod = prod * tl.reduce(a, 0, _mul)
        else:
            g = _gate(g_ptr + t[:, None] * sg_t + g_col[None, :], mask, LOGITS)
            x_off = t[:, None] * sx_t + x_col[None, :]
            prev = mask & (t > 0)[:, None]
            first = (t == 0)[:, None] & n_ok[None, :]
            h_prev1 = tl.load(h1_ptr + h_off - N, mask=prev, other=0.0).to(tl.float32)
            if HAS_H0:
                h_prev1 += tl.load(h0_ptr + n[None, :] + 0 * t[:, None], mask=first, other=0.0)
            x1 = tl.load(x1_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx1_ptr + h_off, ((1.0 - g) * lam_t1).to(dx1_ptr.dtype.element_ty), mask=mask)
            dg = lam_t1 * (h_prev1 - x1)
            if TWO:
                h_prev2 = tl.load(h2_ptr + h_off - N, mask=prev, other=0.0).to(tl.float32)
                if HAS_H0:
                    h_prev2 += tl.load(h0_ptr + N + n[None, :] + 0 * t[:, None], mask=first, other=0.0)
                x2 = tl.load(x2_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx2_ptr + h_off, ((1.0 - g) * lam_t2).to(dx2_ptr.dtype.element_ty), mask=mask)
                dg += lam_t2 * (h_prev2 - x2)
            if LOGITS:
                dg = dg * g * (1.0 - g)
            tl.store(dg_ptr + h_off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
            if HAS_H0:  # dh0 = g_0 lam_0 (only the row t == 0 contributes)
                dh0_1 += tl.sum(tl.where(first, g * lam_t1, 0.0), axis=0)
                if TWO:
                    dh0_2 += tl.sum(tl.where(first, g * lam_t2, 0.0), axis=0)
    if SUMMARY:
        _store_segment_map(prod, lam1, lam2, seg_a_ptr, seg_b_ptr, seg, n, n_ok, N, TWO)
    elif HAS_H0:
        if bottom < 0:  # the segment holding t = 0
            tl.store(dh0_ptr + n, dh0_1, mask=n_ok)
            if TWO:
                tl.store(dh0_ptr + N + n, dh0_2, mask=n_ok)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """x [T, ...] as a [T, M, D] view with unit stride on D (copying only if no such view exists)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1] if x.dim() > 1 else 1)
    return flat if flat.stride(2) == 1 or flat.shape[2] == 1 else flat.contiguous()


def _launch_geometry(seq_len: int, width: int, device: torch.device, segments: Optional[int]):
    """(tile, channel block, channel blocks, segments, segment length).

    Without ``segments``: one segment (a single sweep) when the channel blocks alone
    give every SM a program; otherwise enough segments for about two programs per SM, since the
    segment maps cost a second read of x and g.
    """
    tile, block_n = _tiles(device)
    n_blocks = triton.cdiv(width, block_n)
    if segments is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        segments = 1 if n_blocks >= sms else -(-2 * sms // n_blocks)
    n_seg = max(1, min(segments, MAX_SEGMENTS, triton.cdiv(seq_len, tile)))
    seg_len = triton.cdiv(triton.cdiv(seq_len, n_seg), tile) * tile
    return tile, block_n, n_blocks, triton.cdiv(seq_len, seg_len), seg_len


class _ChunkedScan(torch.autograd.Function):
    """Scan of one or two inputs (sharing a gate) with optional initial state; see module doc."""

    @staticmethod
    def forward(ctx, gate, h0, logits, segments, *xs):
        seq_len, dtype = xs[0].shape[0], xs[0].dtype
        views = [_rows_view(x) for x in xs]
        g_view = _rows_view(gate)
        if g_view.shape != views[0].shape:
            raise ValueError(f"gated scan: gate {tuple(gate.shape)} must match x {tuple(xs[0].shape)}")
        width, inner = views[0].shape[1] * views[0].shape[2], views[0].shape[2]
        if views[-1].stride() != views[0].stride():
            views = [v.contiguous() for v in views]
        two = len(xs) == 2
        outs = [torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device) for _ in xs]
        last = torch.empty((len(xs), width), dtype=dtype, device=xs[0].device)
        h0_32 = None if h0 is None else h0.reshape(len(xs), width).float().contiguous()
        tile, block_n, n_blocks, n_seg, seg_len = _launch_geometry(seq_len, width, xs[0].device, segments)
        seg_a = torch.empty((n_seg, width), dtype=torch.float32, device=xs[0].device)
        seg_b = torch.empty((len(xs) * n_seg, width), dtype=torch.float32, device=xs[0].device)
        x1, x2 = views[0], views[-1]
        common = (seq_len, width, inner, x1.stride(0), x1.stride(1), g_view.stride(0), g_view.stride(1), seg_len)
        flags = dict(TWO=two, LOGITS=logits, HAS_H0=h0 is not None, USE_SEGMENTS=n_seg > 1,
                     TILE=tile, BLOCK_N=block_n)
        grid = (n_blocks, n_seg)
        h0_arg = h0_32 if h0_32 is not None else seg_a
        if n_seg > 1:
            _fwd_kernel[grid](x1, x2, g_view, outs[0], outs[-1], h0_arg, last, seg_a, seg_b, *common,
                              SUMMARY=True, **flags)
        _fwd_kernel[grid](x1, x2, g_view, outs[0], outs[-1], h0_arg, last, seg_a, seg_b, *common,
                          SUMMARY=False, **flags)
        ctx.save_for_backward(x1, x2, g_view, *outs, h0_32)
        ctx.meta = (logits, segments, gate.dtype, None if h0 is None else h0.dtype, h0 is not None)
        ctx.shapes = (gate.shape, None if h0 is None else h0.shape)
        return last.view((len(xs),) + xs[0].shape[1:]), *outs

    @staticmethod
    def backward(ctx, grad_last, *grad_outs):
        x1, x2, g_view, *rest = ctx.saved_tensors
        logits, segments, g_dtype, h0_dtype, has_h0 = ctx.meta
        gate_shape, h0_shape = ctx.shapes
        outs, h0_32 = rest[:-1], rest[-1]
        two = len(outs) == 2
        seq_len = outs[0].shape[0]
        width, inner = x1.shape[1] * x1.shape[2], x1.shape[2]
        dev = x1.device
        grads = [torch.zeros_like(o) if gr is None else gr.contiguous() for gr, o in zip(grad_outs, outs)]
        dxs = [torch.empty_like(o) for o in outs]
        dg = torch.empty(outs[0].shape, dtype=g_dtype, device=dev)
        dh0 = torch.empty((len(outs), width), dtype=torch.float32, device=dev) if has_h0 else None
        tile, block_n, n_blocks, n_seg, seg_len = _launch_geometry(seq_len, width, dev, segments)
        seg_a = torch.empty((n_seg, width), dtype=torch.float32, device=dev)
        seg_b = torch.empty((len(outs) * n_seg, width), dtype=torch.float32, device=dev)
        dlast = grad_last.reshape(len(outs), width).contiguous() if grad_last is not None else seg_a
        common = (seq_len, width, inner, x1.stride(0), x1.stride(1), g_view.stride(0), g_view.stride(1), seg_len)
        flags = dict(TWO=two, LOGITS=logits, HAS_H0=has_h0, HAS_DLAST=grad_last is not None,
                     USE_SEGMENTS=n_seg > 1, TILE=tile, BLOCK_N=block_n)
        args = (x1, x2, g_view, outs[0], outs[-1], grads[0], grads[-1], dlast,
                h0_32 if has_h0 else seg_a, dxs[0], dxs[-1], dg, dh0 if has_h0 else seg_a, seg_a, seg_b)
        if n_seg > 1:
            _bwd_kernel[(n_blocks, n_seg)](*args, *common, SUMMARY=True, **flags)
        _bwd_kernel[(n_blocks, n_seg)](*args, *common, SUMMARY=False, **flags)
        grad_h0 = dh0.to(h0_dtype).view(h0_shape) if has_h0 else None
        return dg.view(gate_shape), grad_h0, None, None, *dxs


def _check(x: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor], state_shape) -> None:
    if x.shape != g.shape:
        raise ValueError(f"gated_scan: x {tuple(x.shape)} and g {tuple(g.shape)} must have the same shape")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("gated_scan: x needs a non-empty leading (sequence) dimension")
    if h0 is not None and h0.shape != state_shape:
        raise ValueError(f"gated_scan: h0 {tuple(h0.shape)} must be shaped {tuple(state_shape)}")


def gated_scan(x: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor] = None,
               segments: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference ``ops.gated_scan``: g in (0, 1); returns (h, h_last)."""
    _check(x, g, h0, x.shape[1:])
    last, h = _ChunkedScan.apply(g, None if h0 is None else h0.unsqueeze(0), False, segments, x)
    return h, last[0]


def gated_scan_kv(k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor,
                  state: Optional[torch.Tensor] = None, segments: Optional[int] = None):
    """RAT+'s recurrence: k and v [s, b, heads, d_h] share sigmoid(gate_logits) in one pass.

    ``state`` and the returned final state are [b, 2, heads, d_h] (keys, values), as the mixer
    keeps them. Returns (k~, v~, final state).
    """
    _check(k, gate_logits, None, None)
    if v.shape != k.shape:
        raise ValueError(f"gated_scan_kv: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    state_shape = (k.shape[1], 2) + k.shape[2:]
    if state is not None and state.shape != state_shape:
        raise ValueError(f"gated_scan_kv: state {tuple(state.shape)} must be shaped {state_shape}")
    h0 = None if state is None else state.transpose(0, 1)
    last, hk, hv = _ChunkedScan.apply(gate_logits, h0, True, segments, k, v)
    return hk, hv, last.transpose(0, 1)
