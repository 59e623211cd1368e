"""Continuous batching: one thread owns the model and, at every step, retires finished or
cancelled sequences, admits waiting ones into free pool rows, prefills them, and decodes every
pattern's live rows in one batched step each (patterns take turns, docs/DESIGN.md §5).

Chunked prefill: a step prefills at most ``max_prefill_tokens`` prompt tokens. A prompt longer
than what is left of that budget is prefilled in chunks, one per step, in its pool's top row
(one such prompt per pool at a time), while the other sequences keep decoding between its chunks.

Admission is by worst-case cache size: a sequence only enters a pool row, and every row was
allocated at start for ``max_model_len`` positions, so load never allocates cache memory; what
does not fit waits in a bounded queue (``QueueFull`` beyond it).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from megatron_ratplus.inference.generate import sample
from megatron_ratplus.serving.pool import PatternPool
from megatron_ratplus.serving.sequence import Sequence, TokenLogprob


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the client should retry later."""


class Draining(RuntimeError):
    """The server is shutting down and admits no new requests."""


class Stats:
    """Counters for /metrics (read from the HTTP thread, written by the engine thread)."""

    def __init__(self):
        self.prompt_tokens = self.generation_tokens = self.steps = 0
        self.step_seconds = 0.0
        self.finished = collections.Counter()


