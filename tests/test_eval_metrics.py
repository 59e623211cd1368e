"""LongBench and RULER scorers against hand-computed examples (LongBench's own values: test_longbench.py)."""

import pytest

from megatron_ratplus.evaluation.errors import UnknownMetricError
from megatron_ratplus.evaluation.metrics import (check_metric, classification_accuracy, count_accuracy,
                                                 normalize_answer, paragraph_accuracy, qa_f1, score,
                                                 string_match_all, string_match_part)


def test_qa_f1_normalises_then_counts_shared_tokens():
    assert normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    # prediction {eiffeltower, paris}, reference {eiffeltower, in, paris}: P = 1, R = 2/3, F1 = 0.8
    assert qa_f1("Eiffel-Tower Paris", "the Eiffel-Tower in Paris") == pytest.approx(0.8)
    # "a cat sat" vs "the cat sat on a mat": pred {cat, sat}, ref {cat, sat, on, mat}: P 1, R 1/2 -> 2/3
    assert qa_f1("a cat sat", "the cat sat on a mat") == pytest.approx(2 / 3)
    assert qa_f1("dog", "cat") == 0.0
    assert qa_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)  # multiset overlap: red, blue


def test_classification_count_and_retrieval_scores():
    classes = ["Person", "Location", "Number", "Numeric value"]
    assert classification_accuracy("Location", "Location", all_classes=classes) == 1.0
    assert classification_accuracy("Person or Location", "Location", all_classes=classes) == 0.5
    # both "Numeric value" and "Number" occur in the prediction: 1/2
    assert classification_accuracy("Numeric value, Number", "Numeric value", all_classes=classes) == 0.5
    assert classification_accuracy("Person", "Location", all_classes=classes) == 0.0
    # a found class that is only part of the reference does not count against it
    assert classification_accuracy("Numeric value", "Numeric value", all_classes=["Numeric", "Numeric value"]) == 1.0
    assert count_accuracy("I count 7, not 8, surely 7", "7") == pytest.approx(2 / 3)
    assert count_accuracy("none", "7") == 0.0
    assert paragraph_accuracy("Paragraph 12", "Paragraph 12") == 1.0
    assert paragraph_accuracy("Paragraph 3 or 12", "Paragraph 12") == 0.5


def test_ruler_string_match_and_metric_dispatch():
    assert string_match_all("The numbers are 123, 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC abc", ["abc"]) == 1.0
    assert string_match_part("nothing", ["x", "no"]) == 1.0
    assert score("qa_f1", "cat sat", ["dog", "cat sat"]) == 1.0  # best reference
    assert score("string_match_all", "a b", ["a", "c"]) == 0.5  # all references together
    assert check_metric("rouge_l") == "rouge_l"
    with pytest.raises(UnknownMetricError, match="unknown metric 'bleu'"):
        score("bleu", "a", ["a"])
