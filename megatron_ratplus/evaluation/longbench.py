"""A LongBench-style runner over local files in LongBench's JSONL format.

Each task reads ``DIR/<task>.jsonl`` (one object per line with ``context``, ``input``,
``answers`` and, for trec, ``all_classes``; the layout of LongBench's ``data/`` folder),
fills the task's prompt template, truncates prompts longer than the model allows in the
middle (the first and last halves kept, as LongBench does, since instructions sit at both
ends), decodes greedily through the sparse decode cache and scores the official per-task
metric, best over the reference answers. Scores are in [0, 1] (LongBench prints x100), per
task and per bucket of the untruncated prompt length (LongBench-E's 0-4k / 4-8k / 8k+ by default).

The English tasks' templates, generation budgets and metrics follow LongBench's configuration
(``config/dataset2prompt.json``, ``dataset2maxlen.json`` and ``metrics.py``); ``{context}`` and
``{input}`` are the sample's fields. Any other local dataset in the same format runs as
``NAME:METRIC`` with the generic template ``{context}\\n\\nQuestion: {input}\\nAnswer:``.
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
from megatron_ratplus.userfiles import json_objects

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


TASKS: Dict[str, LongBenchTask] = {t.name: t for t in (
    LongBenchTask("narrativeqa", "You are given a story, which can be either a novel or a movie script, and a "
                  "question. Answer the question as concisely as you can, using a single phrase if possible. Do not "
                  "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as "
                  "concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
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
                  "\n\n{context}\n\n{input}", 128, "rouge_l", first_line=True),
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


def task_spec(name: str) -> LongBenchTask:
    """A LongBench task by name, or ``NAME:METRIC`` for a local dataset with the generic template."""
    if ":" in name:
        base, metric = name.split(":", 1)
        return LongBenchTask(base, GENERIC_TEMPLATE, 64, check_metric(metric))
    if name not in TASKS:
        raise UnknownTaskError(f"unknown LongBench task '{name}' (known: {', '.join(TASKS)}; other local "
                               f"datasets as NAME:METRIC)")
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
        samples.append(sample)
        if limit is not None and len(samples) == limit:
            break
    if not samples:
        raise DatasetMissingError(f"{path} holds no samples")
    return samples


def middle_truncate(tokens: Sequence[int], limit: int) -> List[int]:
    """The first and last halves of ``tokens`` when longer than ``limit``."""
    if len(tokens) <= limit:
        return list(tokens)
    head = limit // 2
    return list(tokens[:head]) + list(tokens[len(tokens) - (limit - head):])


def bucket_label(length: int, bounds: Sequence[int]) -> str:
    """``<b0``, ``b0-b1``, ..., ``>=bn`` for a prompt of ``length`` tokens."""
    if length < bounds[0]:
        return f"<{bounds[0]}"
    for low, high in zip(bounds, bounds[1:]):
        if length < high:
            return f"{low}-{high}"
    return f">={bounds[-1]}"


def longbench_table(model, tasks: Sequence[str], directory: str, patterns: Sequence, tokenizer=None,
                    limit: Optional[int] = None, buckets: Sequence[int] = (4000, 8000), batch_size: int = 4,
                    max_length: Optional[int] = None, max_new_tokens: Optional[int] = None) -> List[dict]:
    """Rows {pattern, task, metric, length, samples, score} per task, pattern and length bucket
    (``length`` "all" for the whole task). ``max_new_tokens`` overrides every task's budget
    (quick runs; the scores are then not LongBench's)."""
    tokenizer = tokenizer or ByteTokenizer()
    max_length = max_length or model.config.seq_length
    specs = [task_spec(t) for t in tasks]
    data = {spec.name: load_samples(directory, spec, limit) for spec in specs}  # every file checked first
    rows = []
    for spec in specs:
        if max_new_tokens:
            spec = dataclasses.replace(spec, max_new_tokens=max_new_tokens)
        room = max_length - spec.max_new_tokens
        if room < 2:
            raise ContextLengthError(f"LongBench task {spec.name} generates up to {spec.max_new_tokens} tokens, "
                                     f"which leaves no prompt in the model's maximum length of {max_length}")
        full = [tokenizer.encode(spec.template.format(context=s["context"], input=s["input"]))
                for s in data[spec.name]]
        prompts = [middle_truncate(p, room) for p in full]
        labels = [bucket_label(len(p), buckets) for p in full]
        for pattern in patterns:
            with evaluating(model, pattern):
                outputs = greedy_until(model, prompts, tokenizer.decode, spec.max_new_tokens, max_length,
                                       stop_tokens=[tokenizer.eod], batch_size=batch_size)
            scores = []
            for output, sample in zip(outputs, data[spec.name]):
                if spec.first_line:
                    output = output.lstrip("\n").split("\n")[0]
                scores.append(score(spec.metric, output, sample["answers"],
                                    all_classes=sample.get("all_classes") or ()))
            groups = {"all": scores}
            for label, value in zip(labels, scores):
                groups.setdefault(label, []).append(value)
            for label, values in groups.items():
                rows.append(dict(pattern=str(pattern), task=spec.name, metric=spec.metric, length=label,
                                 samples=len(values), score=sum(values) / len(values)))
    return rows
