"""lm-evaluation-harness tasks at several attention patterns of one loaded model.

The model is loaded once and switched between patterns (no retraining, no reloading); each
pattern runs lm-eval's ``simple_evaluate`` on the ``ratplus`` model. Task names are checked
against lm-eval's task index first, and local data files named by a task's YAML are checked
to exist, so a typo or a missing file fails in one line before any evaluation runs.
"""

from __future__ import annotations

import difflib
import os
from typing import List, Optional, Sequence

from megatron_ratplus.errors import first_line
from megatron_ratplus.evaluation.errors import DatasetMissingError, UnknownTaskError
from megatron_ratplus.evaluation.results import from_lm_eval

OFFLINE_HINT = ("nothing can be downloaded here: fill the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) "
                "on a machine with a network and copy it over, or give a local task YAML (dataset_path: json, "
                "dataset_kwargs: data_files) through --lm-eval-include")


def task_manager(include_path: Optional[str] = None, include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.exists(include_path):
        raise DatasetMissingError(f"lm-eval task folder not found: {include_path}")
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _data_files(cfg: dict) -> List[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value)]
    return [files] if isinstance(files, str) else list(files)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """UnknownTaskError for a name lm-eval does not index; DatasetMissingError for a local data
    file a task's YAML names that is not there (``hf://`` and URLs are left to the hub client)."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known and not manager.match_tasks([task]):
            close = difflib.get_close_matches(task, known, n=3)
            raise UnknownTaskError(f"unknown lm-eval task '{task}'" + (f" (did you mean {', '.join(close)}?)"
                                                                        if close else ""))
        entry = manager.task_index.get(task)
        cfg = getattr(entry, "cfg", None) or {}
        missing = [f for f in _data_files(cfg) if "://" not in f and not os.path.exists(f)]
        if missing:
            where = getattr(entry, "yaml_path", "its YAML")
            raise DatasetMissingError(f"lm-eval task {task}: data file(s) {', '.join(missing)} named in {where} "
                                      f"not found")


def _dataset_of(tasks: Sequence[str], manager) -> str:
    names = []
    for task in tasks:
        cfg = getattr(manager.task_index.get(task), "cfg", None) or {}
        if cfg.get("dataset_path"):
            names.append(f"{task}: {cfg['dataset_path']}" + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name")
                                                             else ""))
    return "; ".join(names) or ", ".join(tasks)


def lm_eval_rows(model, tokenizer, tasks: Sequence[str], patterns: Sequence, manager=None,
                 limit: Optional[float] = None, num_fewshot: Optional[int] = None, batch_size: int = 16,
                 max_length: Optional[int] = None, truncate: bool = False) -> List[dict]:
    """Results-file rows (every metric of every task) for each pattern."""
    import lm_eval

    from megatron_ratplus.evaluation.lm_eval_model import RatPlusLM

    manager = manager or task_manager()
    check_tasks(tasks, manager)
    rows = []
    for pattern in patterns:
        lm = RatPlusLM(model=model, tokenizer=tokenizer, pattern=str(pattern), batch_size=batch_size,
                       max_length=max_length, truncate=truncate)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, bootstrap_iters=0)
        except (ConnectionError, FileNotFoundError) as err:  # datasets' DatasetNotFoundError is a FileNotFoundError
            raise DatasetMissingError(f"lm-eval dataset not available ({_dataset_of(tasks, manager)}): "
                                      f"{first_line(err)}; {OFFLINE_HINT}") from None
        if results is not None:  # None on ranks that do not report
            rows += from_lm_eval(results, lm.pattern)
    return rows


def pattern_columns(rows: Sequence[dict]) -> List[dict]:
    """{task, metric, <pattern>: value, ...}: one row per task metric, one column per pattern."""
    table = {}
    for row in rows:
        table.setdefault((row["task"], row["metric"]), {"task": row["task"], "metric": row["metric"]})[
            row["pattern"]] = row["value"]
    return list(table.values())
