"""RULER's 13 synthetic tasks (Hsieh et al., 2024), generated offline as RULER generates them
and scored as RULER scores them.

The task definitions are RULER's data: the templates and answer prefixes of its
``scripts/data/synthetic/constants.py`` (the prompt is template + answer prefix, RULER's
``base`` model template), the generation budgets there, and the 13 tasks of
``scripts/synthetic.yaml`` (haystack, key and value kinds, needle counts, vt's chains and hops,
cwe's repetitions, fwe's alpha, the qa datasets). Each sample is sized as RULER sizes it: the
haystack (noise sentences, essay words, distractor needles, variable-tracking noise, listed
words, coded words, documents) grows by RULER's step until the prompt with its answers and
the budget would pass the length, in the model's own tokens; each sample then shrinks by a
step until prompt + budget <= length. Scoring: RULER's post-processing (strip, control
characters to newlines) and ``string_match_all`` (``string_match_part`` for qa).

Where this differs from RULER (none of it changes what a task asks or how it scores): the
random streams are Python's ``random`` seeded with RULER's seed, not RULER's exact sequence of
``random``/``numpy`` calls; essay sentences are split after ``.``/``!``/``?`` rather than by
NLTK's punkt model; adjective-noun keys are drawn as an adjective and a noun; below 4096
tokens (lengths RULER does not publish) the essay grows by 50 words, qa by one document, and
vt's one-shot example is the smallest one when RULER's 500 tokens cannot hold it (byte-level
tokenizers); a qa prompt always holds all of its question's own paragraphs.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_ratplus.data.tokenizer import ByteTokenizer
from megatron_ratplus.evaluation.errors import ContextLengthError, DatasetMissingError, UnknownTaskError
from megatron_ratplus.evaluation.metrics import score
from megatron_ratplus.evaluation.ruler_sources import RulerSources, wonderwords_list
from megatron_ratplus.evaluation.scoring import greedy_until
from megatron_ratplus.model import evaluating

# RULER's scripts/data/synthetic/constants.py: (template, answer prefix, tokens to generate)
TEMPLATES: Dict[str, Tuple[str, str, int]] = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "variable_tracking": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                          "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
                          "above.",
                          " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                          "variables are assgined the value {query}, they are: ", 30),
    "common_words_extraction": ("Below is a numbered list of words. In these words, some appear more often than "
                                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                                "the 10 most common words in the above list?",
                                " Answer: The top 10 words that appear most often in the list are:", 120),
    "freq_words_extraction": ("Read the following coded text and track the frequency of each coded word. Find the "
                              "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                              "explanation. Please ignore the dots '....'. What are the three most frequently "
                              "appeared words in the above coded text?",
                              " Answer: According to the coded text above, the three most frequently appeared "
                              "words are:", 50),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
           "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:", 32),
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DOCUMENT = "Document {i}:\n{document}"
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's 40 needle depths, in percent
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_SEED = 42  # RULER's --random_seed
SHORT = 4096       # below this length RULER (and we) take smaller haystack steps
ICL_LENGTH = 500   # tokens of vt's one-shot example
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class RulerTask:
    """One entry of RULER's synthetic.yaml."""
    name: str
    kind: str                   # a TEMPLATES key
    haystack: str = "noise"     # niah: noise | essay | needle (the distractor needles of multikey_2/3)
    key_type: str = "words"     # niah: words | numbers | uuids
    value_type: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    num_chains: int = 1         # vt
    num_hops: int = 4
    freq_cw: int = 30           # cwe: repetitions of the common and the uncommon words, common words
    freq_ucw: int = 3
    num_cw: int = 10
    alpha: float = 2.0          # fwe: zeta distribution of the coded words
    dataset: str = ""           # qa: squad | hotpotqa

    @property
    def metric(self) -> str:
        return "string_match_part" if self.kind == "qa" else "string_match_all"

    @property
    def budget(self) -> int:
        return TEMPLATES[self.kind][2]

    @property
    def needs(self) -> Optional[str]:
        """The user file the task reads (a RulerSources field), if any."""
        return "essay" if self.haystack == "essay" else (self.dataset or None)


