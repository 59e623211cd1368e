"""Writing evaluation tables: console text, CSV or JSON files, and the perplexity-vs-D plot."""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence


def _as_dicts(rows):
    return [row.as_dict() if hasattr(row, "as_dict") else dict(row) for row in rows]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_table(rows, columns: Sequence[str] = None) -> str:
    """A fixed-width text table (also valid Markdown) of the rows' columns."""
    rows = _as_dicts(rows)
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def write_table(rows, path: str) -> None:
    """CSV or JSON, chosen by the file extension."""
    rows = _as_dicts(rows)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    elif ext == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"table file '{path}' must end in .csv or .json")


def plot_perplexity_vs_dilation(rows, path: str, title: str = "RAT+ sparse inference") -> int:
    """PNG: perplexity against D (log scale), one line without a window and one per (W, P).

    Dense counts as D = 1 on every line; compositions and top-k rows are left out. Returns the
    number of lines drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _as_dicts(rows) if r.get("dilation")]
    dense = [r for r in rows if r["dilation"] == 1 and not r["window"] and not r["sinks"]]
    series = {}
    for r in rows:
        if r["dilation"] > 1:
            key = "no window" if not r["window"] and not r["sinks"] else f"w={r['window']}, p={r['sinks']}"
            series.setdefault(key, []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(series.items(), key=lambda item: item[0] != "no window"):
        points = sorted(dense[:1] + points, key=lambda r: r["dilation"])
        ax.plot([r["dilation"] for r in points], [r["perplexity"] for r in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("dilation D")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(series)
