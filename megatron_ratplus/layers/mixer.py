"""The RAT+ token mixer: megatron-core's self-attention slot, filled with recurrence + attention.

    [o, q, k, v, g] = W_in x            (per head: o, q, k, v, g rows of d_h each)
    g = sigmoid(g) in fp32; k~, v~ = gated_scan([k, v], g)     (one gate for keys and values)
    q, k~ = RoPE(q), RoPE(k~)            (after the recurrence)
    y = attention(q, k~, v~) under the layer's pattern
    out = W_out (sigmoid(o) * y)

W_in's rows are grouped per head ([o q k v g] of head 0, then head 1, ...) so that a
tensor-parallel rank's contiguous slice of the column-parallel output holds whole heads. That
makes megatron's default sharding (axis 0) of the weight reshard correctly across TP sizes;
tools/convert_checkpoint.py permutes from the authors' [o; q; k; v; g] block layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_ratplus.config import RATPlusConfig
from megatron_ratplus.ops import gated_scan
from megatron_ratplus.parallel import context_parallel_group, cp_gated_scan, cp_pattern_attention
from megatron_ratplus.patterns import AttentionPattern, parse_pattern


@dataclass
class RATPlusMixerSubmodules:
    linear_in: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_out: Union[ModuleSpec, type] = None


class RATPlusMixer(MegatronModule):
    """Recurrence-augmented attention; input and output [s, b, h] like megatron's SelfAttention."""

    def __init__(self, config: RATPlusConfig, submodules: RATPlusMixerSubmodules, layer_number: int = 1,
                 pg_collection=None, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        tp_size = tp_group.size()
        if config.num_attention_heads % tp_size:
            raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be divisible "
                             f"by the tensor-parallel size ({tp_size})")
        self.recurrence = getattr(config, "recurrence", True)
        self.parts = 5 if self.recurrence else 4
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp_size
        self.pattern = parse_pattern(getattr(config, "attention_pattern", "dense"))
        self.cp_group = context_parallel_group(pg_collection)  # None without context parallelism

        width = self.head_dim * config.num_attention_heads
        self.linear_in = build_module(
            submodules.linear_in, config.hidden_size, self.parts * width, config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv", tp_group=tp_group)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number)
        self.linear_out = build_module(
            submodules.linear_out, width, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=tp_group)

    def set_attention_pattern(self, pattern) -> None:
        """Switch the pattern this layer attends with (no retraining needed)."""
        self.pattern = parse_pattern(pattern)

    def recur(self, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, state=None):
        """k~, v~ = gated scan of k, v under one fp32 sigmoid gate; returns (k~, v~, final state)."""
        gate = torch.sigmoid(gate_logits.float())
        kv = torch.stack([k, v], dim=2)  # [s, b, 2, heads, d_h]
        scan = gated_scan if self.cp_group is None else partial(cp_gated_scan, group=self.cp_group)
        kv, last = scan(kv, gate.unsqueeze(2).expand_as(kv), h0=state)
        return kv[:, :, 0], kv[:, :, 1], last

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None,
                rotary_pos_emb: Optional[torch.Tensor] = None, **unused):
        mixed, _ = self.linear_in(hidden_states)
        seq, batch = mixed.shape[:2]
        mixed = mixed.view(seq, batch, self.heads_local, self.parts, self.head_dim)
        out_gate, query, key, value = mixed.unbind(3)[:4]
        if self.recurrence:
            key, value, _ = self.recur(key, value, mixed[:, :, :, 4])
        if rotary_pos_emb is not None:
            q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            query = apply_rotary_pos_emb(query, q_freqs, config=self.config)
            key = apply_rotary_pos_emb(key, k_freqs, config=self.config)
        if self.cp_group is None:
            attended = self.core_attention(query, key, value, self.pattern)
        else:
            attended = cp_pattern_attention(query, key, value, self.pattern, self.cp_group,
                                            self.core_attention.softmax_scale)
        gated = torch.sigmoid(out_gate) * attended
        return self.linear_out(gated.reshape(seq, batch, -1))


def set_attention_pattern(model: torch.nn.Module, pattern: Union[str, AttentionPattern]) -> None:
    """Give every RAT+ mixer in ``model`` the same pattern."""
    for module in model.modules():
        if isinstance(module, RATPlusMixer):
            module.set_attention_pattern(pattern)
