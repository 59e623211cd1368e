"""``ratplus-eval report``: results files side by side, as the paper shows them.

A Markdown table with a row per checkpoint and pattern and a column per task (its chosen
metric, x100 for scores; perplexity as is) plus the average of the score columns, and PNG
plots: every column against the dilation D (one line per checkpoint and window setting,
dense drawn at D = 1 on each) and score against context length (one panel per checkpoint
and suite, one line per pattern, averaged over the suite's tasks).
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_ratplus.evaluation.errors import UnknownMetricError
from megatron_ratplus.evaluation.results import SUITES
from megatron_ratplus.patterns import PatternError, parse_pattern

PREFERRED_METRICS = ("acc", "exact_match", "string_match_all", "perplexity")
AVERAGE = "average"


def choose_metrics(results: Sequence[dict], overrides: Optional[Dict[str, str]] = None) -> Dict[Tuple, str]:
    """{(suite, task): metric} for the table: ``overrides[task]``, else the first of
    PREFERRED_METRICS the task has, else its first metric in alphabetical order."""
    found: Dict[Tuple, List[str]] = {}
    for result in results:
        for row in result["rows"]:
            metrics = found.setdefault((row["suite"], row["task"]), [])
            if row["metric"] not in metrics:
                metrics.append(row["metric"])
    overrides = dict(overrides or {})
    for task, metric in overrides.items():
        have = [m for (suite, t), ms in found.items() if t == task for m in ms]
        if not have:
            raise UnknownMetricError(f"--metric {task}={metric}: no task '{task}' in the results")
        if metric not in have:
            raise UnknownMetricError(f"unknown metric '{metric}' for task {task} (it has {', '.join(sorted(have))})")
    chosen = {}
    for key in sorted(found, key=lambda k: SUITES.index(k[0])):
        metrics = found[key]
        chosen[key] = overrides.get(key[1]) or next((m for m in PREFERRED_METRICS if m in metrics),
                                                    sorted(metrics)[0])
    return chosen


def table_rows(results: Sequence[dict], metrics: Dict[Tuple, str]) -> Tuple[List[str], List[dict]]:
    """(column names, rows {checkpoint, pattern, <column>: value, average}) from overall rows."""
    columns = [task if suite != "perplexity" else "perplexity" for suite, task in metrics]
    rows = []
    for result in results:
        by_pattern: Dict[str, dict] = {}
        for row in result["rows"]:
            key = (row["suite"], row["task"])
            if "length" in row or metrics.get(key) != row["metric"]:
                continue
            column = columns[list(metrics).index(key)]
            by_pattern.setdefault(row["pattern"], {"checkpoint": result["checkpoint"],
                                                   "pattern": row["pattern"]})[column] = row["value"]
        for line in by_pattern.values():
            scores = [line[c] for (suite, _), c in zip(metrics, columns) if suite != "perplexity" and c in line]
            line[AVERAGE] = sum(scores) / len(scores) if scores else None
            rows.append(line)
    return columns + [AVERAGE], rows


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """The table as Markdown: scores x100 with one decimal, perplexity with two."""
    def cell(column, value):
        if value is None:
            return "-"
        return f"{value:.2f}" if column == "perplexity" else f"{100 * value:.1f}"

    head = ["checkpoint", "pattern"] + list(columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row["checkpoint"], f"`{row['pattern']}`"] +
                                       [cell(c, row.get(c)) for c in columns]) + " |")
    return "\n".join(lines)


def _window_key(pattern: str):
    """(D, line label) of a single dilated/dense pattern, or None (compositions, local, top-k)."""
    try:
        p = parse_pattern(pattern)
    except PatternError:
        return None
    if p.kind not in ("dense", "dilated"):
        return None
    label = "no window" if not p.window and not p.sinks else f"w={p.window}, p={p.sinks}"
    return (1 if p.kind == "dense" else p.dilation), label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, panels: int, width: float = 4.2, height: float = 3.2):
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _shared_legend(fig, axes) -> None:
    """One legend under all panels (they share their lines), instead of one covering each panel."""
    labels = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    rows = math.ceil(len(labels) / 4)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    legend_inches = 0.2 + 0.22 * rows
    fig.tight_layout(rect=(0, legend_inches / fig.get_size_inches()[1], 1, 1))


def plot_metrics_vs_dilation(columns: Sequence[str], rows: Sequence[dict], path: str) -> int:
    """One panel per column: value against D (log 2), a line per checkpoint and window setting."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(columns))
    lines = 0
    for ax, column in zip(axes, columns):
        series: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        dense: Dict[str, float] = {}
        for row in rows:
            key = _window_key(row["pattern"])
            if key is None or row.get(column) is None:
                continue
            d, label = key
            if d == 1 and label == "no window":
                dense[row["checkpoint"]] = row[column]
            else:
                series.setdefault((row["checkpoint"], label), []).append((d, row[column]))
        for checkpoint in dense:  # a dense row alone still shows as a point
            series.setdefault((checkpoint, "no window"), [])
        for (checkpoint, label), points in sorted(series.items()):
            points = sorted(([(1, dense[checkpoint])] if checkpoint in dense else []) + points)
            scale = 1 if column == "perplexity" else 100
            ax.plot([d for d, _ in points], [v * scale for _, v in points], marker="o",
                    label=f"{checkpoint}, {label}" if len({c for c, _ in series}) > 1 else label)
            lines += 1
        ax.set_xscale("log", base=2)
        ticks = sorted({d for points in series.values() for d, _ in points} | ({1} if dense else set()))
        ax.set_xticks(ticks, [str(d) for d in ticks])
        ax.set_xlabel("dilation D")
        ax.set_ylabel("perplexity" if column == "perplexity" else "score (%)")
        ax.set_title(column)
        ax.grid(True, alpha=0.3)
    _shared_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines


