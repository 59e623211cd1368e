"""The RAT+ token mixer: megatron-core's self-attention slot, filled with recurrence + attention.

    [o, q, k, v, g] = W_in x            (per head: o, q, k, v, g rows of d_h each)
    g = sigmoid(g) in fp32; k~, v~ = gated_scan([k, v], g)     (one gate for keys and values)
    q, k~ = RoPE(q), RoPE(k~)            (after the recurrence)
    y = attention(q, k~, v~) under the layer's pattern
    out = W_out (sigmoid(o) * y)

W_in's rows are grouped per head ([o q k v g] of head 0, then head 1, ...) so that a
tensor-parallel rank's contiguous slice of the column-parallel output holds whole heads. That
makes megatron's default sharding (axis 0) of the weight reshard correctly across TP sizes;
megatron_ratplus.convert.authors permutes from the authors' [o; q; k; v; g] block layout
(docs/DESIGN.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_ratplus import backend
from megatron_ratplus.config import RATPlusConfig
from megatron_ratplus.layers.context_parallel import context_parallel_group, cp_pattern_attention, cp_shared_gate_scan
from megatron_ratplus.patterns import AttentionPattern, PatternError, head_runs, parse_composition


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
        self.parts = config.mixer_parts
        self.head_dim = config.kv_channels
        self.heads_local = config.num_attention_heads // tp_size
        self.tp_rank = tp_group.rank()
        self.cp_group = context_parallel_group(pg_collection)  # None without context parallelism
        # Selective recomputation (megatron's "core_attn" module): rerun scan + RoPE + attention
        # in the backward instead of keeping k~, v~ and the attention inputs.
        self.recompute_core = (config.recompute_granularity == "selective"
                               and "core_attn" in (config.recompute_modules or ()))
        self.set_attention_pattern(parse_composition(getattr(config, "attention_pattern", "dense"))
                                   .per_layer(config.num_layers)[layer_number - 1])

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
        """Switch the pattern this layer attends with (no retraining needed).

        ``pattern``: one pattern, or a one-layer composition with per-head groups
        (``dense|dilated:16``); this rank keeps the patterns of its own heads.
        ``self.pattern`` is the layer's pattern when all its local heads share one, else None.
        """
        layer = parse_composition(pattern)
        if len(layer.layers) != 1:
            raise PatternError(f"a layer takes one layer pattern, got '{layer}'")
        heads = layer.layers[0].per_head(self.config.num_attention_heads)
        first = self.tp_rank * self.heads_local
        self.head_patterns = heads[first:first + self.heads_local]
        self.head_runs = head_runs(self.head_patterns)
        self.pattern = self.head_runs[0][0] if len(self.head_runs) == 1 else None

    def attend(self, query, key, value):
        """Pattern attention of [s, b, heads_local, d_h] tensors, each head group with its pattern;
        under context parallelism the ranks exchange only the keys a pattern can see."""
        def one(q, k, v, pattern):
            if self.cp_group is None:
                return self.core_attention(q, k, v, pattern)
            return cp_pattern_attention(q, k, v, pattern, self.cp_group, self.core_attention.softmax_scale)

        if len(self.head_runs) == 1:
            return one(query, key, value, self.head_runs[0][0])
        return torch.cat([one(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], p)
                          for p, a, b in self.head_runs], dim=2)

    def recur(self, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, state=None):
        """k~, v~ = gated scan of k, v under one fp32 sigmoid gate; returns (k~, v~, final state)."""
        if self.cp_group is None:
            return backend.shared_gate_scan(k, v, gate_logits, state)
        return cp_shared_gate_scan(k, v, gate_logits, self.cp_group, state)

    def rotate(self, query, key, rotary_pos_emb):
        """RoPE on q and k~ (after the recurrence); ``rotary_pos_emb``: freqs or a (q, k) pair."""
        if rotary_pos_emb is None:
            return query, key
        q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        return (apply_rotary_pos_emb(query, q_freqs, config=self.config),
                apply_rotary_pos_emb(key, k_freqs, config=self.config))

    def prefill(self, query, key, value, gate_logits, rotary_pos_emb, cache, lengths):
        """The full-sequence path over right-padded prompts of ``lengths`` tokens ([s, b, heads, d_h]),
        filling ``cache`` on the side; returns the attention output [s, b, heads, d_h].

        ``rotary_pos_emb``: megatron's RoPE table for the cache's positions (GPTModel builds it
        for ``inference_context.max_sequence_length``). The scan runs in fp32 so that the state
        each sequence's decode steps continue from (its last prompt token's k~, v~) is the fp32
        state the training scan carries.
        """
        seq, batch = query.shape[:2]
        if self.recurrence:
            k32, v32, _ = self.recur(key.float(), value.float(), gate_logits)
            rows = torch.arange(batch, device=query.device)
            cache.state = torch.stack([k32[lengths - 1, rows], v32[lengths - 1, rows]], dim=1)  # [b, 2, heads, d_h]
            key, value = k32.to(key.dtype), v32.to(value.dtype)
        positions = torch.arange(seq, device=query.device).unsqueeze(1)  # [s, 1]: the same for every sequence
        query, key = self.rotate(query, key, _rope_at(rotary_pos_emb, positions))
        cache.fill(key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), lengths)
        return self.attend(query, key, value)

    def prefill_chunk(self, query, key, value, gate_logits, rotary_pos_emb, cache, starts, lengths):
        """A prefill continued from the cached positions 0 .. starts[b] - 1 (chunked prefill):
        right-padded chunks [s, b, heads, d_h] of ``lengths`` tokens at positions starts[b] + i.

        The scan starts from the cache's fp32 state and leaves it at each chunk's last token; q
        and k~ are rotated at their positions; the chunk's queries attend the slots the pattern
        kept plus the chunk's own keys (``LayerCache.attend_chunk``), which are then cached.
        """
        seq, batch = query.shape[:2]
        if self.recurrence:
            k32, v32, _ = self.recur(key.float(), value.float(), gate_logits, cache.state)
            rows = torch.arange(batch, device=query.device)
            cache.state = torch.stack([k32[lengths - 1, rows], v32[lengths - 1, rows]], dim=1)
            key, value = k32.to(key.dtype), v32.to(value.dtype)
        positions = starts.unsqueeze(0) + torch.arange(seq, device=query.device).unsqueeze(1)  # [s, b]
        positions = positions.clamp(max=rotary_pos_emb_length(rotary_pos_emb, positions) - 1)  # padding only
        query, key = self.rotate(query, key, _rope_at(rotary_pos_emb, positions))
        out = cache.attend_chunk(*(x.permute(1, 2, 0, 3) for x in (query, key, value)), starts, lengths,
                                 self.core_attention.softmax_scale)
        return out.permute(2, 0, 1, 3)

    def decode_step(self, query, key, value, gate_logits, rotary_pos_emb, cache, positions):
        """One token per sequence: q, k, v, gate logits [b, heads, d_h] at ``positions`` [b] (ragged)
        -> attention output [b, heads, d_h].

        The scan advances the cache's fp32 state [b, 2, heads, d_h] by one token, q and k~ are
        rotated at each sequence's own position, and the cache writes k~, v~ to their slots and
        attends q over the slots the pattern lets it see.
        """
        if self.recurrence:
            k32, v32, cache.state = backend.shared_gate_scan(key.float()[None], value.float()[None], gate_logits[None],
                                                             cache.state)
            key, value = k32[0].to(key.dtype), v32[0].to(value.dtype)
        query, key = self.rotate(query[None], key[None], _rope_at(rotary_pos_emb, positions[None]))
        return cache.attend(query[0], key[0], value, positions, self.core_attention.softmax_scale)

    def core(self, query, key, value, gate_logits, rotary_pos_emb=None):
        """Recurrence, RoPE, pattern attention: [s, b, heads_local, d_h] each -> attended values."""
        if self.recurrence:
            key, value, _ = self.recur(key, value, gate_logits)
        query, key = self.rotate(query, key, rotary_pos_emb)
        return self.attend(query, key, value)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None,
                rotary_pos_emb: Optional[torch.Tensor] = None, **unused):
        mixed, _ = self.linear_in(hidden_states)
        seq, batch = mixed.shape[:2]
        mixed = mixed.view(seq, batch, self.heads_local, self.parts, self.head_dim)
        out_gate, query, key, value = mixed.unbind(3)[:4]
        gate_logits = mixed[:, :, :, 4] if self.recurrence else None
        if inference_context is not None:  # generation: this layer's decode cache (docs/DESIGN.md §5)
            cache = inference_context.key_value_memory_dict[self.layer_number]
            if inference_context.is_decode_only():
                attended = self.decode_step(query[0], key[0], value[0], None if gate_logits is None else gate_logits[0],
                                            rotary_pos_emb, cache, inference_context.sequence_lengths - 1)[None]
            elif getattr(inference_context, "chunk_starts", None) is not None:
                starts = inference_context.chunk_starts
                attended = self.prefill_chunk(query, key, value, gate_logits, rotary_pos_emb, cache, starts,
                                              inference_context.sequence_lengths - starts)
            else:
                attended = self.prefill(query, key, value, gate_logits, rotary_pos_emb, cache,
                                        inference_context.sequence_lengths)
        elif self.recompute_core and self.training and torch.is_grad_enabled():
            core = partial(self.core, rotary_pos_emb=rotary_pos_emb)  # the RoPE table is not an input
            attended = tensor_parallel.checkpoint(core, False, query, key, value, gate_logits)
        else:
            attended = self.core(query, key, value, gate_logits, rotary_pos_emb)
        gated = torch.sigmoid(out_gate) * attended
        return self.linear_out(gated.reshape(seq, batch, -1))


def _rope_at(rotary_pos_emb, positions: torch.Tensor):
    """Rows of megatron's RoPE table [T, 1, 1, d_h] (or of a (q, k) pair) for a [s, b] grid of
    positions -> [s, b, 1, d_h], which broadcasts over the heads of [s, b, heads, d_h]."""
    if rotary_pos_emb is None:
        return None
    if isinstance(rotary_pos_emb, tuple):
        return tuple(_rope_at(freqs, positions) for freqs in rotary_pos_emb)
    return rotary_pos_emb[positions].squeeze(2)


def rotary_pos_emb_length(rotary_pos_emb, positions: torch.Tensor) -> int:
    """Positions megatron's RoPE table covers (any position when there is no table)."""
    if rotary_pos_emb is None:
        return int(positions.max()) + 1
    table = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
    return table.shape[0]


def set_attention_pattern(model: torch.nn.Module, pattern: Union[str, AttentionPattern, list]) -> None:
    """Give the RAT+ mixers of ``model`` a pattern or a per-layer/per-head composition.

    Grammar: megatron_ratplus.patterns. Layers are matched by their global layer number, so a
    pipeline stage picks its own layers' patterns.
    """
    mixers = [m for m in model.modules() if isinstance(m, RATPlusMixer)]
    if mixers:
        layers = parse_composition(pattern).per_layer(mixers[0].config.num_layers)
        for mixer in mixers:
            mixer.set_attention_pattern(layers[mixer.layer_number - 1])
