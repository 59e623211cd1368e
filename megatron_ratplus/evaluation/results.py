"""The results file every suite writes and ``ratplus-eval report`` reads.

One JSON object per evaluated checkpoint::

    {"checkpoint": "ratplus-124m", "rows": [
        {"suite": "lm_eval", "task": "piqa", "metric": "acc", "pattern": "dilated:16", "value": 0.61},
        {"suite": "ruler", "task": "niah_single_1", "metric": "string_match_all", "pattern": "dense",
         "length": 1024, "value": 0.75}, ...]}

``length`` is present for per-length rows (a RULER context length or a LongBench length
bucket); rows without it are the task's overall score. Perplexity rows (metric
"perplexity") are the only ones where lower is better.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

from megatron_ratplus.errors import first_line
from megatron_ratplus.evaluation.errors import DatasetMissingError, EvaluationError

SUITES = ("perplexity", "lm_eval", "ruler", "longbench")


def _row(suite, task, metric, pattern, value, length=None) -> dict:
    row = dict(suite=suite, task=task, metric=metric, pattern=str(pattern), value=float(value))
    if length is not None:
        row["length"] = length
    return row


def from_perplexity(rows) -> List[dict]:
    return [_row("perplexity", "validation", "perplexity", r.pattern, r.perplexity) for r in rows]


def from_ruler(rows) -> List[dict]:
    """Per-length rows as measured, plus each task's mean over lengths (RULER's average over
    tasks is the mean of a pattern's task rows)."""
    out = [_row("ruler", r["task"], r["metric"], r["pattern"], r["accuracy"], r["context_length"]) for r in rows]
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["metric"], r["pattern"]), []).append(r["accuracy"])
    return out + [_row("ruler", task, metric, pattern, sum(v) / len(v))
                  for (task, metric, pattern), v in groups.items()]


def from_longbench(rows) -> List[dict]:
    return [_row("longbench", r["task"], r["metric"], r["pattern"], r["score"],
                 None if r["length"] == "all" else r["length"]) for r in rows]


def from_lm_eval(results: dict, pattern) -> List[dict]:
    """Every metric of every task in lm-eval's ``results`` (stderr entries and groups' aliases dropped)."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            rows.append(_row("lm_eval", task, name, pattern, value))
    return rows


def write_results(path: str, checkpoint: str, rows: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": checkpoint, "rows": rows}, f, indent=1)


def read_results(path: str, name: Optional[str] = None) -> dict:
    """A results file; DatasetMissingError (one line) if it is missing or not one."""
    if not os.path.isfile(path):
        raise DatasetMissingError(f"results file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        rows = data["rows"]
        for row in rows:
            if row["suite"] not in SUITES:
                raise KeyError(f"suite {row['suite']}")
            row["value"] = float(row["value"])
            row["task"], row["metric"], row["pattern"] = str(row["task"]), str(row["metric"]), str(row["pattern"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvaluationError(f"{path} is not a ratplus-eval results file ({type(err).__name__}: "
                                  f"{first_line(err)})") from None
    return {"checkpoint": name or str(data.get("checkpoint") or os.path.splitext(os.path.basename(path))[0]),
            "rows": rows}
