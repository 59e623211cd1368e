"""Answer scorers of the long-context suites: LongBench's per-task metrics and RULER's string match.

Each scorer maps (prediction, reference) to a number in [0, 1]; a sample with several
references takes the best (LongBench) or, for RULER's ``string_match_all``, all references
together. The LongBench scorers return LongBench v1's own values (its ``metrics.py``), quirks
included (docs/LONGBENCH.md lists them): Rouge-L is the ``rouge`` package (1.0.1) called as
LongBench calls it, edit similarity is fuzzywuzzy's ``fuzz.ratio`` as LongBench's requirements
install it (on difflib's matcher, without python-Levenshtein, whose ratio differs).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from typing import Callable, Dict, Sequence

from megatron_ratplus.evaluation.errors import UnknownMetricError


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, as LongBench's QA F1 uses it: lower case, no punctuation, no
    articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    common = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction_tokens), common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    """Token F1 between the normalised answers (narrativeqa, qasper, hotpotqa, triviaqa, ...)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_l(prediction: str, reference: str, **_) -> float:
    """LongBench's Rouge-L (gov_report, qmsum, multi_news, samsum): the ``rouge`` package's
    summary-level F, sentences split at ".", unique case-sensitive words. Whatever the package
    raises scores 0, as LongBench's try/except has it: an empty prediction or reference (or
    one of dots only), and a sentence pair long enough to exhaust Python's recursion limit in
    the package's LCS (about 1000 words together; the exact point depends on the call depth)."""
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0


def classification_accuracy(prediction: str, reference: str, all_classes: Sequence[str] = (), **_) -> float:
    """LongBench's trec score: the class names found in the prediction, less those that are
    proper parts of the reference; 1/n if the reference is among the n left, else 0.

    LongBench drops those names from the list while iterating over it, so the name right after
    each dropped one is never checked and stays counted ("a", "b", "a b" found for reference
    "a b" leaves "b", "a b": 1/2). Reproduced here for equal scores (nested label sets only).
    """
    found = [c for c in all_classes if c in prediction]
    position = 0
    while position < len(found):
        name = found[position]
        if name in reference and name != reference:
            found.remove(name)  # the next name slides into this position and is passed over
        position += 1
    return 1.0 / len(found) if reference in found else 0.0


def count_accuracy(prediction: str, reference: str, **_) -> float:
    """passage_count: the share of the numbers in the prediction that equal the reference."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def paragraph_accuracy(prediction: str, reference: str, **_) -> float:
    """passage_retrieval: the share of the numbers in the prediction equal to the reference's
    paragraph number ("Paragraph 12"). A reference without "Paragraph N" scores 0 here; LongBench
    stops with an IndexError (its data always has one)."""
    target = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not target or not numbers:
        return 0.0
    return sum(n == target[0] for n in numbers) / len(numbers)


def _is_code(line: str) -> bool:
    """LongBench's filter: a line containing a backtick, "#" or "//" anywhere is not code."""
    return "`" not in line and "#" not in line and "//" not in line


def edit_similarity(prediction: str, reference: str, **_) -> float:
    """LongBench's code score (lcc, repobench-p): the first prediction line (leading newlines
    dropped) that passes the code filter, "" if none, against the reference by fuzzywuzzy's
    ``fuzz.ratio`` / 100: 1 for equal strings, 0 when either is empty, else difflib's ratio
    rounded to a whole percent. difflib's matcher is what fuzzywuzzy uses without
    python-Levenshtein (LongBench installs none), so the value does not depend on what else is
    installed; it is not the edit distance (difflib joins longest common blocks greedily)."""
    line = next((line for line in prediction.lstrip("\n").split("\n") if _is_code(line)), "")
    if line == reference:
        return 1.0
    if not line or not reference:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, line, reference).ratio()) / 100


def string_match_all(prediction: str, references: Sequence[str], **_) -> float:
    """RULER: the share of the references that occur in the prediction (case-insensitive)."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str], **_) -> float:
    """RULER's QA score: 1 if any reference occurs in the prediction."""
    return float(any(r.lower() in prediction.lower() for r in references))


PER_REFERENCE: Dict[str, Callable] = {
    "qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification_accuracy,
    "count": count_accuracy, "retrieval": paragraph_accuracy, "edit_similarity": edit_similarity,
}
ALL_REFERENCES: Dict[str, Callable] = {"string_match_all": string_match_all, "string_match_part": string_match_part}
METRICS = tuple(PER_REFERENCE) + tuple(ALL_REFERENCES)


def score(metric: str, prediction: str, references: Sequence[str], **info) -> float:
    """One sample's score under ``metric``: the best reference for LongBench's scorers, all
    references at once for RULER's."""
    if check_metric(metric) in ALL_REFERENCES:
        return ALL_REFERENCES[metric](prediction, references, **info)
    return max((PER_REFERENCE[metric](prediction, r, **info) for r in references), default=0.0)


def check_metric(metric: str) -> str:
    """``metric`` itself if a scorer implements it, else UnknownMetricError."""
    if metric not in METRICS:
        raise UnknownMetricError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
    return metric
