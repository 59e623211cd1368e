"""LongBench v1 over local files in LongBench's JSONL format, run and scored as LongBench does.

Each task reads ``DIR/<task>.jsonl`` (LongBench's ``data/`` folder: ``context``, ``input``,
``answers``, ``length``, ``all_classes``; LongBench-E's files are ``<task>_e.jsonl``). As
LongBench's ``pred.py`` and ``eval.py`` do: the task's template (``config/dataset2prompt.json``)
filled with the sample's fields; a prompt over the truncation budget (default: the model's
context minus 500, LongBench's ``model2maxlen``) keeps its first and last ``int(budget/2)``
tokens, since instructions sit at both ends; greedy decoding of the task's budget
(``dataset2maxlen.json``; samsum stops at a newline token, which may not come first); only the
first line counts for trec, triviaqa and samsum; the task's metric (``metrics.py``), best over
the references. Scores are in [0, 1] per task, and per LongBench-E bucket of the data's
``length`` field (words: 0-4k, 4-8k, 8k+); :func:`longbench_report` lays them out as LongBench
reports them (x100, two decimals). Decoding runs through the sparse decode cache.
docs/LONGBENCH.md lists what differs from LongBench and which numbers may stand beside its
tables. Any other local dataset in the same format runs as ``NAME:METRIC`` with the generic
template ``{context}\\n\\nQuestion: {input}\\nAnswer:``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megatron_ratplus.data.tokenizer import ByteTokenizer
from megatron_ratplus.evaluation.errors import ContextLengthError, DatasetMissingError, UnknownTaskError
from megatron_ratplus.evaluation.metrics import check_metric, score
from megatron_ratplus.evaluation.scoring import greedy_until
from megatron_ratplus.model import evaluating
from megatron_ratplus.optional import require
from megatron_ratplus.userfiles import json_objects, typed_fields

CONTEXT_MARGIN = 500  # LongBench's model2maxlen: the truncation budget is the context minus 500 tokens

_PASSAGES_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
                "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}"
                "\nAnswer:")
_CODE = "Please complete the code given below. \n{context}Next line of code:\n"
GENERIC_TEMPLATE = "{context}\n\nQuestion: {input}\nAnswer:"


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    template: str
    max_new_tokens: int
    metric: str
    first_line: bool = False  # few-shot tasks: only the prediction's first line counts
    newline_stops: bool = False  # samsum: decoding stops at a newline token, which may not come first


TASKS: Dict[str, LongBenchTask] = {t.name: t for t in (
    LongBenchTask("narrativeqa", "You are given a story, which can be either a novel or a movie script, and a "
                  "question. Answer the question asconcisely as you can, using a single phrase if possible. Do not "
                  "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story "
                  "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
                  "Question: {input}\n\nAnswer:", 128, "qa_f1"),
    LongBenchTask("qasper", "You are given a scientific article and a question. Answer the question as concisely as "
                  "you can, using a single phrase or sentence if possible. If the question cannot be answered based "
                  "on the information in the article, write \"unanswerable\". If the question is a yes/no question, "
                  "answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: "
                  "{context}\n\n Answer the question based on the above article as concisely as you can, using a "
                  "single phrase or sentence if possible. If the question cannot be answered based on the "
                  "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
                  "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\n"
                  "Answer:", 128, "qa_f1"),
    LongBenchTask("multifieldqa_en", "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the "
                  "following question based on the above text, only give me the answer and do not output any other "
                  "words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1"),
    LongBenchTask("hotpotqa", _PASSAGES_QA, 32, "qa_f1"),
    LongBenchTask("2wikimqa", _PASSAGES_QA, 32, "qa_f1"),
    LongBenchTask("musique", _PASSAGES_QA, 32, "qa_f1"),
    LongBenchTask("gov_report", "You are given a report by a government agency. Write a one-page summary of the "
                  "report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
                  512, "rouge_l"),
    LongBenchTask("qmsum", "You are given a meeting transcript and a query containing a question or instruction. "
                  "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query "
                  "based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
                  512, "rouge_l"),
    LongBenchTask("multi_news", "You are given several news passages. Write a one-page summary of all news. \n\n"
                  "News:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l"),
    LongBenchTask("trec", "Please determine the type of the question below. Here are some examples of questions."
                  "\n\n{context}\n{input}", 64, "classification", first_line=True),
    LongBenchTask("triviaqa", "Answer the question based on the given passage. Only give me the answer and do not "
                  "output any other words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1",
                  first_line=True),
    LongBenchTask("samsum", "Summarize the dialogue into a few short sentences. The following are some examples."
                  "\n\n{context}\n\n{input}", 128, "rouge_l", first_line=True, newline_stops=True),
    LongBenchTask("passage_count", "There are some paragraphs below sourced from Wikipedia. Some of them may be "
                  "duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there "
                  "are after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                  "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                  "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\n"
                  "The final answer is: ", 32, "count"),
    LongBenchTask("passage_retrieval_en", "Here are 30 paragraphs from Wikipedia, along with an abstract. Please "
                  "determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
                  "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                  "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ", 32, "retrieval"),
    LongBenchTask("lcc", _CODE, 64, "edit_similarity"),
    LongBenchTask("repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n",
                  64, "edit_similarity"),
)}


# LongBench-E: the tasks with a length-balanced test set, read from <task>_e.jsonl (pred.py's list).
LONGBENCH_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
               "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")


def task_spec(name: str) -> LongBenchTask:
    """A LongBench task by name (``<task>_e`` for LongBench-E's data of that task), or
    ``NAME:METRIC`` for a local dataset with the generic template."""
    if ":" in name:
        base, metric = name.split(":", 1)
        return LongBenchTask(base, GENERIC_TEMPLATE, 64, check_metric(metric))
    if name.endswith("_e") and name[:-2] in LONGBENCH_E:
        return dataclasses.replace(TASKS[name[:-2]], name=name)
    if name not in TASKS:
        raise UnknownTaskError(f"unknown LongBench task '{name}' (known: {', '.join(TASKS)}, and <task>_e for "
                               f"LongBench-E's {', '.join(LONGBENCH_E)}; other local datasets as NAME:METRIC)")
    return TASKS[name]


def load_samples(directory: str, task: LongBenchTask, limit: Optional[int] = None) -> List[dict]:
    """The first ``limit`` samples of ``DIR/<task>.jsonl``."""
    path = os.path.join(directory, f"{task.name}.jsonl")
    if not os.path.isfile(path):
        raise DatasetMissingError(f"LongBench task {task.name}: {path} not found (nothing is downloaded; copy "
                                  f"LongBench's data/{task.name}.jsonl into {directory})")
    samples = []
    for number, sample in json_objects(path):
        missing = [k for k in ("context", "input", "answers") if k not in sample]
        if missing:
            raise DatasetMissingError(f"{path} line {number} lacks {', '.join(missing)}")
        # a number where text belongs would be formatted into the prompt, a string of answers
        # scored letter by letter: the fields' types are checked, naming the line
        where = f"{path} line {number}"
        typed_fields(sample, {"context": str, "input": str, "answers": list, "length": int}, where)
        if sample.get("all_classes") is not None:
            typed_fields(sample, {"all_classes": list}, where)
        if not all(isinstance(answer, str) for answer in sample["answers"]):
            raise DatasetMissingError(f"{where}: answers must be a list of strings, got {sample['answers']!r:.80}")
        samples.append(sample)
        if limit is not None and len(samples) == limit:
            break
    if not samples:
        raise DatasetMissingError(f"{path} holds no samples")
    return samples


def middle_truncate(tokens: Sequence[int], limit: int) -> List[int]:
    """The first and last ``int(limit/2)`` tokens when longer than ``limit`` (pred.py keeps
    ``limit - 1`` of them for an odd limit)."""
    if len(tokens) <= limit:
        return list(tokens)
    half = limit // 2
    return list(tokens[:half]) + list(tokens[len(tokens) - half:])


def bucket_label(length: int, bounds: Sequence[int]) -> str:
    """LongBench-E's bucket name for a sample of ``length`` words: "0-4k", "4-8k", "8k+" for
    bounds (4000, 8000); "0-300", "300+" for bounds that are not whole thousands."""
    edges = [0, *bounds]
    thousands = all(edge % 1000 == 0 for edge in edges)
    unit = "k" if thousands else ""
    name = (lambda edge: str(edge // 1000)) if thousands else str
    for low, high in zip(edges, bounds):
        if length < high:
            return f"{name(low)}-{name(high)}{unit}"
    return f"{name(edges[-1])}{unit}+"


def longbench_table(model, tasks: Sequence[str], directory: str, patterns: Sequence, tokenizer=None,
                    limit: Optional[int] = None, buckets: Sequence[int] = (4000, 8000), batch_size: int = 4,
                    max_length: Optional[int] = None, max_new_tokens: Optional[int] = None) -> List[dict]:
    """Rows {pattern, task, metric, length, samples, budget, score} per task, pattern and
    LongBench-E bucket of the samples' ``length`` field (``length`` "all" for the whole task;
    buckets only when every sample has the field). ``max_length`` is the truncation budget
    (default the context minus 500); a task whose budget plus generation would pass the model's
    context gets the smaller budget that fits, shown in ``budget``. ``max_new_tokens``
    overrides every task's generation budget (quick runs; the scores are then not LongBench's)."""
    tokenizer = tokenizer or ByteTokenizer()
    context = model.config.seq_length
    specs = [task_spec(t) for t in tasks]
    if any(spec.metric == "rouge_l" for spec in specs):
        require("rouge", "LongBench's Rouge-L")
    data = {spec.name: load_samples(directory, spec, limit) for spec in specs}  # every file checked first
    budget = context - CONTEXT_MARGIN if max_length is None else max_length
    if budget < 2:
        raise ContextLengthError(f"LongBench's truncation budget of {budget} tokens (default: the model's context of "
                                 f"{context} minus {CONTEXT_MARGIN}) leaves no prompt; set one with "
                                 f"--longbench-max-length")
    order = [bucket_label(edge, buckets) for edge in (0, *buckets)]
    newline = tokenizer.encode("\n")[-1]
    rows = []
    for spec in specs:
        if max_new_tokens:
            spec = dataclasses.replace(spec, max_new_tokens=max_new_tokens)
        room = min(budget, context - spec.max_new_tokens)
        if room < 2:
            raise ContextLengthError(f"LongBench task {spec.name} generates up to {spec.max_new_tokens} tokens, "
                                     f"which leaves no prompt in the model's maximum length of {context}")
        samples = data[spec.name]
        prompts = [middle_truncate(tokenizer.encode(spec.template.format(**s)), room) for s in samples]
        classes = samples[-1].get("all_classes") or ()  # eval.py scores every sample with the file's last list
        lengths = [s.get("length") for s in samples]
        for pattern in patterns:
            with evaluating(model, pattern):
                outputs = greedy_until(model, prompts, tokenizer.decode, spec.max_new_tokens, context,
                                       stop_tokens=[tokenizer.eod] + [newline] * spec.newline_stops,
                                       batch_size=batch_size, min_new_tokens=int(spec.newline_stops))
            scores = []
            for output, sample in zip(outputs, samples):
                if spec.first_line:
                    output = output.lstrip("\n").split("\n")[0]
                scores.append(score(spec.metric, output, sample["answers"], all_classes=classes))
            groups = {"all": scores}
            if None not in lengths:
                labels = [bucket_label(n, buckets) for n in lengths]
                groups.update((label, [v for v, other in zip(scores, labels) if other == label])
                              for label in order if label in labels)
            for label, values in groups.items():
                rows.append(dict(pattern=str(pattern), task=spec.name, metric=spec.metric, length=label,
                                 samples=len(values), budget=room, score=sum(values) / len(values)))
    return rows


def longbench_report(rows: Sequence[dict]) -> List[dict]:
    """One line per pattern and task as LongBench reports it (eval.py's result.json): scores
    x100 rounded to two decimals, the whole task under ``score`` and one column per bucket
    (None where a task has no sample in it; LongBench-E prints NaN)."""
    buckets = list(dict.fromkeys(r["length"] for r in rows if r["length"] != "all"))
    lines = {}
    for r in rows:
        line = lines.setdefault((r["pattern"], r["task"]), dict.fromkeys(
            ["pattern", "task", "metric", "samples", "budget", "score", *buckets]))
        line.update(pattern=r["pattern"], task=r["task"], metric=r["metric"], budget=r["budget"])
        if r["length"] == "all":
            line.update(samples=r["samples"], score=round(100 * r["score"], 2))
        else:
            line[r["length"]] = round(100 * r["score"], 2)
    return list(lines.values())
