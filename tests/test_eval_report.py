"""ratplus-eval report: results files -> the paper-style Markdown table and PNG plots."""

import json

import pytest

from megatron_ratplus.cli.eval import main
from megatron_ratplus.evaluation.errors import UnknownMetricError
from megatron_ratplus.evaluation.paper_report import choose_metrics, table_rows, write_report
from megatron_ratplus.evaluation.results import from_lm_eval, from_ruler, read_results, write_results

PATTERNS = ["dense", "dilated:16", "dilated:64", "dilated:16,w=8,p=2", "cycle(dense;dilated:16)"]


def _results(tmp_path, name, shift):
    rows = []
    for i, pattern in enumerate(PATTERNS):
        rows.append(dict(suite="perplexity", task="validation", metric="perplexity", pattern=pattern,
                         value=10.0 + i + shift))
        lm = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.5 + 0.05 * i - shift,
                                   "acc_stderr,none": 0.01, "acc_norm,none": 0.4 + 0.01 * i}}}
        rows += from_lm_eval(lm, pattern)
        rows += from_ruler([dict(pattern=pattern, task="niah_single_1", context_length=n, accuracy=a - 0.1 * i,
                                     metric="string_match_all")
                            for n, a in ((128, 1.0), (256, 0.8))])
        rows.append(dict(suite="longbench", task="hotpotqa", metric="qa_f1", pattern=pattern, value=0.2,
                         length="<4000"))
        rows.append(dict(suite="longbench", task="hotpotqa", metric="qa_f1", pattern=pattern, value=0.2))
    path = tmp_path / f"{name}.json"
    write_results(str(path), name, rows)
    return str(path)


def test_report_table_and_plots(tmp_path):
    paths = [_results(tmp_path, "ckpt_a", 0.0), _results(tmp_path, "ckpt_b", 0.1)]
    results = [read_results(p) for p in paths]
    metrics = choose_metrics(results)
    assert metrics[("lm_eval", "piqa")] == "acc" and metrics[("ruler", "niah_single_1")] == "string_match_all"
    columns, rows = table_rows(results, metrics)
    assert columns == ["perplexity", "piqa", "niah_single_1", "hotpotqa", "average"]
    assert len(rows) == 2 * len(PATTERNS) and rows[1]["checkpoint"] == "ckpt_a"
    # dilated:16 of ckpt_a: piqa 0.55, niah mean over lengths (0.9 + 0.7) / 2 = 0.8, hotpotqa 0.2
    assert rows[1]["niah_single_1"] == pytest.approx(0.8)
    assert rows[1]["average"] == pytest.approx((0.55 + 0.8 + 0.2) / 3)

    written = write_report(results, str(tmp_path / "out"), {"piqa": "acc_norm"})
    text = open(written[0]).read()
    assert "| ckpt_b | `dilated:64` | 12.10 | 42.0 | 70.0 | 20.0 | 44.0 |" in text  # acc_norm 0.42, niah 0.7
    pngs = [p for p in written if p.endswith(".png")]
    assert sorted(p.rsplit("/", 1)[1] for p in pngs) == ["accuracy_vs_length.png", "metrics_vs_dilation.png"]
    for png in pngs:
        data = open(png, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    with pytest.raises(UnknownMetricError, match="unknown metric 'f1' for task piqa \\(it has acc, acc_norm\\)"):
        choose_metrics(results, {"piqa": "f1"})


def test_report_cli_and_bad_input(tmp_path, capsys):
    path = _results(tmp_path, "ckpt", 0.0)
    assert main(["report", path, "--output", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists()
    assert main(["report", path, "--output", str(tmp_path / "r"), "--metric", "piqa=bleu"]) == 2
    assert main(["report", str(tmp_path / "missing.json"), "--output", str(tmp_path / "r")]) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"suite": "x"}]}))
    assert main(["report", str(tmp_path / "bad.json"), "--output", str(tmp_path / "r")]) == 2
    assert main(["--load", str(tmp_path), "--longbench", "hotpotqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ratplus-eval: error: unknown metric 'bleu' for task piqa (it has acc, acc_norm)",
                   f"ratplus-eval: error: results file not found: {tmp_path / 'missing.json'}",
                   f"ratplus-eval: error: {tmp_path / 'bad.json'} is not a ratplus-eval results file (KeyError: "
                   "'suite x')",
                   "ratplus-eval: error: --longbench needs --longbench-dir (the folder of LongBench's <task>.jsonl "
                   "files)"]