TASKS: Dict[str, RulerTask] = {t.name: t for t in (
    RulerTask("niah_single_1", "niah", "noise"),
    RulerTask("niah_single_2", "niah", "essay"),
    RulerTask("niah_single_3", "niah", "essay", value_type="uuids"),
    RulerTask("niah_multikey_1", "niah", "essay", num_k=4),
    RulerTask("niah_multikey_2", "niah", "needle"),
    RulerTask("niah_multikey_3", "niah", "needle", key_type="uuids", value_type="uuids"),
    RulerTask("niah_multivalue", "niah", "essay", num_v=4),
    RulerTask("niah_multiquery", "niah", "essay", num_q=4),
    RulerTask("vt", "variable_tracking"),
    RulerTask("cwe", "common_words_extraction"),
    RulerTask("fwe", "freq_words_extraction"),
    RulerTask("qa_1", "qa", haystack="documents", dataset="squad"),
    RulerTask("qa_2", "qa", haystack="documents", dataset="hotpotqa"),
)}


@dataclass
class RulerSample:
    task: str
    input: str              # RULER's "input": the prompt before the answer prefix
    answer_prefix: str      # what the prompt ends with; the model continues it
    tokens: List[int]       # input + answer_prefix, tokenized
    references: List[str]   # RULER's "outputs"
    budget: int             # tokens generation may use; len(tokens) + budget <= the length


