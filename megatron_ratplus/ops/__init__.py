"""Reference ops (the readable ground truth every fast kernel is tested against)."""

from megatron_ratplus.ops.attention import pattern_attention
from megatron_ratplus.ops.scan import affine_scan, gated_scan

__all__ = ["gated_scan", "affine_scan", "pattern_attention"]
