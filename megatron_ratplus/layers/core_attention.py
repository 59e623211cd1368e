"""Core attention of the RAT+ mixer: softmax attention under the current pattern.

A spec submodule (like megatron's DotProductAttention); megatron_ratplus.backend picks the fused
Triton kernel on CUDA and the reference op elsewhere.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ratplus import backend
from megatron_ratplus.patterns import AttentionPattern


class PatternAttention(MegatronModule):
    """[s, b, heads, d_h] q, k, v -> [s, b, heads, d_h] under an AttentionPattern."""

    def __init__(self, config: TransformerConfig, layer_number: int = 1, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = config.kv_channels ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                pattern: AttentionPattern) -> torch.Tensor:
        return backend.pattern_attention(query, key, value, pattern, self.softmax_scale)