def _length_value(length) -> float:
    """Sort key of a context length or a bucket label ("<4000" before "4000-8000" before ">=8000")."""
    if isinstance(length, (int, float)):
        return float(length)
    text = str(length)
    digits = re.findall(r"\d+", text)
    return 0.0 if text.startswith("<") or not digits else float(digits[0]) + (0.5 if text.startswith(">") else 0)


def plot_accuracy_vs_length(results: Sequence[dict], metrics: Dict[Tuple, str], path: str) -> int:
    """One panel per checkpoint and suite with per-length rows: the mean over the suite's tasks
    against context length (or length bucket), a line per pattern. Returns the panels drawn."""
    panels: Dict[Tuple[str, str], Dict[str, Dict]] = {}
    for result in results:
        for row in result["rows"]:
            if "length" not in row or metrics.get((row["suite"], row["task"])) != row["metric"]:
                continue
            lengths = panels.setdefault((result["checkpoint"], row["suite"]), {}).setdefault(row["pattern"], {})
            lengths.setdefault(row["length"], []).append(row["value"])
    if not panels:
        return 0
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, ((checkpoint, suite), patterns) in zip(axes, panels.items()):
        ticks = sorted({length for lengths in patterns.values() for length in lengths}, key=_length_value)
        numeric = all(isinstance(t, (int, float)) for t in ticks)
        for pattern, lengths in patterns.items():
            xs = sorted(lengths, key=_length_value)
            ax.plot([x if numeric else ticks.index(x) for x in xs],
                    [100 * sum(lengths[x]) / len(lengths[x]) for x in xs], marker="o", label=pattern)
        if numeric:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
        else:
            ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-5, 105)
        ax.set_title(f"{checkpoint}: {suite}")
        ax.grid(True, alpha=0.3)
    _shared_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(panels)


def write_report(results: Sequence[dict], directory: str, overrides: Optional[Dict[str, str]] = None) -> List[str]:
    """report.md and its PNGs in ``directory`` (created); returns the written paths."""
    os.makedirs(directory, exist_ok=True)
    metrics = choose_metrics(results, overrides)
    columns, rows = table_rows(results, metrics)
    written = []
    figures = []
    dilation_png = os.path.join(directory, "metrics_vs_dilation.png")
    plot_metrics_vs_dilation(columns, rows, dilation_png)
    figures.append(("Each column against the dilation D", dilation_png))
    length_png = os.path.join(directory, "accuracy_vs_length.png")
    if plot_accuracy_vs_length(results, metrics, length_png):
        figures.append(("Score against context length, per pattern", length_png))
    chosen = ", ".join(f"{task}: {metric}" for (_, task), metric in metrics.items())
    text = ["# Evaluation report", "",
            f"Checkpoints: {', '.join(r['checkpoint'] for r in results)}. Metrics: {chosen}. "
            "Scores x100; the average is over the score columns (perplexity excluded).", "",
            markdown_table(columns, rows), ""]
    for title, png in figures:
        text += [f"## {title}", "", f"![{title}]({os.path.basename(png)})", ""]
        written.append(png)
    report = os.path.join(directory, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(text))
    return [report] + written
