"""LongBench v1 as LongBench scores it: metrics, templates, budgets and the runner's rules.

The expected scores below were computed once by running LongBench's own metric definitions
(THUDM/LongBench ``metrics.py`` with the ``rouge`` 1.0.1 and ``fuzzywuzzy`` 0.18.0 packages,
no python-Levenshtein) on these inputs; the templates and budgets are the values of LongBench's
``config/dataset2prompt.json`` and ``config/dataset2maxlen.json`` for the 16 English tasks.
"""

import difflib
import json
import random
import string
import warnings

import pytest
import torch

from megatron_ratplus.config import preset
from megatron_ratplus.evaluation.errors import ContextLengthError
from megatron_ratplus.evaluation.longbench import (LONGBENCH_E, TASKS, bucket_label, longbench_report,
                                                   longbench_table, middle_truncate, task_spec)
from megatron_ratplus.evaluation.metrics import PER_REFERENCE, edit_similarity, rouge_l
from megatron_ratplus.evaluation.scoring import greedy_until
from megatron_ratplus.inference import SamplingConfig, generate
from megatron_ratplus.model import build_model, set_attention_pattern
from test_eval_harness import CharTokenizer

GOV = ("The Department of Defense (DOD) spent $3.5 billion on the program in fiscal year 2019. GAO found that DOD "
       "did not track costs. GAO recommends that DOD track the costs of the program. DOD agreed with the "
       "recommendation.")
GOV_PRED = ("GAO found that the Department of Defense did not track the costs of the program. The program cost 3.5 "
            "billion dollars in 2019. DOD should track costs, GAO recommends. DOD agreed. DOD agreed.")
LONG_LINE_A = "a = [" + ", ".join(str(i % 7) for i in range(120)) + "]"  # >= 200 chars: difflib's autojunk
LONG_LINE_B = "a = [" + ", ".join(str(i % 5) for i in range(110)) + "]"
CLASSES = ["Description", "Description of a person", "Definition", "Definition of something", "Other",
           "Other location", "Location", "Person", "a", "b", "a b"]

# (prediction, reference, LongBench's score)
EXPECTED = {
    "rouge_l": [
        ("The cat sat on the mat. It was happy.", "The cat was on the mat. The cat was happy.", 0.8749999950781251),
        ("the Cat sat", "The cat sat", 0.3333333283333334),  # case-sensitive
        ("Hello, world! Goodbye.", "Hello world. Goodbye!", 0.0),  # punctuation stays on the words
        ("the the the the", "the cat the dog", 0.4999999962500001),  # unique words
        ("Dr. Smith met Mr. Jones in the U.S. on Monday.", "Smith and Jones met on Monday in the U.S.",
         0.8571428521541952),
        ("Amanda will bring cookies to Jerry tomorrow.", "Amanda baked cookies and will bring Jerry some tomorrow.",
         0.6249999950781252),
        (GOV_PRED, GOV, 0.7169811270914918),
        ("line one\nline two. end of it", "line one. line two\nend", 0.7999999952000001),
        ("", "a reference", 0.0),  # the package raises: 0
        ("...", "a reference.", 0.0),
        (" ", "a b", 0.0),
        ("a prediction", "", 0.0),
        ("Prices rose 3.5 percent. Prices rose.", "Prices rose 3.5 percent in May.", 0.8333333284722222),
        ("word " * 30 + ".", "word word word.", 0.999999995),
    ],
    "edit_similarity": [
        ("x = foo(a, b)  # call foo\ny = 2", "y = 2", 1.0),  # an inline comment drops the line
        ('url = "http://example.com/api"\nz = compute(url)', 'url = "http://example.com/api"', 0.3),
        ("\n\n```python\nreturn self.value\n```", "return self.value", 1.0),
        ("# only comments\n// and more\n`code`", "return x", 0.0),
        ("", "", 1.0),
        ("    return self.value", "return self.value", 0.89),
        ('printf("%d", x); // print it\nreturn 0;', 'printf("%d", x);', 0.32),
        ("int c = a#b;\nint d = c;", "int c = a;", 0.8),
        ("kitten", "sitting", 0.62),
        (LONG_LINE_A, LONG_LINE_B, 0.06),
        ("self.assertEqual(result, expected)", "self.assertEqual(expected, result)", 0.76),
        ("\n  \nreturn x", "return x", 0.2),  # only leading newlines are dropped: the blank line counts
        ("abcd", "abed", 0.75),
    ],
    "classification": [
        ("Location", "Location", 1.0),
        ("Person or Location", "Location", 0.5),
        ("Description of a person", "Description of a person", 1.0),
        ("Other location", "Other location", 1.0),
        ("Definition of something", "Definition of something", 1.0),
        ("a b", "a b", 0.5),  # "a" removed, "b" passed over by the in-loop removal
        ("Other location or Description", "Other location", 0.5),
        ("Person", "Location", 0.0),
        ("definition of something", "Definition of something", 0.0),
        ("Description of a person and Other location", "Description of a person", 0.3333333333333333),
    ],
    "qa_f1": [
        ("The  Eiffel-Tower, in PARIS!", "the Eiffel-Tower in Paris", 1.0),
        ("a cat sat", "the cat sat on a mat", 0.6666666666666666),
        ("red red blue", "red blue blue", 0.6666666666666666),
        ("An apple a day", "apple", 0.6666666666666666),
        ("", "x", 0.0),
        ("the", "a", 0.0),
    ],
    "count": [
        ("I count 7, not 8, surely 7", "7", 0.6666666666666666),
        ("none", "7", 0.0),
        ("There are 12 unique paragraphs", "12", 1.0),
        ("1212", "12", 0.0),
    ],
    "retrieval": [
        ("Paragraph 12", "Paragraph 12", 1.0),
        ("Paragraph 3 or 12", "Paragraph 12", 0.5),
        ("Paragraph 1", "Paragraph 12", 0.0),
        ("The answer is Paragraph 12, not 21", "Paragraph 12", 0.5),
        ("none", "Paragraph 4", 0.0),
    ],
}

