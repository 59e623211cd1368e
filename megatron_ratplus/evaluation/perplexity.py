"""Validation perplexity of one model under many attention patterns (no retraining between them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from megatron_ratplus.model import evaluating
from megatron_ratplus.patterns import parse_composition


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor, pattern=None, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over [n, s + 1] token windows (inputs tokens[:, :-1])."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"expected token windows shaped [n, s + 1] with s >= 1, got {tuple(tokens.shape)}")
    total, count = 0.0, 0
    with evaluating(model, pattern):
        for start in range(0, tokens.shape[0], batch_size):
            chunk = tokens[start:start + batch_size]
            inputs, labels = chunk[:, :-1], chunk[:, 1:]
            positions = torch.arange(inputs.shape[1]).expand_as(inputs)
            losses = model(inputs, positions, None, labels=labels)  # [b, s], vocab-parallel under TP
            total += losses.double().sum().item()
            count += losses.numel()
    return total / count


@dataclass
class PerplexityRow:
    """One pattern's result; dilation/window/sinks are None for compositions of several patterns."""

    pattern: str
    loss: float
    perplexity: float
    cache_fraction: float  # decode KV slots at the evaluated length relative to dense
    dilation: Optional[int] = None
    window: Optional[int] = None
    sinks: Optional[int] = None

    def as_dict(self):
        return asdict(self)


def cache_fraction(pattern, num_layers: int, num_heads: int, seq_len: int) -> float:
    """KV-cache slots of a pattern/composition after ``seq_len`` tokens, as a fraction of dense."""
    layers = parse_composition(pattern).resolve(num_layers, num_heads)
    slots = sum(p.cache_slots(seq_len) for layer in layers for p in layer)
    return slots / (num_layers * num_heads * seq_len)


def perplexity_table(model, tokens: torch.Tensor, patterns: Sequence, batch_size: int = 8):
    """A PerplexityRow per pattern (or composition), evaluated on the same token windows."""
    config = model.config
    rows = []
    for pattern in patterns:
        composition = parse_composition(pattern)
        loss = mean_loss(model, tokens, composition, batch_size)
        single = composition.layers[0].uniform if len(composition.layers) == 1 else None
        rows.append(PerplexityRow(
            pattern=str(composition), loss=loss, perplexity=math.exp(min(loss, 700.0)),
            cache_fraction=cache_fraction(composition, config.num_layers, config.num_attention_heads,
                                          tokens.shape[1] - 1),
            dilation=(single.dilation or None) if single and single.kind != "topk" else None,
            window=single.window if single else None, sinks=single.sinks if single else None))
    return rows
