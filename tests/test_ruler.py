"""RULER's 13 tasks: each generated prompt against RULER's definitions (templates, answer
prefixes, needles, haystacks, budgets, lengths in the given tokenizer's tokens), determinism,
RULER's post-processing and scoring, and ``ratplus-eval --ruler-tasks`` end to end.

RULER's definitions are written here as data, independently of the module: the text of
``scripts/data/synthetic/constants.py`` and the settings of ``scripts/synthetic.yaml``.
The essay and QA files are random stand-ins written in RULER's input formats.
"""

import json
import math
import random
import re
from collections import Counter

import pytest
import torch

from megatron_ratplus.data.tokenizer import ByteTokenizer
from megatron_ratplus.evaluation.errors import ContextLengthError, DatasetMissingError, UnknownTaskError
from megatron_ratplus.evaluation.metrics import score
from megatron_ratplus.evaluation.ruler import (NOISE, TASKS, RulerSample, make_samples, postprocess, ruler_scores,
                                               ruler_summary, zeta)
from megatron_ratplus.evaluation.ruler_sources import RulerSources, wonderwords_list

# RULER's synthetic.yaml: (kind, haystack, key kind, value kind, num_k, num_v, num_q) / other settings
YAML = {
    "niah_single_1": ("niah", "noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("niah", "essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("niah", "essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("niah", "essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("niah", "needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("niah", "needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("niah", "essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("niah", "essay", "words", "numbers", 1, 1, 4),
}
BUDGET = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120, "freq_words_extraction": 50, "qa": 32}
NIAH = ("{Some} special magic {t} {are} hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the {t} afterwards.\n{context}\nWhat {are_all} the special magic {t} for {q} mentioned in the provided "
        "text?")
NIAH_PREFIX = " The special magic {t} for {q} mentioned in the provided text {are}"
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
      "Find all variables that are assigned the value {value} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
             "assgined the value {value}, they are: ")
CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            "appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_HEAD = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n")
QA_TAIL = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nQuestion: {q}")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
VALUE = {"numbers": r"[1-9]\d{6}", "uuids": UUID, "words": r"[a-z][a-z'-]*-[a-z' -]+?"}
WORDS = ("time person year way day thing man world life hand part child eye woman place week case point company "
         "number group problem fact river stone garden window letter music paper").split()


class WordTokenizer:
    """Words, single punctuation marks and whitespace runs as tokens: far coarser than bytes."""

    eod = 0

    def encode(self, text):
        return [len(piece) for piece in re.findall(r"\w+|[^\w\s]|\s+", text)]


def _sentence(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
    return " ".join(words).capitalize() + rng.choice(".!?")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Random stand-ins in RULER's formats: an essay file, a SQuAD 2.0 and a HotpotQA dev file."""
    root, rng = tmp_path_factory.mktemp("ruler"), random.Random(5)
    essay = "\n\n".join(" ".join(_sentence(rng) for _ in range(6)) for _ in range(30))
    (root / "essay.json").write_text(json.dumps({"text": essay}))
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(3):
            code = f"K{a}{p}{rng.randint(100, 999)}"
            paragraphs.append({"context": f"{_sentence(rng)} The code of hall {a}{p} is {code}. {_sentence(rng)}",
                               "qas": [{"question": f"What is the code of hall {a}{p}?", "is_impossible": False,
                                        "answers": [{"text": code, "answer_start": 0}, {"text": code.lower()}]},
                                       {"question": "Which one is unanswerable?", "is_impossible": True,
                                        "answers": []}]})
        articles.append({"title": f"Article {a}", "paragraphs": paragraphs})
    (root / "squad.json").write_text(json.dumps({"version": "v2.0", "data": articles}))
    hotpot = []
    for q in range(4):
        context = [[f"Title {q}-{i}", [_sentence(rng) + " ", _sentence(rng)]] for i in range(3)]
        context[1][1].append(f" Bridge {q} opened in {1900 + 7 * q}.")
        hotpot.append({"_id": str(q), "question": f"When did bridge {q} open?", "answer": str(1900 + 7 * q),
                       "context": context, "supporting_facts": [[context[1][0], 2]], "type": "bridge"})
    (root / "hotpot.json").write_text(json.dumps(hotpot))
    return RulerSources(str(root / "essay.json"), str(root / "squad.json"), str(root / "hotpot.json"))


def _is_word_key(key):
    adjectives, nouns = set(wonderwords_list("adjectivelist.txt")), set(wonderwords_list("nounlist.txt"))
    return any(key[:i] in adjectives and key[i + 1:] in nouns for i, c in enumerate(key) if c == "-")


def _check_fits(sample, tokenizer, length, slack):
    """Prompt = input + answer prefix; its tokens plus the budget fit; less than ``slack`` is left."""
    assert sample.tokens == tokenizer.encode(sample.input + sample.answer_prefix)
    assert length - slack < len(sample.tokens) + sample.budget <= length


def test_tasks_are_rulers_thirteen_with_its_budgets_and_metrics():
    assert list(TASKS) == list(YAML) + ["vt", "cwe", "fwe", "qa_1", "qa_2"]
    for name, (kind, haystack, key, value, k, v, q) in YAML.items():
        t = TASKS[name]
        assert (t.kind, t.haystack, t.key_type, t.value_type, t.num_k, t.num_v, t.num_q) == (kind, haystack, key,
                                                                                              value, k, v, q)
    assert (TASKS["vt"].num_chains, TASKS["vt"].num_hops) == (1, 4)
    assert (TASKS["cwe"].freq_cw, TASKS["cwe"].freq_ucw, TASKS["cwe"].num_cw) == (30, 3, 10)
    assert TASKS["fwe"].alpha == 2.0 and (TASKS["qa_1"].dataset, TASKS["qa_2"].dataset) == ("squad", "hotpotqa")
    for t in TASKS.values():
        assert t.budget == BUDGET[t.kind]
        assert t.metric == ("string_match_part" if t.kind == "qa" else "string_match_all")


@pytest.mark.parametrize("name", list(YAML))
def test_niah_prompts_follow_rulers_template_needles_and_haystack(name, sources):
    task, tok = TASKS[name], ByteTokenizer()
    length = 2600
    samples = make_samples(name, length, 3, tok, sources, seed=7)
    assert samples == make_samples(name, length, 3, tok, sources, seed=7)
    assert samples != make_samples(name, length, 3, tok, sources, seed=8)
    plural = task.num_v * task.num_q > 1
    t = task.value_type if plural else task.value_type[:-1]
    words = {"Some": "Some" if plural else "A", "are": "are" if plural else "is",
             "are_all": "are all" if plural else "is"}
    needle = re.compile(rf"One of the special magic {task.value_type} for (.+?) is: ({VALUE[task.value_type]})\.")
    essay = " ".join(sources.essay_words(name) * 3)
    for s in samples:
        asked = re.fullmatch(re.escape(NIAH_PREFIX.format(t=t, q="QUERY", **words)).replace("QUERY", "(.+)"),
                             s.answer_prefix).group(1)
        queries = asked.split(", and ")[-1:] if task.num_q == 1 else re.split(r", and |, ", asked)
        assert len(queries) == task.num_q
        head, tail = NIAH.format(t=t, q=asked, context="CONTEXT", **words).split("CONTEXT")
        assert s.input.startswith(head) and s.input.endswith(tail)
        context = s.input[len(head):len(s.input) - len(tail)]
        found = needle.findall(context)
        if task.haystack == "needle":  # every line a needle; the distractors' keys differ from the asked one
            lines = context.split("\n")
            assert len(found) == len(lines) and len(lines) % 5 == 1
            ours = [f for f in found if f[0] in queries]
        else:
            ours = found
            assert len(found) == max(task.num_k, task.num_q) * task.num_v
        assert len(s.references) == task.num_v * task.num_q  # the asked keys' values, key by key
        for i, query in enumerate(queries):
            mine = sorted(v for k, v in ours if k == query)
            assert mine == sorted(s.references[i * task.num_v:(i + 1) * task.num_v]) and len(mine) == task.num_v
        for key, _ in found:
            assert re.fullmatch(UUID, key) if task.key_type == "uuids" else _is_word_key(key)
        assert all(r not in s.answer_prefix for r in s.references)
        stripped = needle.sub("", context)
        if task.haystack == "noise":
            lines = [line for line in stripped.split("\n") if line]
            assert set(lines) == {NOISE} and len(lines) % 5 == 0
        elif task.haystack == "essay":  # whole essay words in order, needles between sentences
            text = " ".join(stripped.split())
            assert essay.startswith(text) and len(text.split()) % 50 == 0
            for match in needle.finditer(context):
                before, after = context[:match.start()].rstrip(), needle.sub("", context[match.end():]).strip()
                assert not before or before[-1] in ".!?" or not after  # between sentences, or at the very end
        step = {"noise": 5 * len(NOISE), "essay": 50 * 12, "needle": 5 * 120}[task.haystack]
        _check_fits(s, tok, length, 2 * step + 200)


def test_niah_at_rulers_lengths_in_another_tokenizers_tokens(sources):
    tok = WordTokenizer()
    line = {"niah_single_1": NOISE, "niah_multikey_3": f"One of the special magic uuids for {'0' * 36} is: {'0' * 36}."}
    for name in line:
        step = 25 * len(tok.encode(line[name].replace("0", "a0 ") + "\n"))  # RULER's step at 4096: 25 lines
        for s in make_samples(name, 4096, 2, tok, sources):
            _check_fits(s, tok, 4096, 2 * step + 100)


def test_vt_has_rulers_one_shot_example_chain_and_hops():
    tok = ByteTokenizer()
    for s in make_samples("vt", 2200, 3, tok, seed=3):
        assert s.budget == 30
        value = re.search(r"assigned the value (\d{5}) in the text above\.$", s.input).group(1)
        assert s.answer_prefix == VT_PREFIX.format(value=value)
        shot_end = re.search(r", they are:  ((?:[A-Z]{3} ){4}[A-Z]{3})\n\n", s.input)  # one-shot answer, then "\n"
        shot_names = shot_end.group(1).split()
        shot = s.input[:shot_end.end()]
        main = s.input[shot_end.end():]
        for text, names, chars in ((shot, shot_names, 3), (main, s.references, 5)):
            first = re.search(rf"VAR ({'[A-Z]' * chars}) = (\d{{5}})\n", text)
            chain = [first.group(1)]
            for _ in range(4):
                chain.append(re.search(rf"VAR ([A-Z]{{{chars}}}) = VAR {chain[-1]} \n", text).group(1))
            assert chain == names and len(set(names)) == 5
            assert first.group(2) != "12345"
            lines = [line for line in text.split("\n") if line.startswith(("The grass", "VAR"))]
            assert len(lines) == 5 + sum(line == NOISE for line in lines)
        assert main.startswith(VT.format(context="", value=value)[:80])
        assert shot.startswith(VT[:80]) and value == re.search(r"VAR [A-Z]{5} = (\d{5})", main).group(1)
        _check_fits(s, tok, 2200, 5 * len(NOISE) + 100)


@pytest.mark.parametrize("length,repeats,shot_repeats", [(2400, (6, 1), (3, 1, 20)), (9000, (30, 3), (10, 3, 40))])
def test_cwe_lists_english_words_with_rulers_repetitions(length, repeats, shot_repeats):
    tok = ByteTokenizer()
    english = set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                  + wonderwords_list("verblist.txt"))
    for s in make_samples("cwe", length, 2, tok, seed=1):
        assert s.answer_prefix == CWE_PREFIX and s.budget == 120
        blocks = s.input.split(CWE_HEAD)
        assert blocks[0] == "" and len(blocks) == 3
        shot, shot_answer = blocks[1].split(CWE_QUESTION + CWE_PREFIX + " ")
        listed = re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", shot)
        assert [int(i) for i, _ in listed] == list(range(1, len(listed) + 1))
        counts = Counter(w for _, w in listed)
        common = [w for w, n in counts.items() if n == shot_repeats[0]]
        assert len(common) == 10 and len(counts) == shot_repeats[2] and set(counts.values()) == set(shot_repeats[:2])
        answer = re.findall(r"(\d+)\. (\S+)", shot_answer)
        assert [int(i) for i, _ in answer] == list(range(1, 11)) and sorted(w for _, w in answer) == sorted(common)
        assert shot_answer.endswith("\n")
        assert blocks[2].endswith(CWE_QUESTION)
        main = re.findall(r"\d+\. (.+?)(?= \d+\. |\nQuestion|$)", blocks[2][:-len(CWE_QUESTION)])
        counts = Counter(main)
        assert sorted(w for w, n in counts.items() if n == repeats[0]) == sorted(s.references)
        assert set(counts.values()) == set(repeats) and len(s.references) == 10 and set(counts) <= english
        _check_fits(s, tok, length, 10 * 14 * repeats[1] + 200)


def test_fwe_counts_coded_words_by_rulers_zeta_law():
    assert zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-12)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-12)
    assert zeta(1.5) == pytest.approx(2.612375348685488, abs=1e-11)
    tok = ByteTokenizer()
    for length in (1500, 3000):
        for s in make_samples("fwe", length, 2, tok, seed=4):
            assert s.input.startswith(FWE_HEAD) and s.input.endswith(FWE_QUESTION) and s.answer_prefix == FWE_PREFIX
            words = s.input[len(FWE_HEAD):-len(FWE_QUESTION)].split(" ")
            ranked = Counter(words).most_common()
            assert ranked[0][0] == "..." and [w for w, _ in ranked[1:4]] == s.references
            assert all(re.fullmatch("[a-z]{6}", w) for w, _ in ranked[1:]) and len(ranked) <= (length - 50) // 50
            counts = [n for _, n in ranked]  # the k-th word appears int(N k^-2 / zeta(2)) times, for one N
            first = ranked[0][1] * zeta(2.0)
            law = [[int(n * k ** -2.0 / zeta(2.0)) for k in range(1, (length - 50) // 50 + 1)]
                   for n in range(int(first) - 2, int(first + zeta(2.0)) + 3)]
            assert counts in [[c for c in counts_n if c > 0] for counts_n in law]
            _check_fits(s, tok, length, (length - 50) // 32 * 7 + 100)


@pytest.mark.parametrize("name,dataset", [("qa_1", "squad"), ("qa_2", "hotpotqa")])
def test_qa_documents_questions_and_answers_as_ruler_reads_them(name, dataset, sources):
    tok = ByteTokenizer()
    data = sources.qa(dataset, name)
    raw = json.load(open(getattr(sources, dataset)))
    if dataset == "squad":
        expected = [(q["question"], [a["text"] for a in q["answers"]]) for a in raw["data"] for p in a["paragraphs"]
                    for q in p["qas"] if not q["is_impossible"]]
    else:
        expected = [(q["question"], [q["answer"]]) for q in raw]
    assert [(q["query"], q["outputs"]) for q in data.questions] == expected
    samples = make_samples(name, 1800, len(expected), tok, sources, seed=2)
    for i, s in enumerate(samples):
        query, answers = expected[i]
        assert s.references == answers and s.answer_prefix == " Answer:" and s.budget == 32
        assert s.input.startswith(QA_HEAD) and s.input.endswith(QA_TAIL.format(q=query))
        documents = re.split(r"(?:^|\n\n)Document \d+:\n", s.input[len(QA_HEAD):-len(QA_TAIL.format(q=query))])[1:]
        numbers = re.findall(r"Document (\d+):\n", s.input)
        assert numbers == [str(n) for n in range(1, len(documents) + 1)]
        assert all(data.documents[d] in documents for d in data.questions[i]["context"])
        assert any(a in doc for a in answers for doc in documents)
        _check_fits(s, tok, 1800, 600)
    with pytest.raises(DatasetMissingError, match=f"asks for {len(expected) + 1} questions"):
        make_samples(name, 1800, len(expected) + 1, tok, sources)


def test_postprocessing_and_scores_equal_rulers_on_random_cases():
    rng = random.Random(11)
    alphabet = "abcAB xyz\x00\x01\t\n\x1f\x7f.-é"
    for _ in range(300):
        prediction = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected = "".join("\n" if ord(c) < 32 else c for c in prediction.strip()).strip()
        assert postprocess(prediction) == expected
        references = ["".join(rng.choice("abcABxyz") for _ in range(rng.randint(1, 3)))
                      for _ in range(rng.randint(1, 4))]
        hits = [1.0 if r.lower() in expected.lower() else 0.0 for r in references]
        assert score(TASKS["niah_multivalue"].metric, postprocess(prediction), references) == sum(hits) / len(hits)
        assert score(TASKS["qa_1"].metric, postprocess(prediction), references) == max(hits)


def test_ruler_scores_greedy_output_and_summary(megatron_single):
    from megatron_ratplus.config import preset
    from megatron_ratplus.inference import SamplingConfig, generate
    from megatron_ratplus.model import build_model, set_attention_pattern

    torch.manual_seed(0)
    model = build_model(preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=257,
                               seq_length=160)).eval()
    tok = ByteTokenizer()
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 70)]
    sparse = "dilated:4,w=8,p=2"
    set_attention_pattern(model, sparse)
    own = [postprocess(tok.decode(t)) for t in
           generate(model, prompts, SamplingConfig(max_new_tokens=12, stop_tokens=[tok.eod])).tokens]
    assert all(len(o) >= 4 for o in own)
    samples = [RulerSample("niah_multivalue", "", "", prompts[0], [own[0][:2], own[0][2:4].upper(), "\u00e9\u00e9"],
                           12),
               RulerSample("niah_multivalue", "", "", prompts[1], [own[1][-3:]], 12)]
    assert ruler_scores(model, tok, samples, sparse, batch_size=2) == pytest.approx([2 / 3, 1.0])
    rows = [dict(pattern=p, task=t, context_length=n, metric="string_match_all", samples=1, accuracy=a)
            for p in ("dense", sparse) for t, a in (("vt", 0.5), ("fwe", 0.25)) for n in (1024, 2048)]
    summary = ruler_summary(rows)
    assert [(r["pattern"], r["length"]) for r in summary] == [("dense", 1024), ("dense", 2048), ("dense", "mean"),
                                                              (sparse, 1024), (sparse, 2048), (sparse, "mean")]
    assert summary[2] == {"pattern": "dense", "length": "mean", "vt": 50.0, "fwe": 25.0, "average": 37.5}


