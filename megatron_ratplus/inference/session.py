"""Prefill and step-by-step decode of a megatron-core GPTModel of RAT+ mixers.

A DecodeSession is megatron's inference context for our caches: ``GPTModel.forward(...,
inference_context=session)`` carries it through TransformerBlock and TransformerLayer to each
``RATPlusMixer.forward``, which takes its layer's ``LayerCache`` from ``key_value_memory_dict``
and runs its own prefill or one-token step (docs/DESIGN.md §5). With a context, GPTModel builds
the RoPE table for ``max_sequence_length`` positions and the mixer picks each sequence's rows.

Batches are ragged: prompts are right-padded, so real tokens never see padding (causal
attention, causal recurrence), and each sequence keeps its own position.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.inference.contexts.base_context import BaseInferenceContext

from megatron_ratplus.estimate import check_fits
from megatron_ratplus.inference.cache import CacheFullError, LayerCache, cache_bytes
from megatron_ratplus.layers.mixer import RATPlusMixer


class DecodeSession(BaseInferenceContext):
    """Decode caches for every mixer of ``model``, for one batch of ``batch`` sequences.

    ``capacity``: the most positions any sequence will reach (prompt plus fed generated tokens).
    ``sequence_lengths`` [b]: tokens each sequence holds once the current forward is done (the
    prompt lengths in prefill; in a decode step the fed token sits at ``sequence_lengths - 1``).
    As a context manager it frees the caches on exit. ``rows`` gives a session over some of its
    sequences that shares the storage (a server's preallocated pool, admitting and retiring
    sequences row by row).
    """

    def __init__(self, model, batch: int, capacity: int, dtype: Optional[torch.dtype] = None):
        super().__init__(materialize_only_last_token_logits=False)  # set per prefill (``last_only``)
        if getattr(model, "embedding", None) is None or getattr(model, "output_layer", None) is None:
            raise ValueError("generation needs the whole model in one process (pipeline-parallel size 1)")
        self.model = model
        self.device = model.embedding.word_embeddings.weight.device
        self.dtype = dtype = dtype or model.embedding.word_embeddings.weight.dtype
        # sizes from a flag or a request (--cache-memory-gb, a prompt file's lines) are refused
        # with their numbers before allocating, not by the allocator's traceback or an OOM kill
        check_fits(f"a decode cache of {batch} sequence(s) x {capacity} positions",
                   formula_bytes(model, batch, capacity, dtype), self.device)
        self.max_sequence_length, self.max_batch_size = capacity, batch
        self.mixers = [m for m in model.modules() if isinstance(m, RATPlusMixer)]
        self._shared = {}  # pattern -> this step's slot positions, shared by the layers
        self.key_value_memory_dict = {
            m.layer_number: LayerCache(m.head_runs, batch, m.head_dim, capacity, dtype, m.recurrence, self.device,
                                       self._shared)
            for m in self.mixers}
        self.sequence_lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.decode_mode = False
        self.chunk_starts = None  # [b] during a continued prefill (``prefill(..., starts)``)

    # megatron's context API: one static batch (ragged positions are ours), prefill then decode
    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        return self.decode_mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.key_value_memory_dict.clear()
        self.mixers = []

    @property
    def capacity(self) -> int:
        return self.max_sequence_length

    @property
    def batch(self) -> int:
        return self.max_batch_size

    @property
    def caches(self):
        """The layers' caches, in layer order."""
        return [self.key_value_memory_dict[m.layer_number] for m in self.mixers]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' caches (key/value slots plus recurrent states)."""
        return sum(cache.nbytes for cache in self.caches)

    def formula_bytes(self) -> int:
        """The same, from the formula P + W + 1 + floor(T/D) slots per sparse head (T per dense head)."""
        return formula_bytes(self.model, self.batch, self.capacity, self.dtype)

    def rows(self, start: int, stop: int) -> "DecodeSession":
        """A session over sequences [start, stop) of this one: its caches and lengths are views of
        this session's, so its prefill and steps write into these rows and leave the others alone."""
        view = copy.copy(self)
        view.max_batch_size = stop - start
        view._shared = {}
        view.key_value_memory_dict = {n: c.rows(start, stop, view._shared) for n, c in self.key_value_memory_dict.items()}
        view.sequence_lengths = self.sequence_lengths[start:stop]
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy sequence ``src`` (slots, recurrent state, length) into row ``dst``."""
        for cache in self.key_value_memory_dict.values():
            cache.move_row(src, dst)
        self.sequence_lengths[dst] = self.sequence_lengths[src]

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # [b, s, vocab]; megatron's inference path gathers the tensor-parallel vocabulary shards
        return self.model(tokens, positions, None, inference_context=self, runtime_gather_output=True)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, starts: Optional[torch.Tensor] = None,
                last_only: bool = False) -> torch.Tensor:
        """Right-padded prompts [b, s] of ``lengths`` tokens -> logits [b, s, vocab], or with
        ``last_only`` each prompt's last token's logits [b, vocab].

        ``starts`` [b] (chunked prefill): the tokens continue each sequence from position
        ``starts[b]``, which must be the length it already holds (its earlier chunks, prefilled
        or continued); the recurrent state carries over and the chunk attends what the cache kept.
        Without it (or all zero) the cache is filled from position 0.
        """
        lengths = lengths.to(self.device)
        if int(lengths.min()) < 1:
            raise ValueError("prompt lengths must be >= 1")
        starts = None if starts is None or not bool(starts.any()) else starts.to(self.device)
        if starts is not None:
            if not bool((starts == self.sequence_lengths).all()):
                raise ValueError(f"a continued prefill starts at each sequence's length "
                                 f"({self.sequence_lengths.tolist()}), got {starts.tolist()}")
            if int(starts.min()) < 1:
                raise ValueError("a continued prefill continues every sequence of the batch (none at 0)")
        end = lengths if starts is None else starts + lengths
        if int(end.max()) > self.capacity:
            raise ValueError(f"prompt lengths must be in 1..{self.capacity}")
        self.sequence_lengths.copy_(end)  # in place: a row view's lengths are its pool's
        self.decode_mode = False
        self.chunk_starts = starts
        offset = 0 if starts is None else starts.unsqueeze(1)
        positions = (torch.arange(tokens.shape[1], device=self.device) + offset).expand_as(tokens)
        positions = positions.clamp(max=self.capacity - 1)  # padding past the cache
        # megatron's static-batch path projects only the last position onto the vocabulary,
        # which is every prompt's last token when none is padded
        last_column = last_only and bool((lengths == tokens.shape[1]).all()) and not self.model.config.sequence_parallel
        self.materialize_only_last_token_logits = last_column
        try:
            logits = self._logits(tokens.to(self.device), positions)
        finally:
            self.chunk_starts = None
            self.materialize_only_last_token_logits = False
        if last_column:
            return logits[:, -1]
        return logits[torch.arange(len(lengths), device=self.device), lengths - 1] if last_only else logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (at each sequence's next position) -> logits [b, vocab]."""
        if int(self.sequence_lengths.max()) >= self.capacity:
            raise CacheFullError(f"a sequence reached the {self.capacity} positions its decode cache holds")
        positions = self.sequence_lengths.clone().unsqueeze(1)
        self.sequence_lengths += 1
        self.decode_mode = True
        self._shared.clear()
        return self._logits(tokens.to(self.device).view(-1, 1), positions)[:, 0]


def formula_bytes(model, batch: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of ``batch`` sequences' decode caches for ``capacity`` positions under ``model``'s
    current patterns, from the formula (``cache_bytes`` per mixer), before allocating them."""
    mixers = [m for m in model.modules() if isinstance(m, RATPlusMixer)]
    return sum(cache_bytes(m.head_patterns, batch, m.head_dim, capacity, dtype, m.recurrence) for m in mixers)
