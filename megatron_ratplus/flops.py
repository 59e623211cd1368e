"""Model FLOPs of RAT+ training, counted from the layer's parts (docs/DESIGN.md §1, §2, §6).

Per token and layer, forward (a multiply-add is 2 FLOPs; d = hidden size, H heads of d_h):

- W_in  d -> parts x d  (parts = 5 with the recurrence: o, q, k, v, g; 4 without):  2 d parts d
- W_out d -> d:                                                                       2 d d
- MLP   d -> ffn -> d:                                                                2 x 2 d ffn
- gated scan of k and v under one gate: SCAN_FLOPS_PER_CHANNEL per channel of d
- attention: per query and head, 2 x 2 x d_h x (keys the pattern lets the query see), averaged
  over the positions 0..T-1 of a training sequence; top-k adds 2 d_h per earlier block scored
- logits once per token: 2 d vocab

Training counts the backward as twice the forward. Joint training runs one step per pattern
(a sparse and a dense step, docs/DESIGN.md §6), so an iteration costs the sum of its patterns.
These are model FLOPs (the MFU convention): recomputation does not add to them, and the
elementwise work besides the scan (norms, RoPE, the output gate, softmax) is left out.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from megatron_ratplus.patterns import AttentionPattern, parse_composition

# sigmoid of the gate (~4) plus h = g h + (1 - g) x for keys and values (3 each).
SCAN_FLOPS_PER_CHANNEL = 10


def visible_keys(pattern: AttentionPattern, seq_length: int) -> float:
    """Mean number of keys a query attends under ``pattern``, over positions 0..T-1.

    Exact for dense, dilated and local patterns (docs/DESIGN.md §2: j <= t and
    ((j + 1) % D == 0 or t - j <= W or j < P)); for top-k an estimate from the block counts
    (K selected blocks + the own block's candidates + window + sinks, capped at t + 1).
    """
    t = np.arange(seq_length, dtype=np.int64)
    window = np.minimum(t, pattern.window) + 1  # keys t - W .. t
    before = np.maximum(t - pattern.window, 0)  # keys 0 .. t - W - 1 lie outside the window
    sinks = np.minimum(pattern.sinks, before)
    if pattern.kind == "topk":
        d = pattern.dilation or 1
        candidates = (t + 1) // d
        own_block = np.maximum(candidates - 1, 0) // pattern.block
        picked = np.minimum(pattern.topk, own_block) * pattern.block + (candidates - own_block * pattern.block)
        keys = np.minimum(t + 1, picked + window + sinks)
    elif pattern.dilation is None:  # local
        keys = window + sinks
    else:  # dilated states j = mD - 1 outside both the window and the sinks
        d = pattern.dilation
        states = np.where(before > pattern.sinks, before // d - pattern.sinks // d, 0)
        keys = window + sinks + states
    return float(keys.mean())


def _attention_flops(pattern: AttentionPattern, seq_length: int, head_dim: int) -> float:
    """Forward attention FLOPs of one head per query."""
    flops = 2 * 2 * head_dim * visible_keys(pattern, seq_length)
    if pattern.kind == "topk":  # the query scores every earlier pooled block
        blocks = (np.arange(seq_length) + 1) // (pattern.dilation or 1) // pattern.block
        flops += 2 * head_dim * float(blocks.mean())
    return flops


def flops_per_token(config, pattern, seq_length: int, training: bool = True) -> float:
    """FLOPs per token of one step at ``pattern`` (a pattern, string or composition string).

    A per-layer or per-head composition counts each layer's heads with their own patterns.
    ``training``: forward + backward (3x forward); else the forward alone.
    """
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = config.kv_channels or d // heads
    width = head_dim * heads
    parts = 5 if config.recurrence else 4
    dense_layer = 2 * d * parts * width + 2 * width * d + 2 * 2 * d * config.ffn_hidden_size
    if config.recurrence:
        dense_layer += SCAN_FLOPS_PER_CHANNEL * width
    per_head = {}
    attention = 0.0
    composition = parse_composition(pattern)
    composition.validate(config.num_layers, heads)
    # each named layer pattern repeats this often (a cycle, one for all layers, or one per layer):
    # counted, not laid out per layer, so a typo'd layer count costs no time or memory here
    repeat = config.num_layers // len(composition.layers)
    for layer in composition.layers:
        for head in layer.per_head(heads):
            if head not in per_head:
                per_head[head] = _attention_flops(head, seq_length, head_dim)
            attention += repeat * per_head[head]
    forward = config.num_layers * dense_layer + attention + 2 * d * config.vocab_size
    return 3 * forward if training else forward


def iteration_flops(config, patterns: Sequence[Union[str, AttentionPattern]], tokens: int,
                    seq_length: int) -> float:
    """Training FLOPs of one iteration over ``tokens`` tokens, one step per pattern in ``patterns``."""
    return tokens * sum(flops_per_token(config, p, seq_length, training=True) for p in patterns)


__all__ = ["flops_per_token", "iteration_flops", "visible_keys", "SCAN_FLOPS_PER_CHANNEL"]
