"""Reference ops (the readable ground truth every fast kernel is tested against)."""

from megatron_ratplus.ops.attention import blocked_attention, pattern_attention
from megatron_ratplus.ops.scan import affine_scan, gated_scan, shared_gate_scan
from megatron_ratplus.ops.topk import select_blocks

__all__ = ["gated_scan", "affine_scan", "shared_gate_scan", "pattern_attention", "blocked_attention",
           "select_blocks"]
