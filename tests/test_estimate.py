"""FLOPs, parameter and memory estimates (megatron_ratplus.flops, megatron_ratplus.estimate)."""

import importlib.util
import os

import pytest
import torch
from conftest import REPO

from megatron_ratplus.config import preset
from megatron_ratplus.flops import flops_per_token, iteration_flops, visible_keys
from megatron_ratplus.patterns import allowed_mask, parse_pattern


def small(**overrides):
    return preset("tiny", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                  vocab_size=100, seq_length=8, **overrides)


def test_flops_hand_computed():
    # d 64, 4 heads of 16, ffn 256, vocab 100, T 8, per layer and token (forward):
    # W_in 2*64*320 = 40960, W_out 2*64*64 = 8192, MLP 2*2*64*256 = 65536, scan 10*64 = 640
    # -> 115328; dense attention: 4 heads * 2*2*16 * mean(1..8) = 4*64*4.5 = 1152;
    # dilated:4 sees j = 3 and itself: keys 1,1,1,1,2,2,2,2 -> mean 1.5 -> 384; logits 2*64*100 = 12800.
    config = small()
    assert flops_per_token(config, "dense", 8, training=False) == 2 * (115328 + 1152) + 12800
    assert flops_per_token(config, "dense", 8) == 3 * 245760
    assert flops_per_token(config, "dilated:4", 8, training=False) == 2 * (115328 + 384) + 12800
    # A per-layer composition and a per-head one both count 1152 + 384 over the two layers.
    assert flops_per_token(config, "dense;dilated:4", 8, training=False) == 2 * 115328 + 1536 + 12800
    assert flops_per_token(config, "dense|dilated:4", 8, training=False) == 2 * 115328 + 1536 + 12800
    assert iteration_flops(config, ["dilated:4", "dense"], 16, 8) == 16 * 3 * (245760 + 244224)
    # The attention-only baseline: W_in d -> 4d, no scan.
    baseline = small(recurrence=False)
    assert flops_per_token(baseline, "dense", 8, training=False) == 2 * (32768 + 8192 + 65536 + 1152) + 12800


@pytest.mark.parametrize("text", ["dense", "dilated:4", "dilated:3,w=2,p=1", "dilated:5,w=7,p=9",
                                  "local:w=3", "local:w=2,p=3", "dilated:64,w=16,p=4"])
@pytest.mark.parametrize("seq", [1, 17, 96])
def test_visible_keys_match_the_mask(text, seq):
    pattern = parse_pattern(text)
    expected = allowed_mask(pattern, seq).sum(1).double().mean().item()
    assert visible_keys(pattern, seq) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["topk:k=2,block=4", "topk:k=1,block=4,d=2,w=3,p=1", "topk:k=3,block=8,w=2"])
def test_visible_keys_topk_bounds_the_selection(text):
    from megatron_ratplus.ops.topk import topk_allowed_mask

    pattern, seq = parse_pattern(text), 64
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, seq, 8), torch.randn(1, 2, seq, 8)
    measured = topk_allowed_mask(q, k, pattern).sum(-1).double().mean().item()
    estimate = visible_keys(pattern, seq)
    # The estimate adds window and sinks to the selected blocks; they may overlap.
    assert measured <= estimate + 1e-9
    assert estimate <= measured + pattern.window + 1 + pattern.sinks


