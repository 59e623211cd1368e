"""One request's sequence: its sampling settings, its tokens so far, and the text it may show.

Text is decoded from all generated tokens (a byte tokenizer's multi-byte characters only make
sense whole), stop strings are searched in it, and a stream only shows text that can no longer
turn into a stop string or an incomplete character, so streamed deltas add up to the final text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence as Seq

import torch

_ids = itertools.count()


@dataclass
class SamplingParams:
    """What a completion request asks for (the OpenAI fields the engine acts on)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Seq[str] = ()
    logprobs: Optional[int] = None
    echo: bool = False


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the ``logprobs`` likeliest alternatives."""

    token: int
    logprob: float
    top: List[tuple]  # (token, logprob), likeliest first


class Sequence:
    """A prompt being served under one pattern; ``notify(self)`` runs on the engine's thread
    after every change (new text, finish)."""

    def __init__(self, prompt: List[int], params: SamplingParams, pattern: str, tokenizer,
                 stop_tokens: Seq[int], notify: Callable[["Sequence"], None] = lambda seq: None):
        self.id = next(_ids)
        self.prompt, self.params, self.pattern, self.tokenizer = list(prompt), params, pattern, tokenizer
        self.stop_tokens = set(stop_tokens)
        self.notify = notify
        seed = params.seed if params.seed is not None else torch.seed()
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: List[int] = []
        self.logprobs: List[TokenLogprob] = []
        self.prompt_logprobs: List[Optional[TokenLogprob]] = []
        self.text = ""
        self.shown = 0  # characters of ``text`` a stream has been given
        self.finish_reason: Optional[str] = None
        self.cancelled = False
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: Optional[TokenLogprob] = None) -> None:
        """Take the next sampled token: end on a stop token, a stop string or ``max_tokens``."""
        if token in self.stop_tokens:
            self.finish("stop")
            return
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        text = self.tokenizer.decode(self.tokens)
        hits = [i for i in (text.find(s, max(0, len(self.text) - self._hold)) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            self.finish("stop")
            return
        self.text = text
        if len(self.tokens) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def take_delta(self) -> str:
        """Text not yet streamed that is final: all of it once finished, else short of what could
        still become a stop string or is an incomplete character."""
        end = len(self.text)
        if not self.finished:
            end -= self._hold
            while end > self.shown and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.shown:
            return ""
        delta, self.shown = self.text[self.shown:end], end
        return delta
