"""Evaluation pieces: perplexity per pattern, table files and plot, pattern search, the eval suite's flags."""

import csv
import itertools
import json
import math

import pytest
import torch

from megatron_ratplus.config import preset
from megatron_ratplus.evaluation import (BudgetError, choose, format_table, mean_loss, perplexity_table,
                                         plot_perplexity_vs_dilation, search_patterns, write_table)
from megatron_ratplus.model import build_model, set_attention_pattern

VOCAB = 256


@pytest.fixture(scope="module")
def model(megatron_single):
    torch.manual_seed(0)
    return build_model(preset("tiny", num_layers=3, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
                              seq_length=256)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (4, 65), generator=torch.Generator().manual_seed(1))


def _reference_loss(model, tokens):
    with torch.no_grad():
        logits = model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1), None)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()


def test_perplexity_table_matches_cross_entropy(model, tokens, tmp_path):
    patterns = ["dense", "dilated:4", "dilated:16", "dilated:4,w=8", "dilated:16,w=8", "dense;dilated:4;dense"]
    rows = perplexity_table(model, tokens, patterns, batch_size=3)
    for row, pattern in zip(rows, patterns):
        set_attention_pattern(model, pattern)
        assert row.loss == pytest.approx(_reference_loss(model, tokens), rel=1e-5)
        assert row.perplexity == pytest.approx(math.exp(row.loss))
    assert rows[0].cache_fraction == 1.0 and rows[1].dilation == 4 and rows[3].window == 8
    assert rows[1].cache_fraction == pytest.approx((1 + 64 // 4) / 64)
    assert rows[5].dilation is None and rows[5].cache_fraction == pytest.approx((2 + 17 / 64) / 3)
    assert len({round(r.loss, 6) for r in rows}) > 1  # the pattern changes the model's output

    write_table(rows, str(tmp_path / "t.csv"))
    write_table(rows, str(tmp_path / "t.json"))
    with open(tmp_path / "t.csv") as f:
        back = list(csv.DictReader(f))
    assert [r["pattern"] for r in back] == [r.pattern for r in rows]
    assert float(back[2]["perplexity"]) == pytest.approx(rows[2].perplexity)
    assert json.load(open(tmp_path / "t.json"))[3]["window"] == 8
    text = format_table(rows, ["pattern", "perplexity"])
    assert text.count("\n") == len(rows) + 1 and "dilated:16,w=8" in text
    assert plot_perplexity_vs_dilation(rows, str(tmp_path / "p.png")) == 2  # no window, w=8
    assert open(tmp_path / "p.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=".csv or .json"):
        write_table(rows, str(tmp_path / "t.txt"))


def test_choose_is_the_exact_budgeted_optimum():
    gen = torch.Generator().manual_seed(2)
    sensitivity = torch.rand(5, 4, generator=gen).tolist()
    for row in sensitivity:
        row[0] = 0.0  # the dense candidate costs nothing in loss
    costs = [100, 30, 12, 5]
    for budget in (25, 60, 150, 300, 500):
        picks = choose(sensitivity, costs, budget)
        best = min((combo for combo in itertools.product(range(4), repeat=5)
                    if sum(costs[c] for c in combo) <= budget),
                   key=lambda combo: sum(sensitivity[i][c] for i, c in enumerate(combo)))
        assert sum(costs[c] for c in picks) <= budget
        assert sum(sensitivity[i][c] for i, c in enumerate(picks)) == pytest.approx(
            sum(sensitivity[i][c] for i, c in enumerate(best)))


def test_search_respects_budget_and_measured_sensitivities(model, tokens):
    result = search_patterns(model, tokens, budget_fraction=0.5, candidates=["dense", "dilated:4", "dilated:16"])
    assert result.cache_bytes <= result.budget_bytes == int(0.5 * result.dense_cache_bytes)
    picks = [result.candidates.index(p) for p in _per_layer(result.composition, 3)]
    options = [c for c in itertools.product(range(3), repeat=3)
               if sum(result.layer_bytes[i] for i in c) <= result.budget_bytes]
    best = min(sum(result.sensitivity[layer][c] for layer, c in enumerate(combo)) for combo in options)
    assert sum(result.sensitivity[layer][c] for layer, c in enumerate(picks)) == pytest.approx(best)
    # the sensitivities are real measurements: layer 1 alone at its candidate
    patterns = ["dense", "dilated:16", "dense"]
    assert result.sensitivity[1][2] == pytest.approx(mean_loss(model, tokens, patterns) - result.base_loss, abs=1e-6)
    assert result.measured_loss == pytest.approx(mean_loss(model, tokens, result.composition))
    assert result.composition in result.summary()
    with pytest.raises(BudgetError, match="below the cheapest composition"):
        search_patterns(model, tokens, budget_bytes=1000, candidates=["dense", "dilated:16"])


def _per_layer(composition, layers):
    from megatron_ratplus.patterns import parse_composition

    return [str(layer) for layer in parse_composition(composition).per_layer(layers)]


def test_eval_suite_runs_what_the_flags_ask(model, tokens, tmp_path):
    import argparse
    import io

    from megatron_ratplus.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--patterns")
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["--patterns", "dense,dilated:4,dilated:4,w=4,p=1", "--table", str(tmp_path / "t.json"),
                              "--plot", str(tmp_path / "p.png"), "--search-budget", "0.6",
                              "--search-candidates", "dense,dilated:8"])
    out = io.StringIO()
    results = eval_cli.run_suite(model, tokens, args, out=out)
    text = out.getvalue()
    assert "dilated:4,w=4,p=1" in text and "chosen composition:" in text
    assert [r["pattern"] for r in json.load(open(tmp_path / "t.json"))] == ["dense", "dilated:4", "dilated:4,w=4,p=1"]
    assert (tmp_path / "p.png").exists() and "ruler" not in results  # RULER: tests/test_ruler.py
    assert results["search"].cache_bytes <= 0.6 * results["search"].dense_cache_bytes
    bad = parser.parse_args(["--patterns", "dense", "--plot", str(tmp_path / "p.jpg")])
    with pytest.raises(ValueError, match="--plot .* must end in .png"):
        eval_cli.run_suite(model, tokens, bad)


def test_reproduce_claim_script_trains_three_recipes_and_writes_results(model, tokens, tmp_path, monkeypatch):
    """The claim script's flow with the trainer, checkpoint loader and data stood in for."""
    import importlib.util
    import os
    import sys
    import types

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "reproduce_claim.py")
    spec = importlib.util.spec_from_file_location("reproduce_claim", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = []

    def pretrain(argv):
        trained.append(argv)
        return argv[argv.index("--save") + 1]

    monkeypatch.setitem(sys.modules, "megatron_ratplus.training", types.SimpleNamespace(pretrain=pretrain))
    monkeypatch.setitem(sys.modules, "megatron_ratplus.checkpoint",
                        types.SimpleNamespace(load_model=lambda path, pattern=None: (model, model.config, None)))
    monkeypatch.setitem(sys.modules, "megatron_ratplus.data", types.SimpleNamespace(
        validation_windows=lambda tokenizer, seq_length, count: tokens[:count, :seq_length + 1]))
    out = tmp_path / "RESULTS.md"
    assert script.main(["--iters", "5", "--seq-length", "64", "--eval-windows", "2",
                        "--workdir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert [("--no-recurrence" in a, "--no-joint-training" in a) for a in trained] == [
        (True, True), (False, True), (False, False)]
    assert all(a[a.index("--train-iters") + 1] == "5" for a in trained)
    text = out.read_text()
    dense = mean_loss(model, tokens[:2], "dense")
    assert f"| (c) RAT+, joint training | {math.exp(dense):.2f} |" in text
    assert "`dilated:16,w=4,p=4`" in text and text.count("| (a) baseline") == 2
