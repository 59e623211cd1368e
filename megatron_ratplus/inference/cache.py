"""Decode caches: the key/value slots a pattern can still attend, plus the running recurrent state.

The cache owns the slots, the mixer owns the maths (docs/DESIGN.md §5): ``RATPlusMixer`` runs
the recurrence and RoPE and hands its rotated k~, v~ and q to ``LayerCache``, which writes them
to their slots and attends.

A sparse pattern (docs/DESIGN.md §2) only ever attends sinks (j < P), chunk ends
((j + 1) % D == 0) and the last W + 1 positions, so a cache for T positions needs P + W + 1 + floor(T/D) slots, laid out

    [ sinks: positions 0..P-1 | ring: the last W + 1 positions | states: chunk ends D-1, 2D-1, ... ]

Every slot carries its position (``PatternKV.slot_positions``), and the pattern's own rule decides
which slots a query sees, inside the decode attention op (``backend.decode_attention``: the Triton
kernel on CUDA); a position held twice (a chunk end inside the window, a sink that is also a chunk
end) counts only in its sink or state slot (-1 elsewhere). Dense and top-k patterns (and patterns
whose compact layout would not be smaller) keep the full layout, slot = position. Keys are stored after
RoPE; the recurrent state (k~, v~ of the last token, before RoPE) is kept in fp32, as the
training scan accumulates it.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ratplus import backend
from megatron_ratplus.ops.topk import topk_allowed_mask
from megatron_ratplus.patterns import AttentionPattern, visible


CHUNK_SCORES = 2 ** 26  # a continued prefill's attention scores held at once (256 MiB in fp32)


class CacheFullError(RuntimeError):
    """A sequence ran past the positions its decode cache was sized for."""


class PatternKV:
    """Keys and values of one group of heads under one pattern, for a batch of sequences."""

    def __init__(self, pattern: AttentionPattern, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device=None):
        self.pattern, self.capacity = pattern, capacity
        slots = pattern.cache_slots(capacity)
        self.compact = slots < capacity
        if self.compact:
            self.n_sink, self.n_ring = pattern.sinks, pattern.window + 1
        self.keys = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        if self.compact:  # position held by each ring slot; -1: empty
            self.ring_pos = torch.full((batch, self.n_ring), -1, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value slots (the ring's position index is bookkeeping, not counted)."""
        return self.keys.nbytes + self.values.nbytes

    def _state_slot(self, m):
        return self.n_sink + self.n_ring + m

    def fill(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        """Prefill from [b, heads, s, d_h] keys/values of right-padded prompts of ``lengths`` tokens.

        Slots past a sequence's length receive padding garbage; they are never visible before the
        decode step at that position overwrites them.
        """
        seq = keys.shape[2]
        if not self.compact:
            self.keys[:, :, :seq], self.values[:, :, :seq] = keys, values
            return
        n = min(self.n_sink, seq)
        self.keys[:, :, :n], self.values[:, :, :n] = keys[:, :, :n], values[:, :, :n]
        last = (lengths - 1).unsqueeze(1)  # ring slot r holds the latest position p <= last, p % (W+1) = r
        ring = torch.arange(self.n_ring, device=keys.device)
        pos = last - torch.remainder(last - ring, self.n_ring)
        index = pos.clamp(min=0)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        ring_slots = slice(self.n_sink, self.n_sink + self.n_ring)
        self.keys[:, :, ring_slots] = keys.gather(2, index)
        self.values[:, :, ring_slots] = values.gather(2, index)
        self.ring_pos.copy_(torch.where(pos >= 0, pos, torch.full_like(pos, -1)))  # in place: row views write through
        if self.pattern.dilation:
            d = self.pattern.dilation
            m = seq // d
            states = slice(self._state_slot(0), self._state_slot(m))
            self.keys[:, :, states] = keys[:, :, d - 1::d][:, :, :m]
            self.values[:, :, states] = values[:, :, d - 1::d][:, :, :m]

    def append(self, key: torch.Tensor, value: torch.Tensor, t: torch.Tensor) -> None:
        """Write the [b, heads, d_h] key/value of the token at position t[b] of each sequence."""
        rows = torch.arange(t.shape[0], device=t.device)
        if not self.compact:
            self.keys[rows, :, t], self.values[rows, :, t] = key, value
            return
        if int(t.min()) < self.n_sink:
            sink = t < self.n_sink
            self.keys[rows[sink], :, t[sink]], self.values[rows[sink], :, t[sink]] = key[sink], value[sink]
        ring = t % self.n_ring
        self.keys[rows, :, self.n_sink + ring], self.values[rows, :, self.n_sink + ring] = key, value
        self.ring_pos[rows, ring] = t
        end = (t + 1) % self.pattern.dilation == 0 if self.pattern.dilation else None
        if end is not None and bool(end.any()):
            slot = self._state_slot((t + 1) // self.pattern.dilation - 1)[end]
            self.keys[rows[end], :, slot], self.values[rows[end], :, slot] = key[end], value[end]

    def write_chunk(self, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                    lengths: torch.Tensor) -> None:
        """Write [b, heads, s, d_h] keys/values of positions starts[b] .. starts[b] + lengths[b] - 1
        (a prefill continued from the cached positions 0 .. starts[b] - 1; chunked prefill)."""
        for b, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            k, v = keys[b, :, :n], values[b, :, :n]
            if not self.compact:
                self.keys[b, :, start:start + n], self.values[b, :, start:start + n] = k, v
                continue
            if start < self.n_sink:
                m = min(self.n_sink, start + n) - start
                self.keys[b, :, start:start + m], self.values[b, :, start:start + m] = k[:, :m], v[:, :m]
            tail = min(n, self.n_ring)  # the chunk's last W + 1 positions take the ring
            pos = torch.arange(start + n - tail, start + n, device=keys.device)
            slot = self.n_sink + pos % self.n_ring
            self.keys[b][:, slot], self.values[b][:, slot] = k[:, n - tail:], v[:, n - tail:]
            self.ring_pos[b, pos % self.n_ring] = pos
            d = self.pattern.dilation
            if d:
                first = -(-(start + 1) // d) * d - 1  # first chunk end >= start
                if first < start + n:
                    ends = torch.arange(first, start + n, d, device=keys.device)
                    slot = self._state_slot((ends + 1) // d - 1)
                    self.keys[b][:, slot], self.values[b][:, slot] = k[:, ends - start], v[:, ends - start]

    def attend_chunk(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """A continued prefill: [b, heads, s, d_h] queries and keys/values at positions
        starts[b] + i attend the cached slots the pattern kept of positions < starts[b] plus the
        chunk's own keys under the pattern's rule, then the chunk is written to its slots.
        -> [b, heads, s, d_h]. Computed in fp32 on the mask path (prefill, not the decode kernel)."""
        seq = query.shape[2]
        q_pos = starts.unsqueeze(1) + torch.arange(seq, device=query.device)  # [b, s]
        if not self.compact:  # slot = position: write first, then attend slots 0 .. last position
            self.write_chunk(keys, values, starts, lengths)
            used = int((starts + lengths).max())
            k_all, v_all = self.keys[:, :, :used], self.values[:, :, :used]
            positions = torch.arange(used, device=query.device).expand(query.shape[0], used)
        else:  # the cached slots, as seen from the chunk, then the chunk; write after attending
            cached = self.slot_positions(starts - 1)
            cached = torch.where(cached < starts.unsqueeze(1), cached, -1)  # sinks not yet written
            used = cached.shape[1]
            k_all = torch.cat([self.keys[:, :, :used], keys], dim=2)
            v_all = torch.cat([self.values[:, :, :used], values], dim=2)
            positions = torch.cat([cached, q_pos], dim=1)  # [b, used + s]
        k_all, v_all = k_all.float(), v_all.float()
        # queries in blocks: at most CHUNK_SCORES fp32 scores (and their mask) at a time
        block = max(1, CHUNK_SCORES // (query.shape[0] * query.shape[1] * k_all.shape[2]))
        out = []
        for i in range(0, seq, block):
            q, t = query[:, :, i:i + block], q_pos[:, i:i + block]
            if self.pattern.kind == "topk":  # full layout: positions are the slots
                mask = topk_allowed_mask(q, k_all, self.pattern, scale, query_pos=t)
            else:
                j = positions[:, None, None, :]
                mask = (j >= 0) & visible(self.pattern, t[:, None, :, None], j)
            scores = torch.einsum("bhsd,bhkd->bhsk", q.float(), k_all) * scale
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
            out.append(torch.einsum("bhsk,bhkd->bhsd", probs, v_all).to(query.dtype))
        out = torch.cat(out, dim=2)
        if self.compact:
            self.write_chunk(keys, values, starts, lengths)
        return out

    def rows(self, start: int, stop: int) -> "PatternKV":
        """This store restricted to sequences [start, stop): views of the same storage, so a
        server prefills or decodes some rows of a preallocated pool without copying it."""
        view = copy.copy(self)
        view.keys, view.values = self.keys[start:stop], self.values[start:stop]
        if self.compact:
            view.ring_pos = self.ring_pos[start:stop]
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy sequence ``src``'s slots into row ``dst`` (a pool keeps its live rows contiguous)."""
        self.keys[dst], self.values[dst] = self.keys[src], self.values[src]
        if self.compact:
            self.ring_pos[dst] = self.ring_pos[src]

    def slot_positions(self, t: torch.Tensor) -> torch.Tensor:
        """[b, used] position held by each slot a query at t[b] may need; -1 where a slot must not count.

        Equal for every layer's store of the same pattern (same layout, same positions), so a
        decode step computes it once per pattern (``LayerCache``'s ``shared`` memo).
        """
        if not self.compact:  # slot = position; slots past t[b] are ruled out by j <= t
            return torch.arange(int(t.max()) + 1, device=t.device).expand(t.shape[0], -1)
        batch, p = t.shape[0], self.n_sink
        n_states = int((t.max() + 1) // self.pattern.dilation) if self.pattern.dilation else 0
        sinks = torch.arange(p, device=t.device).expand(batch, p)
        ring = self.ring_pos
        duplicate = ring < p  # a sink's own slot holds it
        if self.pattern.dilation:
            duplicate |= (ring + 1) % self.pattern.dilation == 0  # a state slot holds it
            states = (torch.arange(n_states, device=t.device) + 1) * self.pattern.dilation - 1
            states = torch.where(states < p, -1, states).expand(batch, n_states)
        else:
            states = ring.new_empty(batch, 0)
        return torch.cat([sinks, torch.where(duplicate, -1, ring), states], dim=1)

    def attend(self, query: torch.Tensor, t: torch.Tensor, scale: float,
               slot_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, heads, d_h] queries at positions t[b] -> [b, heads, d_h] attention over the cache.

        ``slot_positions``: this step's ``self.slot_positions(t)`` if already computed.
        """
        positions = self.slot_positions(t) if slot_positions is None else slot_positions
        used = positions.shape[1]
        keys, values = self.keys[:, :, :used], self.values[:, :, :used]
        if self.pattern.kind != "topk":
            return backend.decode_attention(query, keys, values, positions, t, self.pattern, scale)
        # top-k keeps the full layout and picks its blocks per query from the scores; it stays on
        # the reference mask path (the decode kernel applies the positional rule only)
        q = query.unsqueeze(2)
        mask = topk_allowed_mask(q, keys, self.pattern, scale, query_pos=t.unsqueeze(1))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).squeeze(2)


class LayerCache:
    """One mixer's decode cache: a PatternKV per head run [a, b) and the fp32 recurrent state.

    ``state`` [b, 2, heads, d_h] holds k~, v~ of each sequence's last token before RoPE (the
    layout of ``backend.shared_gate_scan``). ``shared``: a dict the session clears every step,
    where the layers of a model share each pattern's slot positions.
    """

    def __init__(self, head_runs, batch: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 recurrence: bool, device=None, shared: Optional[dict] = None):
        self.stores = [(a, b, PatternKV(p, batch, b - a, head_dim, capacity, dtype, device)) for p, a, b in head_runs]
        heads = head_runs[-1][2]
        self._state = torch.zeros(batch, 2, heads, head_dim, device=device) if recurrence else None
        self.shared = {} if shared is None else shared

    @property
    def state(self) -> Optional[torch.Tensor]:
        return self._state

    @state.setter
    def state(self, value: torch.Tensor) -> None:
        self._state.copy_(value)  # in place: a row view's mixer writes land in its pool

    def rows(self, start: int, stop: int, shared: dict) -> "LayerCache":
        """Sequences [start, stop) of this cache, sharing its storage (see PatternKV.rows)."""
        view = copy.copy(self)
        view.stores = [(a, b, store.rows(start, stop)) for a, b, store in self.stores]
        view._state = None if self._state is None else self._state[start:stop]
        view.shared = shared
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy sequence ``src``'s slots and recurrent state into row ``dst``."""
        for _, _, store in self.stores:
            store.move_row(src, dst)
        if self._state is not None:
            self._state[dst] = self._state[src]

    @property
    def nbytes(self) -> int:
        state = self.state.nbytes if self.state is not None else 0
        return state + sum(store.nbytes for _, _, store in self.stores)

    def fill(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        """Prefill from rotated k~ and v~ [b, heads, s, d_h] of prompts of ``lengths`` tokens."""
        for a, b, store in self.stores:
            store.fill(keys[:, a:b], values[:, a:b], lengths)

    def attend_chunk(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """A continued prefill of [b, heads, s, d_h] rotated q, k~, v~ at positions starts[b] + i
        (``lengths[b]`` real tokens): attend the cache and the chunk, write the chunk."""
        return torch.cat([store.attend_chunk(query[:, a:b], keys[:, a:b], values[:, a:b], starts, lengths, scale)
                          for a, b, store in self.stores], dim=1)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, t: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Write this token's [b, heads, d_h] k~, v~ at positions t[b], then attend its q."""
        outputs = []
        for a, b, store in self.stores:
            store.append(key[:, a:b], value[:, a:b], t)
            if store.pattern not in self.shared:  # after the first layer's write, which all layers repeat
                self.shared[store.pattern] = store.slot_positions(t)
            outputs.append(store.attend(query[:, a:b], t, scale, self.shared[store.pattern]))
        return torch.cat(outputs, dim=1)


def cache_bytes(head_patterns, batch: int, head_dim: int, capacity: int, dtype: torch.dtype,
                recurrence: bool = True) -> int:
    """Bytes of one layer's decode cache, from the formula: slots x 2 (k, v) x d_h per head, plus state."""
    element = torch.empty((), dtype=dtype).element_size()
    slots = sum(p.cache_slots(capacity) for p in head_patterns)
    state = 2 * len(head_patterns) * head_dim * 4 if recurrence else 0
    return batch * (2 * slots * head_dim * element + state)
