"""Dispatch of the RAT+ hot ops: Triton kernels (ratplus_kernels) on CUDA, reference ops elsewhere.

``RATPLUS_KERNELS`` = ``auto`` (default: kernels for CUDA tensors), ``triton`` (always the
kernels; on CPU that needs TRITON_INTERPRET=1) or ``reference`` (always the PyTorch ops). The
decision is logged once per (setting, choice). Dense patterns stay on the reference op, which is
one causal scaled_dot_product_attention call (flash attention on a GPU).

The kernels take plain numbers (dilation, window, sinks, block sizes) and tensors; this module
turns a pattern into them. For top-k it runs the block selection (``ops.topk.select_blocks``,
torch ops) and hands the chosen block indices to the kernel.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from megatron_ratplus import ops
from megatron_ratplus.ops.decode import decode_attention as reference_decode
from megatron_ratplus.patterns import AttentionPattern, parse_pattern

ENV_VAR = "RATPLUS_KERNELS"
MODES = ("auto", "triton", "reference")
logger = logging.getLogger(__name__)
_logged = set()


def use_kernels(device: torch.device) -> bool:
    """Whether ops on ``device`` run the Triton kernels under the current RATPLUS_KERNELS setting."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}")
    choice = device.type == "cuda" if mode == "auto" else mode == "triton"
    if choice and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{ENV_VAR}=triton on {device.type} tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    if (mode, choice) not in _logged:
        _logged.add((mode, choice))
        logger.info("RAT+ ops use the %s (%s=%s, device %s)", "Triton kernels" if choice else "reference ops",
                    ENV_VAR, mode, device.type)
    return choice


def gated_scan(x: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor] = None):
    """``megatron_ratplus.ops.gated_scan`` contract, dispatched (the context-parallel scan's local step)."""
    if use_kernels(x.device):
        from ratplus_kernels.scan import gated_scan as kernel

        return kernel(x, g, h0)
    return ops.gated_scan(x, g, h0)


def shared_gate_scan(k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, state=None):
    """``megatron_ratplus.ops.shared_gate_scan`` contract, dispatched: k~, v~ = scan of k, v
    [s, b, heads, d_h] under one sigmoid gate; state [b, 2, heads, d_h].

    Returns (k~, v~, final state). The kernel reads the gate once for both and fuses the sigmoid.
    """
    if use_kernels(k.device):
        from ratplus_kernels.scan import gated_scan_kv

        return gated_scan_kv(k, v, gate_logits, state)
    return ops.shared_gate_scan(k, v, gate_logits, state)


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern,
                      softmax_scale: Optional[float] = None) -> torch.Tensor:
    """``megatron_ratplus.ops.pattern_attention`` contract, dispatched."""
    pattern = parse_pattern(pattern)
    if not pattern.is_dense and use_kernels(q.device):
        return kernel_attention(q, k, v, pattern, softmax_scale)
    return ops.pattern_attention(q, k, v, pattern, softmax_scale)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern,
                     softmax_scale: Optional[float] = None) -> torch.Tensor:
    """The Triton path of :func:`pattern_attention` for a sparse pattern, without the device choice.

    Top-k: the reference selection picks each query's blocks, the kernel attends them.
    """
    scale = float(softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
    if pattern.kind == "topk":
        from ratplus_kernels.topk import topk_attention

        selected = ops.select_blocks(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), pattern, scale)
        return topk_attention(q, k, v, selected, pattern.dilation, pattern.window, pattern.sinks, pattern.block, scale)
    from ratplus_kernels.attention import dilated_attention

    return dilated_attention(q, k, v, pattern.dilation, pattern.window, pattern.sinks, scale)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern,
                      softmax_scale: Optional[float], query_start: int, key_positions: torch.Tensor) -> torch.Tensor:
    """``megatron_ratplus.ops.blocked_attention`` contract (keys at explicit positions: a
    context-parallel slice). No kernel takes explicit key positions, so the reference runs on
    every device; this is where one would be dispatched."""
    return ops.blocked_attention(q, k, v, pattern, softmax_scale, query_start, key_positions)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_positions: torch.Tensor,
                     query_positions: torch.Tensor, pattern, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """``megatron_ratplus.ops.decode.decode_attention`` contract, dispatched (the kernel takes the
    pattern as D, W, P; without dilation D = 2^31 - 1 exceeds every position + 1, so no slot is a state)."""
    pattern = parse_pattern(pattern)
    if use_kernels(q.device):
        from ratplus_kernels.decode import decode_attention as kernel

        return kernel(q, k_cache, v_cache, slot_positions, query_positions, pattern.dilation or 2 ** 31 - 1,
                      pattern.window, pattern.sinks, softmax_scale)
    return reference_decode(q, k_cache, v_cache, slot_positions, query_positions, pattern, softmax_scale)