# LongBench's config/dataset2prompt.json (v1) for the 16 English tasks, as JSON text.
DATASET2PROMPT = json.loads(r'''{
"narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
"qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
"multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
"hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
"2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
"musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
"gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
"qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
"multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
"trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
"triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
"samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
"passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
"passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
"lcc": "Please complete the code given below. \n{context}Next line of code:\n",
"repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n"
}''')
# config/dataset2maxlen.json, eval.py's dataset2metric, and the few-shot tasks whose first line counts.
DATASET2MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
DATASET2METRIC = {"narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
                  "2wikimqa": "qa_f1", "musique": "qa_f1", "gov_report": "rouge_l", "qmsum": "rouge_l",
                  "multi_news": "rouge_l", "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l",
                  "passage_count": "count", "passage_retrieval_en": "retrieval", "lcc": "edit_similarity",
                  "repobench-p": "edit_similarity"}
FIRST_LINE = {"trec", "triviaqa", "samsum"}


@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_metrics_equal_longbench_on_tricky_cases(metric):
    for prediction, reference, expected in EXPECTED[metric]:
        got = PER_REFERENCE[metric](prediction, reference, all_classes=CLASSES)
        assert got == pytest.approx(expected, abs=1e-9), (prediction, reference)


def test_a_reference_without_a_paragraph_number_scores_zero():
    assert PER_REFERENCE["retrieval"]("Paragraph 3", "the third one") == 0.0  # LongBench: IndexError


def _text(rng, words=("the", "The", "cat", "sat", "a", "mat", "dog", "ran", "U.S.", "3.5", "it,")):
    seps = [" ", " ", " ", ". ", "\n", "! "]
    return "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(0, 25))).strip(" ")


def test_rouge_l_is_the_rouge_package_on_random_text():
    from rouge import Rouge

    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    for _ in range(150):
        prediction, reference = _text(rng), _text(rng)
        try:
            expected = Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
        except Exception:
            expected = 0.0
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (seed, prediction, reference)


def test_edit_similarity_is_fuzz_ratio_on_random_lines(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its note that python-Levenshtein is absent: difflib wanted
        from fuzzywuzzy import fuzz

    monkeypatch.setattr(fuzz, "SequenceMatcher", difflib.SequenceMatcher)  # LongBench's route, whatever is installed
    seed = random.Random().randrange(2 ** 32)
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase[:6] + " ()=.,_"
    for _ in range(300):
        line, reference = ("".join(rng.choice(alphabet) for _ in range(rng.choice([0, 5, 40, 250])))
                           for _ in range(2))
        assert edit_similarity(line, reference) == fuzz.ratio(line, reference) / 100, (seed, line, reference)


def test_templates_budgets_and_metrics_are_longbench_config():
    assert set(TASKS) == set(DATASET2PROMPT)
    for name, spec in TASKS.items():
        assert spec.template == DATASET2PROMPT[name], name
        assert spec.max_new_tokens == DATASET2MAXLEN[name], name
        assert spec.metric == DATASET2METRIC[name], name
        assert spec.first_line == (name in FIRST_LINE), name
        assert spec.newline_stops == (name == "samsum"), name
    assert all(task_spec(t + "_e").template == TASKS[t].template for t in LONGBENCH_E)
    assert task_spec("hotpotqa_e").name == "hotpotqa_e" and set(LONGBENCH_E) <= set(TASKS)


def test_truncation_keeps_half_the_budget_at_each_end_and_buckets_are_longbench_e():
    assert middle_truncate(list(range(10)), 5) == [0, 1, 8, 9]  # int(5/2) at each end
    assert middle_truncate(list(range(10)), 6) == [0, 1, 2, 7, 8, 9]
    assert middle_truncate(list(range(4)), 5) == [0, 1, 2, 3]
    assert [bucket_label(n, (4000, 8000)) for n in (0, 3999, 4000, 7999, 8000, 50000)] == \
        ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    assert [bucket_label(n, (100, 250)) for n in (99, 100, 250)] == ["0-100", "100-250", "250+"]


@pytest.fixture(scope="module")
def model(megatron_single):
    torch.manual_seed(0)
    return build_model(preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=257,
                              seq_length=128)).eval()


