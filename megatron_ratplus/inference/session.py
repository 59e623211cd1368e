"""Prefill and step-by-step decode of a megatron-core GPTModel of RAT+ mixers.

The model's own forward runs unchanged (embedding, TransformerLayers, final norm, tied output
layer); only the mixers divert to a LayerCache while a DecodeSession is open (the mixer's
``decode_cache`` hook). Prefill runs the full-sequence path and fills the caches; a decode step
advances each sequence's recurrent state by one token, rotates q and k~ at the token's absolute
position (megatron's RotaryEmbedding table, rotate-half) and attends the cache.

Batches are ragged: prompts are right-padded, so real tokens never see padding (causal
attention, causal recurrence), and each sequence keeps its own position.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_ratplus.inference.cache import CacheFullError, PatternKV, cache_bytes
from megatron_ratplus.layers.mixer import RATPlusMixer


class LayerCache:
    """One mixer's decode cache: a PatternKV per head run and the fp32 recurrent state."""

    def __init__(self, session: "DecodeSession", mixer: RATPlusMixer, batch: int, capacity: int, dtype):
        self.session = session
        self.stores = [(a, b, PatternKV(p, batch, b - a, mixer.head_dim, capacity, dtype, session.device))
                       for p, a, b in mixer.head_runs]
        self.state = (torch.zeros(batch, mixer.heads_local, 2, mixer.head_dim, device=session.device)
                      if mixer.recurrence else None)  # k~, v~ of the last token, before RoPE
        self.scale = mixer.core_attention.softmax_scale

    @property
    def nbytes(self) -> int:
        state = self.state.nbytes if self.state is not None else 0
        return state + sum(store.nbytes for _, _, store in self.stores)

    def mix(self, mixer, query, key, value, gate_logits, rotary_pos_emb):
        """The mixer's attention output [s, b, heads, d_h]: prefill or one decode step, as the session says."""
        if self.session.prefilling:
            return self._prefill(mixer, query, key, value, gate_logits, rotary_pos_emb)
        return self._step(mixer, query, key, value, gate_logits)

    def _prefill(self, mixer, query, key, value, gate_logits, rotary_pos_emb):
        lengths = self.session.lengths
        if mixer.recurrence:  # fp32 states, as the training scan keeps them, then the model dtype
            k32, v32, _ = mixer.recur(key.float(), value.float(), gate_logits)
            rows = torch.arange(key.shape[1], device=key.device)
            self.state = torch.stack([k32[lengths - 1, rows], v32[lengths - 1, rows]], dim=2)
            key, value = k32.to(key.dtype), v32.to(value.dtype)
        query, key = mixer.rotate(query, key, rotary_pos_emb)
        keys, values = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, heads, s, d_h]
        for a, b, store in self.stores:
            store.fill(keys[:, a:b], values[:, a:b], lengths)
        return mixer.attend(query, key, value)

    def _step(self, mixer, query, key, value, gate_logits):
        t = self.session.lengths  # position of this token in each sequence
        query, key, value = query[0], key[0], value[0]  # [b, heads, d_h]
        if mixer.recurrence:
            gate = torch.sigmoid(gate_logits[0].float()).unsqueeze(2)
            self.state = gate * self.state + (1 - gate) * torch.stack([key, value], dim=2).float()
            key, value = self.state[:, :, 0].to(query.dtype), self.state[:, :, 1].to(query.dtype)
        freqs = self.session.rope[t].transpose(0, 1)  # [1, b, 1, d_h]: each sequence's own position
        heads = query.shape[1]
        rotated = apply_rotary_pos_emb(torch.cat([query, key], dim=1).unsqueeze(0), freqs, config=mixer.config)
        query, key = rotated[0, :, :heads], rotated[0, :, heads:]  # one RoPE call for q and k~
        outputs = []
        for a, b, store in self.stores:
            store.append(key[:, a:b], value[:, a:b], t)
            outputs.append(store.attend(query[:, a:b], t, self.scale, self.session.visibility(store)))
        return torch.cat(outputs, dim=1).unsqueeze(0)


class DecodeSession:
    """Decode caches attached to every mixer of ``model`` for one batch; use as a context manager.

    ``capacity``: the most positions any sequence will reach (prompt plus fed generated tokens).
    """

    def __init__(self, model, batch: int, capacity: int, dtype: Optional[torch.dtype] = None):
        if getattr(model, "embedding", None) is None or getattr(model, "output_layer", None) is None:
            raise ValueError("generation needs the whole model in one process (pipeline-parallel size 1)")
        self.model = model
        self.device = model.embedding.word_embeddings.weight.device
        self.dtype = dtype = dtype or model.embedding.word_embeddings.weight.dtype
        self.mixers = [m for m in model.modules() if isinstance(m, RATPlusMixer)]
        self.rope = model.rotary_pos_emb.get_emb(capacity).to(self.device)  # [capacity, 1, 1, d_h]
        self.capacity, self.batch = capacity, batch
        self.caches = [LayerCache(self, m, batch, capacity, dtype) for m in self.mixers]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.prefilling = False
        self._visibility = {}  # pattern -> this step's visibility, shared by the layers

    def __enter__(self):
        for mixer, cache in zip(self.mixers, self.caches):
            mixer.decode_cache = cache
        return self

    def __exit__(self, *exc):
        for mixer in self.mixers:
            mixer.decode_cache = None

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' caches (key/value slots plus recurrent states)."""
        return sum(cache.nbytes for cache in self.caches)

    def formula_bytes(self) -> int:
        """The same, from the formula P + W + 1 + floor(T/D) slots per sparse head (T per dense head)."""
        return sum(cache_bytes(m.head_patterns, self.batch, m.head_dim, self.capacity, self.dtype, m.recurrence)
                   for m in self.mixers)

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens, positions, None)  # [b, s, vocab / tp]
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts [b, s] of ``lengths`` tokens -> logits [b, s, vocab]."""
        if int(lengths.max()) > self.capacity or int(lengths.min()) < 1:
            raise ValueError(f"prompt lengths must be in 1..{self.capacity}")
        self.lengths = lengths.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        self.prefilling = True
        try:
            logits = self._logits(tokens.to(self.device), positions)
        finally:
            self.prefilling = False
        return logits

    def visibility(self, store: PatternKV):
        """``store.visibility`` at this step, computed once per pattern for all layers (after the
        first layer's write, which every layer repeats at the same slots)."""
        if store.pattern not in self._visibility:
            self._visibility[store.pattern] = store.visibility(self.lengths)
        return self._visibility[store.pattern]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (at each sequence's next position) -> logits [b, vocab]."""
        if int(self.lengths.max()) >= self.capacity:
            raise CacheFullError(f"a sequence reached the {self.capacity} positions its decode cache holds")
        positions = self.lengths.unsqueeze(1)
        self._visibility = {}
        logits = self._logits(tokens.to(self.device).view(-1, 1), positions)[:, 0]
        self.lengths = self.lengths + 1
        return logits