def task_spec(name: str) -> RulerTask:
    if name not in TASKS:
        raise UnknownTaskError(f"unknown RULER task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name]


def postprocess(prediction: str) -> str:
    """RULER's post-processing of a prediction: stripped, control characters made newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (Euler-Maclaurin after 64 terms; error below 1e-12)."""
    n = 64
    head = sum(k ** -alpha for k in range(1, n))
    return (head + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12
            - alpha * (alpha + 1) * (alpha + 2) * n ** (-alpha - 3) / 720)


class _Generation:
    """What one (task, length) generation shares: RULER seeds one random stream per task and
    length, and re-seeds a fresh one wherever RULER shuffles with ``random.Random(seed)``."""

    def __init__(self, task: RulerTask, length: int, seed: int, encode, sources: RulerSources):
        self.task, self.length, self.seed, self.encode, self.sources = task, length, seed, encode, sources
        self.rng = random.Random(seed)

    def fixed_shuffle(self, items: list) -> list:
        random.Random(self.seed).shuffle(items)
        return items

    def random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        adjectives, nouns = _sorted_words("adjectivelist.txt"), _sorted_words("nounlist.txt")
        return f"{self.rng.choice(adjectives)}-{self.rng.choice(nouns)}"

    def too_short(self, make, step: int) -> ContextLengthError:
        need = len(self.encode(make(step)[0])) + self.task.budget
        return ContextLengthError(f"a length of {self.length} tokens is too short for RULER's {self.task.name}: its "
                                  f"smallest prompt needs {need} tokens with its {self.task.budget}-token answer "
                                  f"budget")

    def fit(self, make, step: int, budget: int, length: int, cap: Optional[int] = None) -> int:
        """RULER's sizing: from one step, grow by ``step`` while prompt + answers + budget stays
        below ``length``; the last size that did not pass it."""
        n, total = step, 0
        while total + budget < length:
            text, answers = make(n)
            total = len(self.encode(text + " " + " ".join(answers)))
            if total + budget > length:
                return n - step
            n += step
            if cap is not None and n > cap:
                return cap
        return n

    def draw(self, make, n: int, step: int, budget: int, length: int):
        """One sample at size ``n``, a step smaller each time it does not fit (RULER's retry)."""
        while n >= step:
            text, answers = make(n)
            if len(self.encode(text)) + budget <= length:
                return text, answers
            n -= step
        raise self.too_short(make, step)


@lru_cache(maxsize=None)
def _sorted_words(name: str) -> Tuple[str, ...]:
    return tuple(sorted(set(wonderwords_list(name))))


def _sentences(text: str) -> List[str]:
    return _SENTENCE_END.split(text)


def _insert_at_depths(gen: _Generation, sentences: List[str], needles: List[str]) -> str:
    """RULER's essay insertion: needles at distinct random depths, between sentences."""
    cuts = sorted(int(len(sentences) * depth / 100) for depth in gen.rng.sample(DEPTHS, len(needles)))
    pieces, last = [], 0
    for cut, needle in zip(cuts, needles):
        pieces += [" ".join(sentences[last:cut]), needle]
        last = cut
    return " ".join(pieces + [" ".join(sentences[last:])])


def _niah(gen: _Generation):
    task = gen.task
    template, prefix, _ = TEMPLATES["niah"]
    template += prefix
    shown = task.value_type
    if task.num_q * task.num_v == 1:  # RULER's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        shown = shown[:-1]
    essay = gen.sources.essay_words(task.name) if task.haystack == "essay" else None
    num_k = max(task.num_k, task.num_q)

    def make(n):
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(gen.random(task.key_type))
            values.append([gen.random(task.value_type) for _ in range(task.num_v)])
            needles += [NEEDLE.format(type_needle_v=task.value_type, key=keys[-1], value=v) for v in values[-1]]
        gen.fixed_shuffle(needles)
        if essay is not None:
            words = (essay * -(-n // len(essay)))[:n]
            context = _insert_at_depths(gen, _sentences(" ".join(words).strip()), needles)
        else:
            if task.haystack == "noise":
                sentences = [NOISE] * n
            else:
                sentences = [NEEDLE.format(type_needle_v=task.value_type, key=gen.random(task.key_type),
                                           value=gen.random(task.value_type)) for _ in range(n)]
            for index, needle in zip(sorted(gen.rng.sample(range(n), len(needles)), reverse=True), needles):
                sentences.insert(index, needle)
            context = "\n".join(sentences)
        asked = gen.rng.sample(range(num_k), task.num_q)
        queries = [keys[i] for i in asked]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        answers = [v for i in asked for v in values[i]]
        return template.format(type_needle_v=shown, context=context, query=query), answers

    if essay is not None:
        step = 500 if gen.length >= SHORT else 50
    else:
        step = 25 if gen.length >= SHORT else 5
    return (lambda index: make), step, None


def _variable_tracking(gen: _Generation):
    task = gen.task
    template = "".join(TEMPLATES["variable_tracking"][:2])

    def chains(icl: bool):
        hops = min(10, task.num_hops) if icl else task.num_hops
        names: List[str] = []
        while len(names) < (hops + 1) * task.num_chains:
            name = "".join(gen.rng.choices(string.ascii_uppercase, k=3 if icl else 5))
            if name not in names:
                names.append(name)
        found = []
        for c in range(task.num_chains):
            chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
            value = "12345" if icl else str(gen.rng.randint(10000, 99998))
            found.append([f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(chain, chain[1:])])
        return names[:hops + 1], found

    def example(n, icl=False):
        names, assignments = chains(icl)
        sentences = [NOISE] * n
        for chain in assignments:
            for j, position in enumerate(sorted(gen.rng.sample(range(len(sentences)), len(chain)))):
                sentences.insert(position + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        value = assignments[0][0].split("=")[-1].strip()
        return template.format(context=context, query=value, num_v=task.num_hops + 1), names

    def one_shot(n):
        return example(n, icl=True)

    size = gen.fit(one_shot, 5, 0, ICL_LENGTH)
    try:
        shot, shot_names = gen.draw(one_shot, size, 5, 0, ICL_LENGTH)
    except ContextLengthError:
        shot, shot_names = one_shot(5)
    shot = shot + " " + " ".join(shot_names) + "\n"

    def make(n):
        randomized = shot
        for name in shot.split()[-(task.num_hops + 1):]:
            randomized = randomized.replace(name, "".join(gen.rng.choices(string.ascii_uppercase, k=len(name))))
        randomized = randomized.replace("12345", str(gen.rng.randint(10000, 99998)))
        text, names = example(n)
        return randomized + "\n" + text, names

    return (lambda index: make), 10 if gen.length >= SHORT else 5, None


def _common_words(gen: _Generation):
    task = gen.task
    template = "".join(TEMPLATES["common_words_extraction"][:2])
    words = gen.fixed_shuffle(sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                                         + wonderwords_list("verblist.txt"))))

    def listing(items):
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(items))

    def word_list(num_words, common_repeats, uncommon_repeats):
        chosen = gen.rng.sample(words, num_words)
        common, uncommon = chosen[:task.num_cw], chosen[task.num_cw:]
        return listing(gen.fixed_shuffle(common * common_repeats + uncommon * uncommon_repeats)), common

    def make(n):
        if gen.length < SHORT:
            shot, shot_answer = word_list(20, 3, 1)
            context, answer = word_list(n, 6, 1)
        else:
            shot, shot_answer = word_list(40, 10, 3)
            context, answer = word_list(n, task.freq_cw, task.freq_ucw)
        shot = template.format(context=shot, query="") + " " + listing(shot_answer)
        return shot + "\n" + template.format(context=context, query=""), answer

    return (lambda index: make), 10, len(words)


def _qa(gen: _Generation):
    task = gen.task
    template = "".join(TEMPLATES["qa"][:2])
    data = gen.sources.qa(task.dataset, task.name)
    documents = data.documents

    def make_for(index):
        question = data.questions[index]
        own, more = question["context"], question["more_context"]

        def make(n):
            if n < len(documents):
                if n - len(own) > len(more):
                    taken = set(own + more)
                    others = [i for i in range(len(documents)) if i not in taken]
                    chosen = own + more + gen.rng.sample(others, n - len(own) - len(more))
                else:
                    chosen = own + gen.rng.sample(more, max(0, n - len(own)))
                texts = [documents[i] for i in chosen]
            else:
                texts = (documents * -(-n // len(documents)))[:n]
            gen.fixed_shuffle(texts)
            context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(texts))
            return template.format(context=context, query=question["query"]), question["outputs"]
        return make

    return make_for, 10 if gen.length >= SHORT else 1, None


def _freq_words(gen: _Generation, count: int):
    """RULER's fwe sizing: coded words counted by a zeta law; the word count starts at the
    room / 6 and grows by room / 32 until the prompt reaches the room (length - budget)."""
    task = gen.task
    template = "".join(TEMPLATES["freq_words_extraction"][:2])
    room = gen.length - task.budget
    vocab_size, step = room // 50, room // 32
    if vocab_size < 4:
        raise ContextLengthError(f"a length of {gen.length} tokens is too short for RULER's fwe (a vocabulary of "
                                 f"length / 50 words must hold the three answers and the dots)")
    norm = zeta(task.alpha)

    def vocabulary():
        drawn = ["".join(gen.rng.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)]
        while len(set(drawn)) < vocab_size:
            drawn.append("".join(gen.rng.choices(string.ascii_lowercase, k=6)))
        vocab = gen.fixed_shuffle(sorted(set(drawn)))
        vocab[0] = "..."  # the most frequent "word" is noise
        return vocab

    def text(vocab, num_words):
        listed = [w for k, w in enumerate(vocab, start=1) for _ in range(int(num_words * k ** -task.alpha / norm))]
        return template.format(context=" ".join(gen.fixed_shuffle(listed)), query=""), vocab[1:4]

    def tokens(vocab, num_words):
        return len(gen.encode(text(vocab, num_words)[0]))

    vocab, num_words = vocabulary(), room // 6
    while tokens(vocab, num_words) < room:
        num_words += step
    num_words -= step
    found = []
    for _ in range(count):
        vocab, used = vocabulary(), num_words
        while used > 0 and tokens(vocab, used) > room:
            used -= step
        if used <= 0:
            raise gen.too_short(lambda n: text(vocab, n), 1)
        found.append(text(vocab, used))
    return found


_BUILDERS: Dict[str, Callable] = {"niah": _niah, "variable_tracking": _variable_tracking,
                                  "common_words_extraction": _common_words, "qa": _qa}


def make_samples(task_name: str, length: int, count: int, tokenizer=None, sources: Optional[RulerSources] = None,
                 seed: int = DEFAULT_SEED) -> List[RulerSample]:
    """``count`` samples of a RULER task whose prompt plus answer budget fits ``length`` tokens
    of ``tokenizer`` (default: bytes), reproducible from ``seed``."""
    task = task_spec(task_name)
    encode = (tokenizer or ByteTokenizer()).encode
    gen = _Generation(task, length, seed, encode, sources or RulerSources())
    if task.kind == "freq_words_extraction":
        texts = _freq_words(gen, count)
    else:
        make_for, step, cap = _BUILDERS[task.kind](gen)
        if task.kind == "qa" and count > len(gen.sources.qa(task.dataset, task.name).questions):
            raise DatasetMissingError(f"RULER's {task.name} asks for {count} questions; "
                                      f"{getattr(gen.sources, task.dataset)} has "
                                      f"{len(gen.sources.qa(task.dataset, task.name).questions)}")
        size = gen.fit(make_for(0), step, task.budget, length, cap)
        texts = [gen.draw(make_for(i), size, step, task.budget, length) for i in range(count)]
    head = TEMPLATES[task.kind][1][:10]  # RULER finds the answer prefix by its first 10 characters
    samples = []
    for text, answers in texts:
        cut = text.rfind(head)
        samples.append(RulerSample(task.name, text[:cut], text[cut:], encode(text), list(answers), task.budget))
    return samples


def check_tasks(names: Sequence[str], sources: RulerSources) -> List[RulerTask]:
    """The tasks, each known and with its user file readable (before any model runs)."""
    tasks = [task_spec(name) for name in names]
    for task in tasks:
        if task.needs == "essay":
            sources.essay_words(task.name)
        elif task.needs:
            sources.qa(task.needs, task.name)
    return tasks


def check_lengths(lengths: Sequence[int], limit: int) -> int:
    """``limit`` if every RULER length fits in it, else ContextLengthError."""
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ContextLengthError(f"RULER length {too_long[0]} exceeds the model's maximum length of {limit}")
    return limit


def ruler_scores(model, tokenizer, samples: Sequence[RulerSample], pattern=None, batch_size: int = 4,
                 max_length: Optional[int] = None) -> List[float]:
    """Each sample's score: its greedy continuation (sparse decode cache, at most the task's
    budget) post-processed and matched against its references with the task's metric."""
    metric = task_spec(samples[0].task).metric
    with evaluating(model, pattern):
        outputs = greedy_until(model, [s.tokens for s in samples], tokenizer.decode, max(s.budget for s in samples),
                               max_length or model.config.seq_length, stop_tokens=[tokenizer.eod],
                               batch_size=batch_size)
    return [score(metric, postprocess(o), s.references) for o, s in zip(outputs, samples)]


def ruler_table(model, patterns: Sequence, tasks: Sequence[str] = tuple(TASKS), lengths: Sequence[int] = RULER_LENGTHS,
                samples: int = 500, tokenizer=None, sources: Optional[RulerSources] = None, seed: int = DEFAULT_SEED,
                batch_size: int = 4, max_length: Optional[int] = None) -> List[dict]:
    """Rows {pattern, task, context_length, metric, samples, accuracy} for every task, length
    and pattern: the mean score (in [0, 1]) of greedy continuations through the sparse decode cache."""
    limit = check_lengths(lengths, max_length or model.config.seq_length)
    tokenizer = tokenizer or ByteTokenizer()
    sources = sources or RulerSources()
    rows = []
    for task in check_tasks(tasks, sources):
        for length in lengths:
            data = make_samples(task.name, length, samples, tokenizer, sources, seed)
            for pattern in patterns:
                scores = ruler_scores(model, tokenizer, data, pattern, batch_size, limit)
                rows.append(dict(pattern=str(pattern), task=task.name, context_length=length, metric=task.metric,
                                 samples=len(scores), accuracy=sum(scores) / len(scores)))
    return rows


def ruler_summary(rows: Sequence[dict]) -> List[dict]:
    """RULER's table (scores x100): a row per pattern and length with a column per task and
    their average, then per pattern the mean over lengths."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    table: Dict[Tuple, dict] = {}
    for r in rows:
        line = table.setdefault((r["pattern"], r["context_length"]), {"pattern": r["pattern"],
                                                                      "length": r["context_length"]})
        line[r["task"]] = 100 * r["accuracy"]
    lines = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        mine = [line for (p, _), line in table.items() if p == pattern]
        for line in mine:
            line["average"] = sum(line[t] for t in tasks) / len(tasks)
        mean = {"pattern": pattern, "length": "mean"}
        for column in tasks + ["average"]:
            mean[column] = sum(line[column] for line in mine) / len(mine)
        lines += mine + [mean]
    return lines
