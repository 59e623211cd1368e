"""Scoring token sequences: continuation log-likelihoods and greedy decoding until stop strings.

The two primitives every benchmark reduces to (lm-evaluation-harness's ``loglikelihood`` and
``generate_until``, the RULER- and LongBench-style suites). Requests are sorted longest first
and batched with right padding: causal attention and the causal recurrence keep padding out of
every real token's result, and neighbours in the sorted order waste little padding. Decoding
runs through the sparse decode cache (megatron_ratplus.inference.DecodeSession), so a sparse
pattern generates with its small cache (docs/DESIGN.md §5).
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from megatron_ratplus.evaluation.errors import ContextLengthError
from megatron_ratplus.inference import DecodeSession


def longest_first(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Request indices in batches of ``batch_size``, longest first (little padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _right_padded(sequences: Sequence[Sequence[int]], device) -> torch.Tensor:
    batch = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    for i, seq in enumerate(sequences):
        batch[i, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return batch.to(device)


def _model_device(model):
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model, requests: Sequence[Tuple[Sequence[int], Sequence[int]]], max_length: int,
                          batch_size: int = 16, truncate: bool = False) -> List[Tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
    for each (context tokens, continuation tokens) pair, in the order given.

    An input (context + continuation minus its last token) longer than ``max_length`` raises
    ContextLengthError, or with ``truncate`` loses its oldest tokens (as lm-eval's HF model does).
    """
    inputs = []
    for i, (context, continuation) in enumerate(requests):
        if not continuation or not context:
            raise ValueError(f"request {i}: context and continuation must both hold tokens")
        sequence = list(context) + list(continuation)[:-1]
        if len(sequence) > max_length:
            if not truncate:
                raise ContextLengthError(f"request {i} has {len(sequence) + 1} tokens, more than the model's "
                                         f"maximum length of {max_length} (+1)")
            sequence = sequence[-max_length:]
        inputs.append(sequence)
    device = _model_device(model)
    results = [None] * len(requests)
    for batch in longest_first([len(s) for s in inputs], batch_size):
        tokens = _right_padded([inputs[i] for i in batch], device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        logits = model(tokens, positions, None, runtime_gather_output=True)  # whole vocabulary under TP
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(batch):
            target = torch.as_tensor(list(requests[i][1]), dtype=torch.long, device=device)
            end = len(inputs[i])
            scores = logprobs[row, end - len(target):end]
            results[i] = (float(scores.gather(-1, target[:, None]).sum()),
                          bool(torch.equal(scores.argmax(-1), target)))
    return results


def _cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def greedy_until(model, prompts: Sequence[Sequence[int]], decode: Callable[[List[int]], str],
                 max_new_tokens: int, max_length: int, stop_strings: Sequence[Sequence[str]] = (),
                 stop_tokens: Sequence[int] = (), batch_size: int = 8, min_new_tokens: int = 0) -> List[str]:
    """Greedy continuations of token-id ``prompts``, as text cut before the first stop string.

    ``stop_strings[i]`` are prompt i's stop strings (none if missing). Each sequence stops at
    a stop token, at a stop string (checked on the decoded text after every token, since a stop
    string may span tokens) or after ``max_new_tokens``; a batch ends when all its sequences have.
    The stop tokens cannot be chosen for the first ``min_new_tokens`` tokens (HF generate's
    ``min_length``). This loop, not ``inference.generate``, because generate stops only on
    single tokens.
    """
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > max_length:
            raise ContextLengthError(f"prompt {i} has {len(prompt)} tokens; with {max_new_tokens} new tokens that "
                                     f"exceeds the model's maximum length of {max_length}")
    stops = [list(stop_strings[i]) if i < len(stop_strings) else [] for i in range(len(prompts))]
    stop_ids = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long)
    device = _model_device(model)
    texts = [""] * len(prompts)
    for batch in longest_first([len(p) for p in prompts], batch_size):
        lengths = torch.tensor([len(prompts[i]) for i in batch], device=device)
        tokens = _right_padded([prompts[i] for i in batch], device)
        outputs = [[] for _ in batch]
        active = list(range(len(batch)))
        with DecodeSession(model, len(batch), int(lengths.max()) + max_new_tokens - 1) as session:
            logits = session.prefill(tokens, lengths, last_only=True)
            for step in range(max_new_tokens):
                if step < min_new_tokens and len(stop_ids):
                    logits = logits.index_fill(-1, stop_ids.to(device), float("-inf"))
                chosen = logits.argmax(dim=-1).cpu()
                for row in list(active):
                    i = batch[row]
                    if bool(torch.isin(chosen[row], stop_ids)):
                        active.remove(row)
                        continue
                    outputs[row].append(int(chosen[row]))
                    texts[i], stopped = _cut_at_stop(decode(outputs[row]), stops[i])
                    if stopped:
                        active.remove(row)
                if not active or step == max_new_tokens - 1:
                    break
                logits = session.step(chosen)
    return texts
