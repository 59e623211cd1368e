"""Continuous batching: one thread owns the model and, at every step, retires finished or
cancelled sequences, admits waiting ones into free pool rows, prefills them, and decodes every
pattern's live rows in one batched step each (patterns take turns, docs/DESIGN.md §5).

Admission is by worst-case cache size: a sequence only enters a pool row, and every row was
allocated at start for ``max_model_len`` positions, so load never allocates cache memory; what
does not fit waits in a bounded queue (``QueueFull`` beyond it).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Dict, List, Optional

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
        self._wake = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    # --- called from other threads -------------------------------------------------------------
    def submit(self, seqs: List[Sequence]) -> None:
        """Queue ``seqs`` (one request's prompts, all or none)."""
        with self._wake:
            if self.draining:
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
        return sum(len(pool.live) for pool in self.pools.values())

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running == 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ratplus-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cut off everything still waiting or running (finish reason "length") and end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and self.idle:
                    self._wake.wait()
                if self._stop:
                    break
            self.step()
        for seq in list(self.waiting) + [s for pool in self.pools.values() for s in pool.live]:
            seq.finish("length")
            seq.notify(seq)
        self.waiting.clear()

    @torch.no_grad()
    def step(self) -> None:
        """Retire, admit and prefill, then one decode step per pattern with live rows."""
        start = time.perf_counter()
        self._retire()
        for pool, seqs in self._admit().items():
            logits = pool.prefill(seqs)
            for i, seq in enumerate(seqs):
                self.stats.prompt_tokens += len(seq.prompt)
                if seq.params.echo and seq.params.logprobs is not None:
                    seq.prompt_logprobs = [None] + [
                        _logprob(logits[i, j], seq.prompt[j + 1], seq.params.logprobs)
                        for j in range(len(seq.prompt) - 1)]
            self._advance(seqs, logits[torch.arange(len(seqs)), [len(s.prompt) - 1 for s in seqs]])
        self._retire()
        for pool in self.pools.values():
            if pool.live:
                tokens = torch.tensor([seq.tokens[-1] for seq in pool.live])
                self._advance(list(pool.live), pool.step(tokens))
        self._retire()  # finished rows free now, not at the next step
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - start

    def _admit(self) -> Dict[PatternPool, List[Sequence]]:
        """Waiting sequences (first come, first served per pattern) that fit a free row, up to
        ``max_num_seqs`` running and ``max_prefill_tokens`` prompt tokens this step (at least one)."""
        admitted: Dict[PatternPool, List[Sequence]] = collections.defaultdict(list)
        room, budget = self.max_num_seqs - self.running, self.max_prefill_tokens
        with self._wake:
            kept = collections.deque()
            while self.waiting:
                seq = self.waiting.popleft()
                pool = self.pools[seq.pattern]
                if seq.cancelled:
                    seq.finish("length")
                    continue
                fits = room > 0 and pool.free > len(admitted[pool]) and (
                    len(seq.prompt) <= budget or budget == self.max_prefill_tokens)
                if fits:
                    admitted[pool].append(seq)
                    room, budget = room - 1, budget - len(seq.prompt)
                else:
                    kept.append(seq)
            self.waiting = kept
        return {pool: seqs for pool, seqs in admitted.items() if seqs}

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
            for seq in [s for s in pool.live if s.finished or s.cancelled]:
                pool.release(seq)
                self.stats.finished[seq.finish_reason or "cancelled"] += 1


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(top)
    return TokenLogprob(token, float(logp[token]), list(zip(ids.tolist(), values.tolist())))
