"""RULER-style synthetic long-context tasks, generated offline at any length up to the model's.

Five tasks after RULER (Hsieh et al., 2024), each a prompt whose answer only the context holds:

- ``niah_single``: one "special magic number" needle in a haystack of filler sentences;
- ``niah_multikey``: four needles under different keys, one asked for;
- ``niah_multivalue``: four numbers under one key, all asked for;
- ``variable_tracking``: a value passed along a chain of ``VAR X = VAR Y`` assignments
  scattered in the haystack; every variable of the chain asked for;
- ``common_words``: a numbered list of words, a few repeated; the repeated ones asked for.

As in RULER a length counts the prompt plus the answer budget (the tokens generation may use),
and a sample scores RULER's ``string_match_all``: the share of its references that the greedy
continuation (through the sparse decode cache) contains.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_ratplus.data.tokenizer import ByteTokenizer
from megatron_ratplus.evaluation.errors import ContextLengthError, UnknownTaskError
from megatron_ratplus.evaluation.metrics import string_match_all
from megatron_ratplus.evaluation.scoring import greedy_until
from megatron_ratplus.model import evaluating

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_NAMES = ("apple", "river", "falcon", "copper", "meadow", "violet", "harbor", "cinder", "quartz", "willow")
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
# pronounceable made-up words for common_words: no word list to download, none in the filler
WORDS = tuple("".join(s) for s in itertools.product(
    ("ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "zo"), repeat=3))


@dataclass
class RetrievalSample:
    task: str
    context: List[int]     # the prompt; with answer_tokens it makes the sample's length
    references: List[str]  # what the continuation must contain
    answer_tokens: int     # generation budget


def _haystack(needles: Sequence[List[int]], question: List[int], room: int, rng: random.Random,
              encode) -> List[int]:
    """Filler sentences, exactly ``room`` tokens with the question, holding the needles (in their
    order) at random sentence boundaries."""
    space = room - len(question) - sum(len(n) for n in needles)
    if space < 1:
        raise ContextLengthError(f"a prompt of {room} tokens is too short for this task's needles and question")
    sentences = [encode(s.strip(". ") + ". ") for s in FILLER.split(". ")]
    hay, boundaries = [], [0]
    while len(hay) < space:
        hay += sentences[len(boundaries) % len(sentences)]
        boundaries.append(len(hay))
    hay = hay[:space]
    cuts = sorted(rng.choice([b for b in boundaries if b <= space]) for _ in needles)
    out, prev = [], 0
    for cut, needle in zip(cuts, needles):
        out += hay[prev:cut] + needle
        prev = cut
    return out + hay[prev:] + question


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1000000, 10000000))


def _niah(task: str, rng: random.Random):
    keys = rng.sample(KEY_NAMES, 4 if task == "niah_multikey" else 1)
    values = [[_number(rng) for _ in range(4 if task == "niah_multivalue" else 1)] for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}. " for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.randrange(len(keys))
    question = (f"\nWhat are all the special magic numbers for {keys[asked]} mentioned in the provided text? "
                f"The special magic numbers for {keys[asked]} mentioned in the provided text are:")
    return needles, question, values[asked]


def _variable_tracking(rng: random.Random, hops: int = 4):
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randrange(10000, 100000))
    needles = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    question = f"\nQuestion: Which variables are assigned the value {value}? Answer: They are:"
    return needles, question, names


def _common_words(rng: random.Random, room: int, encode, common: int = 5, repeats: int = 3):
    """The numbered word list grows by once-used words until the next would overflow ``room``."""
    drawn = rng.sample(WORDS, len(WORDS))
    frequent, rare = drawn[:common], iter(drawn[common:])
    head = encode("Below is a numbered list of words. Some appear more often than others.\n")
    question = encode(f"\nQuestion: What are the {common} most common words in the above list? "
                      f"Answer: The top {common} words that appear most often in the list are:")
    words = frequent * repeats
    rng.shuffle(words)

    def numbered(items):
        return encode(" ".join(f"{i + 1}. {w}" for i, w in enumerate(items)))

    if len(head) + len(numbered(words)) + len(question) > room:
        raise ContextLengthError(f"a prompt of {room} tokens is too short for common_words "
                                 f"({common} words x {repeats})")
    while True:
        grown = list(words)
        grown.insert(rng.randrange(len(grown) + 1), next(rare))
        if len(head) + len(numbered(grown)) + len(question) > room:
            return head + numbered(words) + question, list(frequent)
        words = grown


def answer_budget(task: str, encode) -> int:
    """Tokens generation may use: the references of a worst-case sample, joined, plus slack."""
    longest = {"niah_single": ["9999999"], "niah_multikey": ["9999999"], "niah_multivalue": ["9999999"] * 4,
               "variable_tracking": ["WWWWW"] * 5, "common_words": [max(WORDS, key=len)] * 5}[task]
    return len(encode(" " + ", ".join(longest))) + 8


def make_samples(task: str, length: int, count: int, seed: int = 0, tokenizer=None) -> List[RetrievalSample]:
    """``count`` samples of one task whose prompt plus answer budget is ``length`` tokens,
    reproducible from ``seed``."""
    if task not in TASKS:
        raise UnknownTaskError(f"unknown RULER-style task '{task}' (choose from {', '.join(TASKS)})")
    encode = (tokenizer or ByteTokenizer()).encode
    budget = answer_budget(task, encode)
    room = length - budget
    rng = random.Random(f"{task}-{length}-{seed}")
    samples = []
    try:
        for _ in range(count):
            if task == "common_words":
                context, references = _common_words(rng, room, encode)
            else:
                needles, question, references = (_variable_tracking(rng) if task == "variable_tracking"
                                                 else _niah(task, rng))
                context = _haystack([encode(n) for n in needles], encode(question), room, rng, encode)
            samples.append(RetrievalSample(task, context, list(references), budget))
    except ContextLengthError as err:
        raise ContextLengthError(f"context length {length} is too short for {task}: {err}") from None
    return samples


def retrieval_accuracy(model, tokenizer, samples: Sequence[RetrievalSample], pattern=None, batch_size: int = 4,
                       max_length: Optional[int] = None) -> float:
    """Mean string_match_all of the greedy continuations (generated with the sparse decode cache)."""
    tokenizer = tokenizer or ByteTokenizer()
    with evaluating(model, pattern):
        outputs = greedy_until(model, [s.context for s in samples], tokenizer.decode,
                               max(s.answer_tokens for s in samples), max_length or model.config.seq_length,
                               stop_tokens=[tokenizer.eod], batch_size=batch_size)
    return sum(string_match_all(o, s.references) for o, s in zip(outputs, samples)) / len(samples)


def retrieval_table(model, patterns: Sequence, lengths: Sequence[int] = (256, 512, 1024),
                    tasks: Sequence[str] = TASKS, samples: int = 8, seed: int = 0, tokenizer=None,
                    batch_size: int = 4, max_length: Optional[int] = None):
    """Rows {pattern, task, context_length, accuracy} for every pattern, task and length."""
    limit = max_length or model.config.seq_length
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ContextLengthError(f"context length {too_long[0]} exceeds the model's maximum length of {limit}")
    rows = []
    for task in tasks:
        for length in lengths:
            data = make_samples(task, length, samples, seed, tokenizer)
            for pattern in patterns:
                rows.append(dict(pattern=str(pattern), task=task, context_length=length,
                                 accuracy=retrieval_accuracy(model, tokenizer, data, pattern, batch_size, limit)))
    return rows
