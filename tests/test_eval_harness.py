"""lm-evaluation-harness model and the LongBench-style suite on a random-weight model (RULER: test_ruler.py).

References are independent: direct forward passes of one unpadded sequence at a time, and
``inference.generate`` (greedy) for decoding.
"""

import json
import os
import types

import pytest
import torch

from megatron_ratplus.config import preset
from megatron_ratplus.evaluation.errors import (ContextLengthError, DatasetMissingError, EvaluationError,
                                                UnknownMetricError, UnknownTaskError)
from megatron_ratplus.inference import SamplingConfig, generate
from megatron_ratplus.model import build_model, set_attention_pattern

VOCAB = 257
SPARSE = "dilated:4,w=8,p=2"


class CharTokenizer:
    """One character per token id (ids 0..255 as U+0100..U+01FF, eod 256): any token list
    decodes, and decoding a prefix gives a prefix of the text, so stop strings cut exactly."""

    eod = 256

    def encode(self, text):
        return [ord(c) - 0x100 if 0x100 <= ord(c) < 0x200 else ord(c) % 256 for c in text]

    def decode(self, ids):
        return "".join(chr(0x100 + int(i)) for i in ids if int(i) != self.eod)


@pytest.fixture(scope="module")
def model(megatron_single):
    torch.manual_seed(0)
    return build_model(preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
                              seq_length=128)).eval()


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


def _forward_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0), None)
    return torch.log_softmax(logits[0].double(), -1)


def _reference(model, context, continuation):
    logprobs = _forward_logprobs(model, context + continuation[:-1])[len(context) - 1:]
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool(torch.equal(logprobs.argmax(-1), target))


def _lm(model, tok, pattern, **kwargs):
    from megatron_ratplus.evaluation.lm_eval_model import RatPlusLM

    return RatPlusLM(model=model, tokenizer=tok, pattern=pattern, **kwargs)


def _requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


@pytest.mark.parametrize("pattern", ["dense", SPARSE])
def test_loglikelihoods_equal_a_direct_forward_pass(model, tok, pattern):
    gen = torch.Generator().manual_seed(3)
    texts = [tok.decode(torch.randint(0, 256, (n,), generator=gen).tolist()) for n in (5, 40, 17, 90, 3, 61)]
    pairs = [(texts[i], texts[i + 1][:1 + i * 3]) for i in range(5)]
    lm = _lm(model, tok, pattern.split(",")[0], batch_size=2, **dict(kv.split("=") for kv in pattern.split(",")[1:]))
    assert lm.pattern == pattern
    got = lm.loglikelihood(_requests(*pairs))
    set_attention_pattern(model, pattern)
    greedy_seen = False
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = _reference(model, tok.encode(context), tok.encode(continuation))
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-5) and greedy == want_greedy
    # a continuation made of the model's own argmax token is greedy
    context = tok.encode(texts[1])
    best = int(_forward_logprobs(model, context)[-1].argmax())
    (logprob, greedy), = lm.loglikelihood(_requests((texts[1], tok.decode([best]))))
    greedy_seen = greedy
    assert greedy_seen and logprob == pytest.approx(_reference(model, context, [best])[0], abs=1e-5)


def test_loglikelihood_rolling_scores_every_token_once(model, tok):
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 256, (70,), generator=gen).tolist()
    set_attention_pattern(model, SPARSE)
    whole = _forward_logprobs(model, [tok.eod] + tokens[:-1]).gather(-1, torch.tensor(tokens)[:, None]).sum().item()
    lm = _lm(model, tok, "dilated:4", w=8, p=2)
    assert lm.loglikelihood_rolling(_requests((tok.decode(tokens),)))[0] == pytest.approx(whole, abs=1e-4)
    # windows of 32 inputs: the first conditions on eod; each later chunk is scored from a full
    # window of the 32 tokens before its end (only the token before it for a full chunk)
    short = _lm(model, tok, "dilated:4", w=8, p=2, max_length=32)
    want = _forward_logprobs(model, [tok.eod] + tokens[:31]).gather(-1, torch.tensor(tokens[:32])[:, None]).sum()
    for start in range(32, 70, 32):
        chunk = tokens[start:start + 32]
        end = start + len(chunk)
        logprobs = _forward_logprobs(model, tokens[end - 33:end - 1])[-len(chunk):]
        want += logprobs.gather(-1, torch.tensor(chunk)[:, None]).sum()
    assert short.loglikelihood_rolling(_requests((tok.decode(tokens),)))[0] == pytest.approx(want.item(), abs=1e-4)