def test_bad_requests_are_one_line_errors(sources, tmp_path):
    with pytest.raises(UnknownTaskError, match="unknown RULER task 'passkey'"):
        make_samples("passkey", 4096, 1)
    with pytest.raises(ContextLengthError, match="too short for RULER's niah_single_1: its smallest prompt needs"):
        make_samples("niah_single_1", 600, 1)
    with pytest.raises(DatasetMissingError, match="niah_single_2 needs the essay file"):
        make_samples("niah_single_2", 4096, 1)
    (tmp_path / "bad.json").write_text('{"text": 3}')
    with pytest.raises(DatasetMissingError, match="is not an essay file"):
        make_samples("niah_multiquery", 4096, 1, sources=RulerSources(essay=str(tmp_path / "bad.json")))
    with pytest.raises(DatasetMissingError, match="is not a SQuAD file"):
        make_samples("qa_1", 4096, 1, sources=RulerSources(squad=sources.hotpotqa))


def test_ratplus_eval_ruler_end_to_end(sources, tmp_path, capsys):
    from megatron_ratplus.cli import eval as eval_cli
    from megatron_ratplus.cli import pretrain as pretrain_cli
    from megatron_ratplus.evaluation.results import read_results

    ck = str(tmp_path / "ck")
    assert pretrain_cli.main(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
                              "--seq-length", "1100", "--micro-batch-size", "1", "--global-batch-size", "1",
                              "--eval-iters", "1", "--eval-interval", "0", "--no-progress-bar", "--train-iters", "1",
                              "--save", ck]) == 0
    capsys.readouterr()
    argv = ["--load", ck, "--patterns", "dense,dilated:4,w=8", "--eval-samples", "1", "--ruler-tasks",
            "niah_single_1,fwe,qa_1", "--ruler-lengths", "1000,1100", "--ruler-samples", "2", "--ruler-qa-squad",
            sources.squad, "--ruler-table", str(tmp_path / "r.csv"), "--results", str(tmp_path / "res.json")]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| pattern +\| length +\| niah_single_1 +\| fwe +\| qa_1 +\| average +\|", out)
    assert len(re.findall(r"\| dilated:4,w=8 +\| (1000|1100|mean) ", out)) == 3
    rows = read_results(str(tmp_path / "res.json"))["rows"]
    ruler = [r for r in rows if r["suite"] == "ruler"]
    assert len(ruler) == 3 * 2 * 3  # tasks x patterns x (two lengths + their mean)
    assert {r["metric"] for r in ruler if r["task"] == "qa_1"} == {"string_match_part"}
    assert {r.get("length") for r in ruler} == {1000, 1100, None} and all(0 <= r["value"] <= 1 for r in ruler)
    assert len((tmp_path / "r.csv").read_text().strip().splitlines()) == 1 + 3 * 2 * 2
    for extra, needle in ((["--ruler-tasks", "niah_single_2"], "niah_single_2 needs the essay file"),
                          (["--ruler-tasks", "qa_2", "--ruler-qa-hotpot", str(tmp_path / "none.json")],
                           f"RULER hotpotqa file not found: {tmp_path / 'none.json'}"),
                          (["--ruler-tasks", "fwe", "--ruler-lengths", "2048"], "exceeds the model's maximum length")):
        assert eval_cli.main(["--load", ck, "--patterns", "dense", "--eval-samples", "1"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ratplus-eval: error:") and needle in err[0], err
