"""FLOPs, parameter and memory estimates (megatron_ratplus.flops, megatron_ratplus.estimate)."""

import pytest
import torch

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
