"""Text generation: batched ragged prompts, greedy / temperature / top-p sampling, stop tokens.

One prefill over the right-padded batch, then one decode step per new token for all sequences
at once; each sequence keeps its own position, so a batch gives the same tokens as generating
each prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from megatron_ratplus.errors import UserError
from megatron_ratplus.inference.session import DecodeSession
from megatron_ratplus.model import set_attention_pattern


class GenerationError(UserError):
    """Bad generation input (empty or too long prompt, token outside the vocabulary, bad setting)."""


@dataclass
class SamplingConfig:
    """temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens whose
    probabilities add up to top_p (nucleus sampling)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: Sequence[int] = field(default_factory=tuple)
    seed: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails too
            raise GenerationError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None, top_k: int = 0) -> torch.Tensor:
    """Next token per row of [b, vocab] logits; ``top_k`` > 0 samples among the k likeliest only."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Shift the best logit to 0 before dividing: any temperature > 0 (even 1e-45) then gives
    # logits in [-inf, 0] with one 0 per row, never inf - inf = NaN. A temperature past float32's
    # range divides by inf: finite logits become 0 (uniform), masked ones must stay -inf, not NaN.
    scaled = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).masked_fill(logits == float("-inf"),
                                                                                       float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked higher
        drop = before >= top_p  # a top_p below float32's smallest number compares as 0 ...
        drop[..., 0] = False  # ... so keep the top token explicitly
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """New tokens per prompt (stop token excluded) and why each sequence ended ("stop" or "length")."""

    tokens: List[List[int]]
    finish_reasons: List[str]
    cache_bytes: int


def _check_prompts(prompts, vocab_size: int, max_length: int, max_new_tokens: int):
    if not prompts:
        raise GenerationError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > max_length:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; with {max_new_tokens} new tokens that "
                                  f"exceeds the model's maximum length of {max_length}")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})")


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], sampling: Optional[SamplingConfig] = None,
             pattern=None, max_length: Optional[int] = None) -> Generation:
    """Generate continuations of token-id ``prompts`` (ragged) with ``model``.

    ``pattern``: switch the model to this pattern or composition first (grammar:
    megatron_ratplus.patterns); ``max_length``: longest prompt + new tokens allowed (default:
    the model config's seq_length).
    """
    sampling = sampling or SamplingConfig()
    config = model.config
    if max_length is not None and not 1 <= max_length <= config.seq_length:
        raise GenerationError(f"max_length {max_length} is outside [1, {config.seq_length}] (the model was trained "
                              f"at length {config.seq_length}; positions beyond it were never seen)")
    _check_prompts(prompts, config.real_vocab_size or config.vocab_size, max_length or config.seq_length,
                   sampling.max_new_tokens)
    if pattern is not None:
        set_attention_pattern(model, pattern)
    was_training = model.training
    model.eval()
    lengths = torch.tensor([len(p) for p in prompts])
    batch = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        batch[i, :len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    stop = torch.tensor(sorted(set(int(t) for t in sampling.stop_tokens)), dtype=torch.long)

    capacity = int(lengths.max()) + sampling.max_new_tokens - 1  # the last new token is never fed
    outputs = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    try:
        with DecodeSession(model, len(prompts), capacity) as session:
            logits = session.prefill(batch, lengths, last_only=True)
            for step in range(sampling.max_new_tokens):
                tokens = sample(logits, sampling.temperature, sampling.top_p, generator).cpu()
                for i in torch.nonzero(~done).flatten().tolist():
                    if torch.isin(tokens[i], stop):
                        done[i], reasons[i] = True, "stop"
                    else:
                        outputs[i].append(int(tokens[i]))
                if bool(done.all()) or step == sampling.max_new_tokens - 1:
                    break
                logits = session.step(tokens)
            cache = session.nbytes
    finally:
        model.train(was_training)
    return Generation(outputs, reasons, cache)
