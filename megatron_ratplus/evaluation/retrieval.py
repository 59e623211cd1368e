"""Synthetic long-range retrieval, generated offline: passkey and multi-key needle-in-a-haystack.

Each sample is a haystack of filler text of an exact token length with one or more needles at
random depths, ending in a question whose answer (digits) only a needle holds. A sample counts as
solved when greedy decoding would produce the whole answer; under teacher forcing that is "every
answer token is the argmax given the correct prefix", so one forward pass per sample suffices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from megatron_ratplus.data.tokenizer import ByteTokenizer
from megatron_ratplus.model import evaluating

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_NAMES = ("apple", "river", "falcon", "copper", "meadow", "violet", "harbor", "cinder", "quartz", "willow")
TASKS = ("passkey", "multikey")
BYTE_ENCODE = ByteTokenizer().encode  # the project's default tokenizer (id = byte value)


@dataclass
class RetrievalSample:
    task: str
    context: List[int]  # exactly context_length tokens, ending with the question
    answer: List[int]


def _haystack(needles: Sequence[List[int]], question: List[int], length: int, rng: random.Random,
              encode: Callable) -> List[int]:
    filler = encode(FILLER)
    room = length - len(question) - sum(len(n) for n in needles)
    if room < len(needles):
        raise ValueError(f"context length {length} is too short for the needles and the question")
    hay = (filler * (room // len(filler) + 1))[:room]
    cuts = sorted(rng.randrange(0, room + 1) for _ in needles)
    out, prev = [], 0
    for cut, needle in zip(cuts, needles):
        out += hay[prev:cut] + needle
        prev = cut
    return out + hay[prev:] + question


def passkey_sample(length: int, rng: random.Random, encode: Callable = BYTE_ENCODE) -> RetrievalSample:
    key = str(rng.randrange(10000, 100000))
    needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = encode("What is the pass key? The pass key is ")
    return RetrievalSample("passkey", _haystack([needle], question, length, rng, encode), encode(key))


def multikey_sample(length: int, rng: random.Random, keys: int = 4, encode: Callable = BYTE_ENCODE
                    ) -> RetrievalSample:
    names = rng.sample(KEY_NAMES, keys)
    values = [str(rng.randrange(10000, 100000)) for _ in names]
    needles = [encode(f"The magic number for {n} is {v}. ") for n, v in zip(names, values)]
    target = rng.randrange(keys)
    question = encode(f"What is the magic number for {names[target]}? The magic number for {names[target]} is ")
    return RetrievalSample("multikey", _haystack(needles, question, length, rng, encode), encode(values[target]))


def make_samples(task: str, length: int, count: int, seed: int = 0, encode: Callable = BYTE_ENCODE):
    """``count`` samples of one task at one context length, reproducible from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task '{task}' (choose from {', '.join(TASKS)})")
    rng = random.Random(f"{task}-{length}-{seed}")
    make = passkey_sample if task == "passkey" else multikey_sample
    return [make(length, rng, encode=encode) for _ in range(count)]


@torch.no_grad()
def retrieval_accuracy(model, samples: Sequence[RetrievalSample], pattern=None, batch_size: int = 4) -> float:
    """Fraction of samples whose whole answer greedy decoding reproduces."""
    solved = 0
    with evaluating(model, pattern):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            width = max(len(s.context) + len(s.answer) - 1 for s in chunk)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):  # right padding: causal, so it never reaches the answer
                seq = s.context + s.answer[:-1]
                tokens[i, :len(seq)] = torch.tensor(seq)
            logits = model(tokens, torch.arange(width).expand_as(tokens), None)
            for i, s in enumerate(chunk):
                first = len(s.context) - 1
                predicted = logits[i, first:first + len(s.answer)].argmax(-1)
                solved += bool(torch.equal(predicted, torch.tensor(s.answer)))
    return solved / len(samples)


def retrieval_table(model, patterns: Sequence, lengths: Sequence[int] = (256, 512, 1024),
                    tasks: Sequence[str] = TASKS, samples: int = 8, seed: int = 0,
                    encode: Optional[Callable] = None, batch_size: int = 4):
    """Rows {pattern, task, context_length, accuracy} for every pattern, task and length."""
    rows = []
    for task in tasks:
        for length in lengths:
            data = make_samples(task, length, samples, seed, encode or BYTE_ENCODE)
            for pattern in patterns:
                rows.append(dict(pattern=str(pattern), task=task, context_length=length,
                                 accuracy=retrieval_accuracy(model, data, pattern, batch_size)))
    return rows
