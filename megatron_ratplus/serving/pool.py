"""The decode-cache pool of one attention pattern: rows allocated once, lent to sequences.

A row holds one sequence's sparse decode cache for ``max_model_len`` positions (docs/DESIGN.md
§5: P + W + 1 + T/D slots per layer and head plus the recurrent state), so a sequence admitted
into a free row can never outgrow its memory. Live sequences occupy rows 0..n-1: a decode step
runs one batched forward over exactly those rows (a ``DecodeSession.rows`` view), and a
finishing sequence's row is refilled by moving the last live row into it. A prompt prefilled
in chunks (chunked prefill, at most one per pool at a time) fills the pool's top row across
engine steps, outside the decoding rows, and moves to the next live row once its last chunk is
in. Under tensor parallelism ``announce`` hands each operation to the other ranks first
(serving/replica.py).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from megatron_ratplus.inference.session import DecodeSession, formula_bytes
from megatron_ratplus.model import set_attention_pattern
from megatron_ratplus.serving.sequence import Sequence


def row_bytes(model, pattern: str, max_model_len: int, dtype: torch.dtype) -> int:
    """Worst-case cache bytes of one sequence under ``pattern`` (the model is switched to it)."""
    set_attention_pattern(model, pattern)
    return formula_bytes(model, 1, max_model_len, dtype)


class PatternPool:
    """``rows`` preallocated decode rows of ``model`` under ``pattern``."""

    def __init__(self, model, pattern: str, rows: int, max_model_len: int, dtype: torch.dtype,
                 announce: Optional[Callable[[tuple], None]] = None):
        self.model, self.pattern, self.rows, self.announce = model, pattern, rows, announce
        self.row_bytes = row_bytes(model, pattern, max_model_len, dtype)
        self.session = DecodeSession(model, rows, max_model_len, dtype)
        self.live: List[Sequence] = []  # row i holds live[i]
        self.filling: Optional[Sequence] = None  # a prompt being prefilled in chunks, in the top row
        self.filled = 0  # its prompt tokens prefilled so far

    @property
    def used(self) -> int:
        """Rows holding a sequence: the live ones and the one being prefilled in chunks."""
        return len(self.live) + (self.filling is not None)

    @property
    def free(self) -> int:
        return self.rows - self.used

    @property
    def nbytes(self) -> int:
        return self.session.nbytes

    def activate(self) -> None:
        """Point the model's mixers at this pool's pattern before a forward."""
        set_attention_pattern(self.model, self.pattern)

    def prefill(self, seqs: List[Sequence], every_position: bool = False) -> torch.Tensor:
        """Admit ``seqs`` into the next free rows and run their prompts -> each prompt's last
        logits [k, vocab], or with ``every_position`` all of them [k, s, vocab]."""
        if len(seqs) > self.free:
            raise RuntimeError(f"pool '{self.pattern}' has {self.free} free rows, {len(seqs)} asked")
        if self.announce:
            self.announce(("prefill", self.pattern, ([seq.prompt for seq in seqs], every_position)))
        start = len(self.live)
        lengths = torch.tensor([len(seq.prompt) for seq in seqs])
        tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, seq in enumerate(seqs):
            tokens[i, :len(seq.prompt)] = torch.tensor(seq.prompt)
        self.activate()
        logits = self.session.rows(start, start + len(seqs)).prefill(tokens, lengths, last_only=not every_position)
        self.live.extend(seqs)
        return logits

    def chunk(self, tokens: List[int], start: int, every_position: bool = False) -> torch.Tensor:
        """Prefill ``tokens`` at positions start, start + 1, ... of the top row (positions before
        ``start`` are its earlier chunks) -> the last token's logits [1, vocab], or with
        ``every_position`` all of them [len(tokens), vocab]."""
        if self.announce:
            self.announce(("chunk", self.pattern, (tokens, start, every_position)))
        self.activate()
        row = self.session.rows(self.rows - 1, self.rows)
        starts = torch.tensor([start]) if start else None
        logits = row.prefill(torch.tensor([tokens]), torch.tensor([len(tokens)]), starts, last_only=not every_position)
        return logits[0] if every_position else logits

    def promote(self, seq: Sequence) -> None:
        """The top row's prompt is all in: it becomes the next live row (decoded from now on)."""
        if self.announce:
            self.announce(("promote", self.pattern, None))
        if len(self.live) != self.rows - 1:
            self.session.move_row(self.rows - 1, len(self.live))
        self.live.append(seq)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of every live row, fed ``tokens`` [n] -> logits [n, vocab]."""
        if self.announce:
            self.announce(("step", self.pattern, tokens.tolist()))
        self.activate()
        return self.session.rows(0, len(self.live)).step(tokens)

    def release(self, seq: Sequence) -> None:
        """Free ``seq``'s row now; the last live row moves into it."""
        self.release_row(self.live.index(seq))

    def release_row(self, row: int) -> None:
        if self.announce:
            self.announce(("release", self.pattern, row))
        last = len(self.live) - 1
        if row != last:
            self.session.move_row(last, row)
            self.live[row] = self.live[last]
        self.live.pop()