@pytest.mark.parametrize("name", ["tiny", "1.5b", "2.6b", "7.6b"])
@pytest.mark.parametrize("recurrence", [True, False])
def test_parameters_equal_the_built_model(megatron_single, name, recurrence):
    """1- and 2-layer models at the preset's width: their difference is one layer, the rest is fixed."""
    from megatron_ratplus.estimate import parameters
    from megatron_ratplus.model import build_model

    built = {}
    for layers in (1, 2):
        model = build_model(preset(name, num_layers=layers, recurrence=recurrence, perform_initialization=False))
        built[layers] = sum(p.numel() for p in model.parameters())
        del model
    counts = parameters(preset(name, recurrence=recurrence))
    assert counts["per_layer"] == built[2] - built[1]
    assert counts["fixed"] == built[1] - (built[2] - built[1])
    assert counts["total"] == counts["fixed"] + preset(name).num_layers * counts["per_layer"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("micro_batch", [2])
def test_activation_estimate_matches_saved_tensors(megatron_single, micro_batch):
    from megatron_ratplus.estimate import Layout, memory_per_gpu
    from megatron_ratplus.model import build_model

    saved_activation_bytes = load_tool("bench_estimate").saved_activation_bytes

    config = preset("tiny")
    torch.manual_seed(0)
    model = build_model(config)
    tokens = torch.randint(0, config.vocab_size, (micro_batch, config.seq_length))
    measured = saved_activation_bytes(model, tokens)
    estimate = memory_per_gpu(config, Layout(), micro_batch, config.seq_length, bf16=False)
    assert abs(estimate.activations + estimate.logits - measured) / measured < 0.25


def test_report_refuses_what_does_not_fit():
    from megatron_ratplus.estimate import Layout, report

    config = preset("1.5b")
    layout = Layout(data=64, distributed_optimizer=True)
    text, fits, reason = report(config, layout, 8, 512, 47683)
    assert not fits and "exceeds 80 GB" in reason and "activations" in reason
    text, fits, reason = report(config, layout, 4, 512, 47683)
    assert fits and reason == "" and "1.475B" in text and "47683 iterations" in text
    # Full recomputation keeps only the layer inputs: micro-batch 8 then fits.
    assert report(config, layout, 8, 512, 47683, recompute=True)[1]
    _, fits, reason = report(config, layout, 3, 512, 10)
    assert not fits and "not divisible" in reason


def test_memory_scales_with_the_layout():
    from megatron_ratplus.estimate import Layout, memory_per_gpu

    config = preset("2.6b")
    one = memory_per_gpu(config, Layout(data=8), 2, 4096)
    tp = memory_per_gpu(config, Layout(tensor=2, data=4, sequence_parallel=True), 2, 4096)
    cp = memory_per_gpu(config, Layout(context=2, data=4), 2, 4096)
    dist = memory_per_gpu(config, Layout(data=8, distributed_optimizer=True), 2, 4096)
    assert tp.activations == pytest.approx(one.activations / 2) and tp.logits == pytest.approx(one.logits / 2)
    assert cp.activations == pytest.approx(one.activations / 2) and cp.weights == one.weights
    assert dist.optimizer == pytest.approx(one.optimizer / 8) and dist.gradients == one.gradients
    # 18 bytes per parameter without the distributed optimizer (bf16 weights, fp32 grads, fp32 Adam).
    assert one.weights + one.gradients + one.optimizer == pytest.approx(18 * 2.651e9, rel=0.01)


@pytest.mark.parametrize("args, code, needle", [
    (["--preset", "1.5b", "--gpus", "64", "--micro-batch-size", "4", "--train-tokens", "100000000000"], 0, "fits"),
    (["--preset", "1.5b", "--gpus", "64", "--micro-batch-size", "8", "--train-tokens", "100000000000"], 1,
     "does not fit"),
    (["--preset", "1.5b", "--gpus", "6", "--tensor-model-parallel-size", "4", "--train-iters", "1"], 2,
     "estimate.py: error: --gpus 6 is not a multiple"),
    (["--preset", "1.5b", "--sparse-pattern", "dilated:0", "--train-iters", "1"], 2, "estimate.py: error: "),
    (["--config", "/nonexistent.yaml"], 2, "estimate.py: error: config file not found"),
])
def test_estimate_cli(capsys, args, code, needle):
    assert load_tool("estimate").main(args) == code
    out = capsys.readouterr()
    assert needle in (out.out + out.err)
    if code == 2:
        assert out.err.count("\n") == 1 and "Traceback" not in out.err