def _ids(tokens):
    return ",".join(map(str, tokens))


def test_min_new_tokens_keeps_stop_tokens_out_of_the_first_step(model):
    """samsum's rule (HF min_length): the first token is the best one that is not a stop token."""
    set_attention_pattern(model, "dense")
    prompt = list(range(60, 90))
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], None)[0, -1, :256]
    first, second = logits.topk(2).indices.tolist()
    assert greedy_until(model, [prompt], _ids, 4, 128, stop_tokens=[first]) == [""]
    out = greedy_until(model, [prompt], _ids, 4, 128, stop_tokens=[first], min_new_tokens=1)[0]
    assert out.split(",")[0] == str(second)


def _write(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_runner_budget_buckets_classes_and_report(model, tmp_path):
    tok = CharTokenizer()  # every output is a word of letters, kept by QA F1's normalisation
    gen = torch.Generator().manual_seed(3)
    samples = [{"context": bytes(torch.randint(97, 123, (n,), generator=gen).tolist()).decode(), "input": "q?",
                "answers": ["placeholder"], "length": length} for n, length in ((30, 20), (300, 5000), (60, 9000))]
    spec = task_spec("mine:qa_f1")
    prompts = [middle_truncate(tok.encode(spec.template.format(**s)), 101) for s in samples]
    assert [len(p) for p in prompts] == [52, 100, 82]  # only the long one cut: 50 + 50 tokens
    set_attention_pattern(model, "dense")
    out = generate(model, prompts, SamplingConfig(max_new_tokens=8, stop_tokens=[tok.eod]))
    samples[1]["answers"] = [tok.decode(out.tokens[1])]  # the model's own output on the cut prompt: F1 = 1
    _write(tmp_path / "mine.jsonl", samples)
    rows = longbench_table(model, ["mine:qa_f1"], str(tmp_path), ["dense"], tok, max_length=101, max_new_tokens=8)
    by_bucket = {r["length"]: r for r in rows}
    assert list(by_bucket) == ["all", "0-4k", "4-8k", "8k+"]  # from the data's length field, not the prompt
    assert by_bucket["4-8k"]["score"] == 1.0 and by_bucket["all"]["score"] == pytest.approx(1 / 3)
    assert {r["budget"] for r in rows} == {101}
    # The budget shrinks to what leaves room for the generation; the default is the context minus 500.
    assert longbench_table(model, ["mine:qa_f1"], str(tmp_path), ["dense"], tok, max_length=200,
                           max_new_tokens=8)[0]["budget"] == 120
    with pytest.raises(ContextLengthError, match="context of 128 minus 500.*--longbench-max-length"):
        longbench_table(model, ["mine:qa_f1"], str(tmp_path), ["dense"], tok)

    # trec: first line only, and every sample scored with the file's last all_classes (eval.py).
    trec = [dict(s, answers=["?"], all_classes=None) for s in samples[:2]]
    prompts = [middle_truncate(tok.encode(TASKS["trec"].template.format(**s)), 64) for s in trec]
    lines = [tok.decode(t).lstrip("\n").split("\n")[0]
             for t in generate(model, prompts, SamplingConfig(max_new_tokens=8, stop_tokens=[tok.eod])).tokens]
    assert all(lines)  # words of letters: "absent" occurs in none
    trec[0]["answers"], trec[1]["answers"], trec[1]["all_classes"] = [lines[0]], ["absent"], [lines[0], "absent"]
    _write(tmp_path / "trec.jsonl", trec)
    rows = longbench_table(model, ["trec"], str(tmp_path), ["dense"], tok, max_length=64, max_new_tokens=8)
    assert [(r["length"], r["score"]) for r in rows] == [("all", 0.5), ("0-4k", 1.0), ("4-8k", 0.0)]
    report = longbench_report(rows)
    assert report == [dict(pattern="dense", task="trec", metric="classification", samples=2, budget=64, score=50.0,
                           **{"0-4k": 100.0, "4-8k": 0.0})]