def test_generate_until_is_greedy_decoding_cut_at_stop_strings(model, tok):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (12, 30, 7, 21)]
    reference = generate(model, prompts, SamplingConfig(max_new_tokens=12, stop_tokens=[tok.eod]), pattern=SPARSE)
    texts = [tok.decode(t) for t in reference.tokens]
    stops = [[texts[0][4:6]], ["\u00ff\u00fe"], [texts[2][7:8], texts[2][2:4]], []]  # hit, miss, earliest, none
    lm = _lm(model, tok, "dilated:4", w=8, p=2, batch_size=3)
    got = lm.generate_until(_requests(*[(tok.decode(p), {"until": s, "max_gen_toks": 12})
                                        for p, s in zip(prompts, stops)]))
    want = []
    for text, stop in zip(texts, stops):
        cuts = [text.find(s) for s in stop if s in text]
        want.append(text[:min(cuts)] if cuts else text)
    assert got == want
    assert len(got[0]) <= 4 and len(got[2]) <= 7 and got[3] == texts[3]


def _write_tasks(folder, model, tok):
    """A multiple-choice, a generation and a rolling task in lm-eval's YAML + JSONL format."""
    docs = []
    for i in range(6):
        docs.append({"question": f"q{i} " + "ab" * i, "choices": [f"x{i}", f"yy{i}", "zzz"], "label": i % 3,
                     "text": "word " * (3 + 5 * i)})
    prompts = [tok.encode(f"Q: {d['question']}\nA:") for d in docs]
    set_attention_pattern(model, "dense")
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=6, stop_tokens=[tok.eod]))
    for i, d in enumerate(docs):  # half the targets are the model's own greedy output
        d["answer"] = tok.decode(greedy.tokens[i]) if i % 2 == 0 else "never"
    with open(folder / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\n")
    (folder / "mc.yaml").write_text(
        "task: local_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
        "doc_to_target: label\ndoc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: local_gen\n" + common + "output_type: generate_until\ndoc_to_text: 'Q: {{question}}\\nA:'\n"
        "doc_to_target: answer\ngeneration_kwargs:\n  until: ['\\u00ff\\u00ff']\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")
    return docs


def test_local_lm_eval_tasks_end_to_end(model, tok, tmp_path):
    from megatron_ratplus.evaluation.harness import lm_eval_rows, pattern_columns, task_manager

    docs = _write_tasks(tmp_path, model, tok)
    manager = task_manager(str(tmp_path), include_defaults=False)
    rows = lm_eval_rows(model, tok, ["local_mc", "local_gen"], ["dense", SPARSE], manager, batch_size=4)
    value = {(r["task"], r["metric"], r["pattern"]): r["value"] for r in rows}
    for pattern in ("dense", SPARSE):
        set_attention_pattern(model, pattern)
        correct = 0
        for d in docs:  # lm-eval's acc: the choice of highest log-likelihood (choices get a leading space)
            context = tok.encode(f"Question: {d['question']}\nAnswer:")
            scores = [_reference(model, context, tok.encode(" " + c))[0] for c in d["choices"]]
            correct += scores.index(max(scores)) == d["label"]
        assert value[("local_mc", "acc", pattern)] == pytest.approx(correct / len(docs))
    assert value[("local_gen", "exact_match", "dense")] == pytest.approx(0.5)
    table = pattern_columns(rows)
    assert {"task", "metric", "dense", SPARSE} <= set(table[0]) and len(table) == 2


def test_bad_input_fails_in_one_line(model, tok, tmp_path):
    from megatron_ratplus.evaluation.harness import check_tasks, task_manager
    from megatron_ratplus.evaluation.scoring import continuation_logprobs

    _write_tasks(tmp_path, model, tok)
    manager = task_manager(str(tmp_path), include_defaults=False)
    with pytest.raises(UnknownTaskError, match="unknown lm-eval task 'local_mcq' \\(did you mean local_mc"):
        check_tasks(["local_mcq"], manager)
    os.remove(tmp_path / "docs.jsonl")
    with pytest.raises(DatasetMissingError, match=f"data file\\(s\\) {tmp_path / 'docs.jsonl'} named in .*mc.yaml"):
        check_tasks(["local_mc"], manager)
    long = list(range(200))
    with pytest.raises(ContextLengthError, match="maximum length of 128"):
        continuation_logprobs(model, [(long, [1, 2])], 128)
    set_attention_pattern(model, "dense")
    (logprob, _), = continuation_logprobs(model, [(long, [1, 2])], 128, truncate=True)  # the last 128 tokens
    assert logprob == pytest.approx(_reference(model, long[73:], [1, 2])[0], abs=1e-5)
    with pytest.raises(EvaluationError, match="unknown ratplus model argument\\(s\\): q"):
        _lm(model, tok, "dense", q=3)


def test_longbench_runner_truncates_in_the_middle_and_scores_official_metrics(model, tok, tmp_path):
    from megatron_ratplus.evaluation.longbench import (LongBenchTask, longbench_table, middle_truncate, task_spec)

    assert middle_truncate(list(range(10)), 5) == [0, 1, 8, 9]
    assert task_spec("hotpotqa").metric == "qa_f1" and task_spec("lcc").metric == "edit_similarity"
    gen = torch.Generator().manual_seed(6)
    samples = [{"context": tok.decode(torch.randint(0, 256, (n,), generator=gen).tolist()), "input": "q?",
                "answers": ["placeholder"], "length": n} for n in (20, 300, 60)]
    spec = LongBenchTask("mine", "{context}\n\nQuestion: {input}\nAnswer:", 8, "qa_f1")
    prompts = [middle_truncate(tok.encode(spec.template.format(**s)), 128 - 8) for s in samples]
    set_attention_pattern(model, "dense")
    out = generate(model, prompts, SamplingConfig(max_new_tokens=8, stop_tokens=[tok.eod]))
    samples[0]["answers"] = ["nope", tok.decode(out.tokens[0])]  # the model's own output: F1 = 1
    with open(tmp_path / "mine.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    rows = longbench_table(model, ["mine:qa_f1"], str(tmp_path), ["dense", SPARSE], tok, buckets=(100,),
                           max_length=120, max_new_tokens=8)
    dense = {r["length"]: r for r in rows if r["pattern"] == "dense"}
    assert dense["all"]["samples"] == 3 and dense["0-100"]["samples"] == 2 and dense["100+"]["samples"] == 1
    assert dense["0-100"]["score"] == pytest.approx(0.5) and dense["all"]["score"] == pytest.approx(1 / 3)
    assert {r["pattern"] for r in rows} == {"dense", SPARSE}
    with pytest.raises(DatasetMissingError, match=f"{tmp_path / 'hotpotqa.jsonl'} not found"):
        longbench_table(model, ["hotpotqa"], str(tmp_path), ["dense"], tok)
    with pytest.raises(UnknownTaskError, match="unknown LongBench task 'hotpot'"):
        longbench_table(model, ["hotpot"], str(tmp_path), ["dense"], tok)
    with pytest.raises(UnknownMetricError, match="unknown metric 'bleu'"):
        longbench_table(model, ["mine:bleu"], str(tmp_path), ["dense"], tok)
    with pytest.raises(ContextLengthError, match="gov_report generates up to 512 tokens"):
        (tmp_path / "gov_report.jsonl").write_text(json.dumps(samples[0]) + "\n")
        longbench_table(model, ["gov_report"], str(tmp_path), ["dense"], tok, max_length=120)


@pytest.mark.integration
def test_scoring_under_tensor_parallelism_matches_one_process(tmp_path, megatron_single):
    """All ranks run every request; the gathered logits give rank 0 the single-process numbers."""
    from conftest import torchrun
    from harness.eval_scoring import run

    logprobs, texts, weights = run(1, SPARSE)
    torch.save({"weights": weights}, tmp_path / "tp1.pt")
    result = torchrun(2, "-m", "harness.eval_scoring", tmp_path / "tp2.pt", SPARSE, tmp_path / "tp1.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    tp2 = torch.load(tmp_path / "tp2.pt")
    for (got, got_greedy), (want, want_greedy) in zip(tp2["logprobs"], logprobs):
        assert got == pytest.approx(want, abs=1e-4) and got_greedy == want_greedy
    assert tp2["texts"] == texts and len(texts) == 3
