"""Context-parallel building blocks with every CP rank simulated in one process.

The all-gather is replaced by a stack of all ranks' contributions; summing every rank's loss in
one graph then gives each input the gradient the real reduce-scatter would (the multi-process
runs are in test_parallel.py). Tolerances: fp32, atol 1e-5.
"""

import pytest
import torch

from megatron_ratplus.ops import gated_scan, pattern_attention
from megatron_ratplus.training.parallel_layout import validate_parallel_config, virtual_pipeline_size
from megatron_ratplus.layers.context_parallel.attention import attend_slices, pack_public
from megatron_ratplus.layers.context_parallel.layout import chunk_ids
from megatron_ratplus.layers.context_parallel.scan import compose_and_correct, scan_slices
from megatron_ratplus.patterns import parse_pattern


def to_ranks(x, size):
    """Split a global [T, ...] tensor into each rank's two load-balanced slices."""
    chunks = x.chunk(2 * size)
    return [torch.cat([chunks[a], chunks[b]]) for a, b in (chunk_ids(r, size) for r in range(size))]


def from_ranks(parts, size):
    chunks = [None] * (2 * size)
    for rank, part in enumerate(parts):
        for piece, chunk in enumerate(chunk_ids(rank, size)):
            chunks[chunk] = part.chunk(2)[piece]
    return torch.cat(chunks)


def test_layout_positions_follow_megatron():
    assert chunk_ids(1, 2) == (1, 2) and chunk_ids(0, 4) == (0, 7)
    assert from_ranks(to_ranks(torch.arange(16), 4), 4).tolist() == list(range(16))
    assert to_ranks(torch.arange(8), 2)[0].tolist() == [0, 1, 6, 7]


def simulated_cp_scan(x, g, h0, size):
    locals_ = [scan_slices(xr, gr) for xr, gr in zip(to_ranks(x, size), to_ranks(g, size))]
    summaries = torch.stack([summary for _, _, summary in locals_])  # the all-gather
    outs = [compose_and_correct(states, decays, summaries, h0, rank, size)
            for rank, (states, decays, _) in enumerate(locals_)]
    return from_ranks([h for h, _ in outs], size), [last for _, last in outs]


@pytest.mark.parametrize("size, seq", [(1, 8), (2, 12), (4, 40), (3, 30)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_cp_scan_matches_single_rank_scan(size, seq, with_h0):
    torch.manual_seed(size * 100 + seq)
    x = torch.randn(seq, 2, 3, requires_grad=True)
    g = torch.rand(seq, 2, 3).clamp(0.05, 0.95).requires_grad_()
    h0 = torch.randn(2, 3, requires_grad=True) if with_h0 else None
    weight = torch.randn(seq, 2, 3)
    w_last = torch.randn(2, 3)

    ref, ref_last = gated_scan(x, g, h0)
    inputs = [x, g] + ([h0] if with_h0 else [])
    ref_grads = torch.autograd.grad((ref * weight).sum() + (ref_last * w_last).sum(), inputs)

    out, lasts = simulated_cp_scan(x, g, h0, size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for last in lasts:  # every rank knows the global final state
        torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=1e-5)
    # the final state is used once (as on one rank), the states once per token
    grads = torch.autograd.grad((out * weight).sum() + (lasts[0] * w_last).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["dense", "dilated:16,w=8,p=2", "dilated:5,w=3,p=1", "local:w=4,p=2",
                                     "dilated:4,w=30", "dilated:64"])
@pytest.mark.parametrize("size, seq", [(2, 72), (4, 88), (3, 60), (2, 604)])  # slices 18, 11, 10, 151 (2 query blocks): not multiples of D
def test_cp_attention_matches_single_rank(pattern, size, seq):
    torch.manual_seed(seq)
    pattern = parse_pattern(pattern)
    q, k, v = (torch.randn(seq, 2, 3, 8, requires_grad=True) for _ in range(3))
    weight = torch.randn(seq, 2, 3, 8)
    ref = pattern_attention(q, k, v, pattern, 0.3)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))

    ks, vs, qs = to_ranks(k, size), to_ranks(v, size), to_ranks(q, size)
    public = torch.cat([pack_public(kr, vr, pattern, r, size) for r, (kr, vr) in enumerate(zip(ks, vs))])
    out = from_ranks([attend_slices(qs[r], ks[r], vs[r], public, pattern, r, size, 0.3) for r in range(size)], size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_dilated_exchange_is_d_times_smaller():
    k = torch.randn(2 * 512, 1, 1, 4)
    dense = pack_public(k, k, parse_pattern("dense"), 0, 2)
    sparse = pack_public(k, k, parse_pattern("dilated:16,w=8,p=2"), 0, 2)
    assert dense.shape[2] == 512  # dense: a full all-gather of the slice
    # chunk 0 = tokens 0..511: 2 sinks + 32 states 15, 31, .., 511 + the halo 504..510 (511 counted once)
    assert sparse.shape[2] == 2 + 32 + 7


@pytest.mark.parametrize("args, message", [
    (dict(world_size=4, tp=3), "not a multiple of tensor x pipeline x context"),
    (dict(world_size=8, tp=2, pp=3, num_layers=6), "world size 8 is not a multiple"),
    (dict(world_size=2, tp=2, num_heads=3), "heads (3) is not divisible by the tensor-parallel size (2)"),
    (dict(world_size=2, pp=2, num_layers=3), "layers (3) is not divisible by the pipeline stages (2)"),
    (dict(world_size=2, pp=2, vpp=2, num_layers=6), "pipeline stages x virtual stages (2 x 2 = 4)"),
    (dict(world_size=2, vpp=2, num_layers=4), "need a pipeline-parallel size of at least 2"),
    (dict(world_size=4, cp=4, seq_length=12), "sequence length (12) is not divisible by 2 x context-parallel size (8)"),
    (dict(world_size=0), "world size must be a positive integer"),
    (dict(world_size=2, sequence_parallel=True), "sequence parallelism needs a tensor-parallel size of at least 2"),
])
def test_bad_layouts_are_one_clear_error(args, message):
    with pytest.raises(ValueError) as err:
        validate_parallel_config(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_layout_returns_data_parallel_size():
    assert validate_parallel_config(16, tp=2, pp=2, cp=2, vpp=2, num_layers=8, num_heads=4, seq_length=64) == 2


def test_virtual_pipeline_size_from_layers_per_virtual_stage():
    assert virtual_pipeline_size(8, 2, 2) == 2 and virtual_pipeline_size(8, 2, None) is None
    for args in ((8, 2, 3), (8, 1, 2), (8, 2, 0)):
        with pytest.raises(ValueError, match="layers per virtual pipeline stage"):
            virtual_pipeline_size(*args)
