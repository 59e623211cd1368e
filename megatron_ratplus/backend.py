"""Dispatch of the RAT+ hot ops: Triton kernels (ratplus_kernels) on CUDA, reference ops elsewhere.

``RATPLUS_KERNELS`` = ``auto`` (default: kernels for CUDA tensors), ``triton`` (always the
kernels; on CPU that needs TRITON_INTERPRET=1) or ``reference`` (always the PyTorch ops). The
decision is logged once per (setting, choice). Dense patterns stay on the reference op, which is
one causal scaled_dot_product_attention call (flash attention on a GPU).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from megatron_ratplus.ops import gated_scan as reference_scan
from megatron_ratplus.ops import pattern_attention as reference_attention
from megatron_ratplus.ops.decode import decode_attention as reference_decode
from megatron_ratplus.patterns import parse_pattern

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
    """``megatron_ratplus.ops.gated_scan`` contract, dispatched."""
    if use_kernels(x.device):
        from ratplus_kernels.scan import gated_scan as kernel

        return kernel(x, g, h0)
    return reference_scan(x, g, h0)


def shared_gate_scan(k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, state=None):
    """k~, v~ = scan of k, v [s, b, heads, d_h] under one sigmoid gate; state [b, 2, heads, d_h].

    Returns (k~, v~, final state). The kernel reads the gate once for both and fuses the sigmoid.
    """
    if use_kernels(k.device):
        from ratplus_kernels.scan import gated_scan_kv

        return gated_scan_kv(k, v, gate_logits, state)
    gate = torch.sigmoid(gate_logits.float())
    kv = torch.stack([k, v], dim=2)  # [s, b, 2, heads, d_h]
    kv, last = reference_scan(kv, gate.unsqueeze(2).expand_as(kv), state)
    return kv[:, :, 0], kv[:, :, 1], last


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern,
                      softmax_scale: Optional[float] = None) -> torch.Tensor:
    """``megatron_ratplus.ops.pattern_attention`` contract, dispatched."""
    pattern = parse_pattern(pattern)
    if not pattern.is_dense and use_kernels(q.device):
        from ratplus_kernels.attention import pattern_attention as kernel

        return kernel(q, k, v, pattern, softmax_scale)
    return reference_attention(q, k, v, pattern, softmax_scale)


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
