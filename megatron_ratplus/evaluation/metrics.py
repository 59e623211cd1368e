"""Answer scorers of the long-context suites: LongBench's per-task metrics and RULER's string match.

Each scorer maps (prediction, reference) to a number in [0, 1]; a sample with several
references takes the best (LongBench) or, for RULER's ``string_match_all``, all references
together. Written out here (a few lines each) rather than pulling in rouge/fuzzywuzzy packages,
so that the definitions are visible and tested against hand-computed examples.
"""

from __future__ import annotations

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


def _lcs(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    """Rouge-L F1: longest common subsequence of lower-cased words (gov_report, qmsum, samsum, ...)."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_accuracy(prediction: str, reference: str, all_classes: Sequence[str] = (), **_) -> float:
    """LongBench's trec score: the class names found in the prediction (dropping those that are
    only parts of the reference); 1/n if the reference is among the n found, else 0."""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


def count_accuracy(prediction: str, reference: str, **_) -> float:
    """passage_count: the share of the numbers in the prediction that equal the reference."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def paragraph_accuracy(prediction: str, reference: str, **_) -> float:
    """passage_retrieval: the share of the numbers in the prediction equal to the reference's
    paragraph number ("Paragraph 12")."""
    target = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not target or not numbers:
        return 0.0
    return sum(n == target[0] for n in numbers) / len(numbers)


def edit_similarity(prediction: str, reference: str, **_) -> float:
    """Code completion (lcc, repobench-p): the first prediction line that is code (not a comment
    or a fence), compared by character similarity 2 * LCS / (|a| + |b|), i.e. one minus the
    insert/delete edit distance over the summed lengths (the fuzz.ratio LongBench reports)."""
    lines = [line for line in prediction.lstrip("\n").split("\n")
             if not line.lstrip().startswith(("`", "#", "//"))]
    line = lines[0] if lines else ""
    if not line and not reference:
        return 1.0
    return 2 * _lcs(line, reference) / (len(line) + len(reference))


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
    return max(PER_REFERENCE[metric](prediction, r, **info) for r in references)


def check_metric(metric: str) -> str:
    """``metric`` itself if a scorer implements it, else UnknownMetricError."""
    if metric not in METRICS:
        raise UnknownMetricError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
    return metric
