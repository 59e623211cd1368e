"""Pattern search: per-layer patterns that fit a KV-cache budget at the least perplexity cost.

The paper sparsifies every layer alike and names per-layer choice as future work. Here each
layer's sensitivity is measured on held-out data: the loss increase when only that layer uses a
candidate pattern and all others stay dense. Treating the increases as additive, the best
composition under the budget is a multiple-choice knapsack, solved exactly by keeping the
Pareto front of (cache bytes, summed increase) over the layers. The chosen composition is then
measured as a whole, since layer interactions make the additive sum only an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_ratplus.errors import UserError
from megatron_ratplus.evaluation.perplexity import mean_loss
from megatron_ratplus.inference.cache import cache_bytes
from megatron_ratplus.patterns import parse_composition, parse_pattern

DEFAULT_CANDIDATES = ("dense", "dilated:4", "dilated:16", "dilated:64")


class BudgetError(UserError):
    """No composition of the candidates fits the KV-cache budget."""


@dataclass
class SearchResult:
    composition: str            # the chosen per-layer composition (pattern grammar)
    cache_bytes: int            # its decode cache for one sequence at the context length
    dense_cache_bytes: int
    budget_bytes: int
    base_loss: float            # all layers dense
    predicted_loss: float       # base + the chosen layers' measured increases
    measured_loss: float        # the chosen composition evaluated as a whole
    candidates: List[str]
    sensitivity: List[List[float]]  # [layer][candidate] loss increase, that layer alone
    layer_bytes: List[int]      # [candidate] cache bytes of one layer

    def summary(self) -> str:
        return (f"chosen composition: {self.composition}\n"
                f"KV cache per sequence: {self.cache_bytes} bytes ({self.cache_bytes / self.dense_cache_bytes:.1%} "
                f"of dense {self.dense_cache_bytes}; budget {self.budget_bytes})\n"
                f"loss: dense {self.base_loss:.4f}, predicted {self.predicted_loss:.4f}, "
                f"measured {self.measured_loss:.4f}")


def layer_sensitivities(model, tokens: torch.Tensor, candidates: Sequence, batch_size: int = 8):
    """(dense loss, [layer][candidate] loss increase with only that layer on the candidate)."""
    layers = model.config.num_layers
    base = mean_loss(model, tokens, "dense", batch_size)
    table = []
    for layer in range(layers):
        row = []
        for cand in candidates:
            patterns = ["dense"] * layers
            patterns[layer] = str(cand)
            row.append(0.0 if parse_pattern(cand).is_dense else
                       mean_loss(model, tokens, patterns, batch_size) - base)
        table.append(row)
    return base, table


def choose(sensitivity: Sequence[Sequence[float]], costs: Sequence[int], budget: int) -> List[int]:
    """Candidate index per layer minimising the summed sensitivity with summed cost <= budget."""
    front = [(0, 0.0, [])]  # Pareto front: (cost, summed increase, choices), cost ascending
    for row in sensitivity:
        grown = sorted((cost + costs[c], value + row[c], picks + [c])
                       for cost, value, picks in front for c in range(len(costs))
                       if cost + costs[c] <= budget)
        front = []
        for entry in grown:  # keep an entry only if it beats every cheaper one
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
        if not front:
            raise BudgetError(f"no composition fits a budget of {budget} bytes "
                              f"(cheapest: {min(costs) * len(sensitivity)})")
    return min(front, key=lambda e: (e[1], e[0]))[2]


def search_patterns(model, tokens: torch.Tensor, budget_bytes: Optional[int] = None,
                    budget_fraction: Optional[float] = None, candidates: Sequence = DEFAULT_CANDIDATES,
                    context_length: Optional[int] = None, batch_size: int = 8) -> SearchResult:
    """Choose per-layer patterns for a KV-cache budget (bytes, or a fraction of dense) at
    ``context_length`` tokens (default: the evaluated window length)."""
    if (budget_bytes is None) == (budget_fraction is None):
        raise ValueError("give exactly one of budget_bytes and budget_fraction")
    config = model.config
    candidates = [str(parse_pattern(c)) for c in candidates]
    length = context_length or tokens.shape[1] - 1
    dtype = model.embedding.word_embeddings.weight.dtype
    heads, head_dim = config.num_attention_heads, config.kv_channels
    costs = [cache_bytes([parse_pattern(c)] * heads, 1, head_dim, length, dtype, config.recurrence)
             for c in candidates]
    dense = cache_bytes([parse_pattern("dense")] * heads, 1, head_dim, length, dtype,
                        config.recurrence) * config.num_layers
    budget = int(budget_bytes if budget_bytes is not None else budget_fraction * dense)
    cheapest = min(costs) * config.num_layers
    if budget < cheapest:
        raise BudgetError(f"a KV-cache budget of {budget} bytes is below the cheapest composition of "
                          f"these candidates ({cheapest} bytes at {length} tokens)")
    base, sensitivity = layer_sensitivities(model, tokens, candidates, batch_size)
    picks = choose(sensitivity, costs, budget)
    composition = str(parse_composition([candidates[c] for c in picks]))
    return SearchResult(
        composition=composition, cache_bytes=sum(costs[c] for c in picks), dense_cache_bytes=dense,
        budget_bytes=budget, base_loss=base,
        predicted_loss=base + sum(sensitivity[layer][c] for layer, c in enumerate(picks)),
        measured_loss=mean_loss(model, tokens, composition, batch_size),
        candidates=candidates, sensitivity=sensitivity, layer_bytes=costs)