class Engine:
    """Serves ``model`` from one ``PatternPool`` per offered pattern."""

    def __init__(self, pools: Dict[str, PatternPool], max_num_seqs: int, max_waiting: int,
                 max_prefill_tokens: int):
        self.pools = pools
        self.max_num_seqs, self.max_waiting, self.max_prefill_tokens = max_num_seqs, max_waiting, max_prefill_tokens
        self.waiting: collections.deque = collections.deque()
        self.stats = Stats()
        self.draining = False
        self.failure: Optional[BaseException] = None  # what ended the engine thread, if not stop()
        self.on_failure: Callable[[], None] = lambda: None  # the server stops (cli/serve.py)
        self._wake = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    # --- called from other threads -------------------------------------------------------------
    def submit(self, seqs: List[Sequence]) -> None:
        """Queue ``seqs`` (one request's prompts, all or none)."""
        with self._wake:
            if self.draining or self.failure is not None:
                raise Draining("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_waiting})")
            self.waiting.extend(seqs)
            self._wake.notify()

    def cancel(self, seqs: List[Sequence]) -> None:
        """Drop ``seqs`` (a client went away); their rows are freed at the next step."""
        for seq in seqs:
            seq.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def running(self) -> int:
        """Sequences holding a cache row: decoding, or being prefilled in chunks."""
        return sum(pool.used for pool in self.pools.values())

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running == 0

    def start(self) -> None:
        """Run the engine in a thread of its own (ratplus-serve runs it on its main thread instead)."""
        self._thread = threading.Thread(target=self.run, name="ratplus-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cut off everything still waiting or running (finish reason "length") and end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ---------------------------------------------------------------------
    def run(self) -> None:
        """Step until stopped. A step that raises is a bug, but left alone it would leave every
        request waiting forever behind a healthy /health: the engine ends every sequence (finish
        reason "error"), admits nothing more and tells the server, which exits and re-raises it."""
        reason = "length"
        while True:
            with self._wake:
                while not self._stop and self.idle:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self.step()
            except BaseException as err:  # noqa: BLE001  (re-raised by the server's main thread)
                self.failure, reason = err, "error"
                break
        filling = [pool.filling for pool in self.pools.values() if pool.filling is not None]
        for seq in list(self.waiting) + filling + [s for pool in self.pools.values() for s in pool.live]:
            seq.finish(reason)
            seq.notify(seq)
        self.waiting.clear()
        for pool in self.pools.values():
            pool.filling = None
        if self.failure is not None:
            self.on_failure()

    @torch.no_grad()
    def step(self) -> None:
        """Retire; the next chunk of each prompt being prefilled in chunks; admit and prefill; then
        one decode step per pattern with live rows."""
        start = time.perf_counter()
        self._retire()
        budget = self.max_prefill_tokens
        for pool in self.pools.values():  # prompts already being prefilled in chunks go first
            if pool.filling is not None and budget > 0:
                budget -= self._prefill_chunk(pool, budget)
        admitted, chunked = self._admit(budget)
        for pool, seqs in admitted.items():
            every_position = any(map(_wants_prompt_logprobs, seqs))
            logits = pool.prefill(seqs, every_position)
            self.stats.prompt_tokens += sum(len(seq.prompt) for seq in seqs)
            if every_position:
                for i, seq in enumerate(seqs):
                    _prompt_logprobs(seq, logits[i], 0)
                logits = logits[torch.arange(len(seqs)), [len(s.prompt) - 1 for s in seqs]]
            self._advance(seqs, logits)
        for pool, (seq, first) in chunked.items():
            pool.filling, pool.filled = seq, 0
            self._prefill_chunk(pool, first)
        self._retire()
        for pool in self.pools.values():
            if pool.live:
                tokens = torch.tensor([seq.tokens[-1] for seq in pool.live])
                self._advance(list(pool.live), pool.step(tokens))
        self._retire()  # finished rows free now, not at the next step
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - start

    def _prefill_chunk(self, pool: PatternPool, budget: int) -> int:
        """Prefill the next chunk (at most ``budget`` tokens) of ``pool``'s prompt being prefilled
        in chunks; after its last chunk it joins the live rows with its first token. -> tokens."""
        seq, start = pool.filling, pool.filled
        tokens = seq.prompt[start:start + budget]
        every_position = _wants_prompt_logprobs(seq)
        logits = pool.chunk(tokens, start, every_position)
        pool.filled += len(tokens)
        self.stats.prompt_tokens += len(tokens)
        if every_position:
            _prompt_logprobs(seq, logits, start)
        if pool.filled == len(seq.prompt):
            pool.filling = None
            pool.promote(seq)
            self._advance([seq], logits[-1:])
        return len(tokens)

    def _admit(self, budget: int):
        """Waiting sequences (first come, first served per pattern) that fit a free row, up to
        ``max_num_seqs`` running and ``budget`` prompt tokens this step. A prompt longer than
        what is left of the budget starts a chunked prefill in its pool if none is under way
        there (its first chunk takes the rest of the budget). -> ({pool: whole prompts},
        {pool: (sequence, first chunk's tokens)})."""
        admitted: Dict[PatternPool, List[Sequence]] = collections.defaultdict(list)
        chunked: Dict[PatternPool, tuple] = {}
        room = self.max_num_seqs - self.running
        with self._wake:
            kept = collections.deque()
            while self.waiting:
                seq = self.waiting.popleft()
                pool = self.pools[seq.pattern]
                if seq.cancelled:
                    seq.finish("length")
                    continue
                row = room > 0 and pool.free > len(admitted[pool]) + (pool in chunked)
                if row and len(seq.prompt) <= budget:
                    admitted[pool].append(seq)
                    room, budget = room - 1, budget - len(seq.prompt)
                elif row and budget > 0 and pool.filling is None and pool not in chunked:
                    chunked[pool] = (seq, budget)
                    room, budget = room - 1, 0
                else:
                    kept.append(seq)
            self.waiting = kept
        return {pool: seqs for pool, seqs in admitted.items() if seqs}, chunked

    def _advance(self, seqs: List[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its logits row and tell its client."""
        greedy = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                token = greedy[i]
            else:
                # on the CPU, where each sequence's own generator lives
                token = int(sample(logits[i:i + 1].float().cpu(), p.temperature, p.top_p, seq.generator, p.top_k)[0])
            seq.add(token, None if p.logprobs is None else _logprob(logits[i], token, p.logprobs))
            self.stats.generation_tokens += 1
            seq.notify(seq)

    def _retire(self) -> None:
        for pool in self.pools.values():
            seq = pool.filling
            if seq is not None and seq.cancelled:  # its top row is simply free again
                pool.filling = None
                self.stats.finished[seq.finish_reason or "cancelled"] += 1
            for seq in [s for s in pool.live if s.finished or s.cancelled]:
                pool.release(seq)
                self.stats.finished[seq.finish_reason or "cancelled"] += 1


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    """An echoed prompt with logprobs needs every prompt position's logits (else only the last)."""
    return seq.params.echo and seq.params.logprobs is not None


def _prompt_logprobs(seq: Sequence, logits: torch.Tensor, start: int) -> None:
    """Echoed prompts with logprobs: each prompt token's logprob from the chunk's logits
    [n, vocab] at positions start .. start + n - 1 (the first token has none)."""
    if start == 0:
        seq.prompt_logprobs = [None]
    for j in range(logits.shape[0]):
        if start + j + 1 < len(seq.prompt):
            seq.prompt_logprobs.append(_logprob(logits[j], seq.prompt[start + j + 1], seq.params.logprobs))


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(top)
    return TokenLogprob(token, float(logp[token]), list(zip(ids.tolist(), values.tolist())))
