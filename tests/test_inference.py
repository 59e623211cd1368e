"""Sparse-cache decoding: step decode equals the full forward, cache size equals the formula,
ragged batches equal one-by-one generation, sampling and input checks."""

import pytest
import torch

from megatron_ratplus.config import preset
from megatron_ratplus.inference import (CacheFullError, DecodeSession, GenerationError, SamplingConfig,
                                        generate, sample)
from megatron_ratplus.model import build_model, set_attention_pattern
from megatron_ratplus.ops import pattern_attention
from megatron_ratplus.patterns import PatternError, parse_pattern

VOCAB, HEADS, HEAD_DIM, LAYERS = 96, 4, 16, 2
TOL = dict(atol=2e-5, rtol=1e-4)  # fp32: the decode recurrence sums in another order than the chunked scan


@pytest.fixture(scope="module")
def model(megatron_single):
    torch.manual_seed(0)
    config = preset("tiny", num_layers=LAYERS, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                    vocab_size=VOCAB, seq_length=64)
    return build_model(config).eval()


def _full_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


PATTERNS = [
    "dense", "dilated:4", "dilated:4,w=3", "dilated:4,w=3,p=2", "dilated:5,p=3", "local:w=5", "local:w=2,p=1",
    "dense;dilated:3,w=1",                       # hybrid per layer
    "cycle(dilated:8)",
    "dense|dilated:4,w=1",                       # hybrid per head
    "1*local:w=3|3*dilated:6,p=1;dilated:2",     # per head and per layer
    "topk:k=2,block=3", "topk:k=1,block=2,d=2,w=1,p=1,pool=max",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_step_decode_equals_full_forward(model, pattern):
    """Prefill ragged prompts, then feed the rest token by token: every position's logits match."""
    _check_step_decode(model, pattern, _full_logits)


@pytest.mark.slow  # the interpreter runs every kernel of prefill and 23 steps
def test_step_decode_with_the_triton_kernels_equals_the_reference_forward(model, monkeypatch):
    """The same with RATPLUS_KERNELS=triton (the kernels in Triton's interpreter: the scan, the
    pattern attention in prefill, the decode kernel in every step) against the reference forward."""
    from ratplus_kernels import decode

    calls = []
    kernel = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setenv("RATPLUS_KERNELS", "triton")
    _check_step_decode(model, "dilated:4,w=3,p=2", lambda model, tokens: _reference_logits(model, tokens, monkeypatch))
    assert len(calls) == LAYERS * (37 - 14)  # every layer of every step


def _reference_logits(model, tokens, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("RATPLUS_KERNELS", "reference")
        return _full_logits(model, tokens)


def _check_step_decode(model, pattern, full_logits):
    set_attention_pattern(model, pattern)
    gen = torch.Generator().manual_seed(1)
    seq = 37
    tokens = torch.randint(0, VOCAB, (3, seq), generator=gen)
    full = full_logits(model, tokens)
    lengths = torch.tensor([9, 2, 14])
    padded = tokens.clone()
    for b, n in enumerate(lengths):
        padded[b, n:] = 0  # padding must not leak into the cache
    with DecodeSession(model, 3, seq) as session:
        prefill = session.prefill(padded[:, :int(lengths.max())], lengths)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(prefill[b, :n], full[b, :n], **TOL)
        pos = lengths.clone()  # each sequence's next position: they stay ragged
        for _ in range(seq - int(lengths.max())):
            step = session.step(tokens[torch.arange(3), pos])
            for b in range(3):
                torch.testing.assert_close(step[b], full[b, pos[b]], **TOL, msg=f"seq {b} pos {int(pos[b])}")
            pos += 1


CHUNKED = ["dense", "dilated:4,w=3,p=2", "dilated:3", "local:w=5", "local:w=2,p=1", "dense|dilated:4,w=1",
           "topk:k=1,block=2"]


@pytest.mark.parametrize("pattern", CHUNKED)
def test_chunked_prefill_equals_one_shot_prefill(model, pattern):
    """A prompt prefilled in uneven chunks (chunks of 1, boundaries off the multiples of D, two
    rows continued together at different positions) gives every chunk position the one-shot
    prefill's logits, and the same greedy decode after it."""
    _check_chunked_prefill(model, pattern)


@pytest.mark.parametrize("lengths", [[11, 11], [11, 4]])
def test_last_only_prefill_equals_the_last_positions(model, lengths):
    """``last_only`` gives each prompt's last logits, whole and continued in a second chunk: with
    one length through megatron's last-position projection (the output layer sees one position),
    ragged by gathering; the caches it leaves decode the same next step."""
    set_attention_pattern(model, "dilated:4,w=3,p=2")
    tokens = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(8))
    lengths = torch.tensor(lengths)
    projected = []
    hook = model.output_layer.register_forward_hook(lambda mod, args, out: projected.append(args[0].shape[0]))
    try:
        with DecodeSession(model, 2, 20) as every, DecodeSession(model, 2, 20) as last:
            full = every.prefill(tokens[:, :int(lengths.max())], lengths)
            got = last.prefill(tokens[:, :int(lengths.max())], lengths, last_only=True)
            torch.testing.assert_close(got, full[torch.arange(2), lengths - 1], **TOL)
            assert projected[-1] == (1 if len(set(lengths.tolist())) == 1 else int(lengths.max()))
            more = torch.tensor([4, 4])
            chunk = tokens[:, 11:15]
            full = every.prefill(chunk, more, lengths)
            got = last.prefill(chunk, more, lengths, last_only=True)
            torch.testing.assert_close(got, full[:, -1], **TOL)
            assert projected[-1] == 1
            step = chunk[:, -1]
            torch.testing.assert_close(last.step(step), every.step(step), **TOL)
    finally:
        hook.remove()


@pytest.mark.parametrize("pattern", ["dense", "dilated:4,w=3,p=2", "topk:k=1,block=2"])
def test_chunked_prefill_in_query_blocks(model, pattern, monkeypatch):
    """The same when the chunk's queries attend a few at a time (a long chunk over a long cache)."""
    from megatron_ratplus.inference import cache

    monkeypatch.setattr(cache, "CHUNK_SCORES", 64)  # one or two queries per block here
    _check_chunked_prefill(model, pattern)


def _check_chunked_prefill(model, pattern):
    set_attention_pattern(model, pattern)
    gen = torch.Generator().manual_seed(5)
    n, steps = 23, 10
    tokens = torch.randint(0, VOCAB, (2, n), generator=gen)
    # (rows, lengths): a row alone or both rows at once, each from where it stands
    schedule = [([0], [5]), ([1], [3]), ([0, 1], [1, 7]), ([0], [1]), ([0], [6]), ([0, 1], [10, 1]), ([1], [12])]
    with DecodeSession(model, 2, n + steps) as whole, DecodeSession(model, 2, n + steps) as chunked:
        expected = whole.prefill(tokens, torch.tensor([n, n]))
        assert expected.std() > 0.1  # random weights: the logits depend on the tokens
        done = [0, 0]
        for rows, lengths in schedule:
            first, last = rows[0], rows[-1] + 1
            starts = torch.tensor([done[r] for r in rows])
            chunk = torch.zeros(len(rows), max(lengths), dtype=torch.long)
            for i, (r, m) in enumerate(zip(rows, lengths)):
                chunk[i, :m] = tokens[r, done[r]:done[r] + m]
            logits = chunked.rows(first, last).prefill(chunk, torch.tensor(lengths), starts)
            for i, (r, m) in enumerate(zip(rows, lengths)):
                torch.testing.assert_close(logits[i, :m], expected[r, done[r]:done[r] + m], **TOL,
                                           msg=f"row {r} positions {done[r]}..{done[r] + m - 1}")
                done[r] += m
        assert done == [n, n] and chunked.sequence_lengths.tolist() == [n, n]
        next_whole = next_chunked = expected[:, -1].argmax(-1)
        for _ in range(steps):
            a, b = whole.step(next_whole), chunked.step(next_chunked)
            torch.testing.assert_close(b, a, **TOL)
            next_whole, next_chunked = a.argmax(-1), b.argmax(-1)
            assert next_whole.tolist() == next_chunked.tolist()


def test_chunked_prefill_input_errors(model):
    set_attention_pattern(model, "dilated:4")
    with DecodeSession(model, 1, 10) as session:
        session.prefill(torch.zeros(1, 4, dtype=torch.long), torch.tensor([4]))
        with pytest.raises(ValueError, match="starts at each sequence's length"):
            session.prefill(torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]), torch.tensor([3]))
        with pytest.raises(ValueError, match="1..10"):
            session.prefill(torch.zeros(1, 7, dtype=torch.long), torch.tensor([7]), torch.tensor([4]))


def _capture_keys(model, tokens):
    """Rotated k~ and v~ [b, heads, s, d_h] each layer's core attention sees in a full forward."""
    captured = []
    hooks = [m.core_attention.register_forward_hook(
        lambda mod, args, out: captured.append((args[1].permute(1, 2, 0, 3), args[2].permute(1, 2, 0, 3))))
        for m in _mixers(model)]
    _full_logits(model, tokens)
    for h in hooks:
        h.remove()
    return captured


def _mixers(model):
    from megatron_ratplus.layers.mixer import RATPlusMixer

    return [m for m in model.modules() if isinstance(m, RATPlusMixer)]


def test_cache_contents_and_bytes_equal_the_formula(model):
    p, w, d, capacity, batch = 2, 3, 4, 30, 2
    set_attention_pattern(model, f"dilated:{d},w={w},p={p}")
    tokens = torch.randint(0, VOCAB, (batch, capacity), generator=torch.Generator().manual_seed(2))
    keys = _capture_keys(model, tokens)
    with DecodeSession(model, batch, capacity) as session:
        session.prefill(tokens[:, :11], torch.tensor([11, 11]))
        for i in range(11, 23):
            session.step(tokens[:, i])
        t = 22  # last position written
        slots = p + w + 1 + capacity // d
        expected = LAYERS * batch * (HEADS * slots * 2 * HEAD_DIM * 4 + HEADS * 2 * HEAD_DIM * 4)
        assert session.nbytes == session.formula_bytes() == expected
        for cache, (k, v) in zip(session.caches, keys):
            (_, _, store), = cache.stores
            assert store.keys.shape == (batch, HEADS, slots, HEAD_DIM)
            torch.testing.assert_close(store.keys[:, :, :p], k[:, :, :p], **TOL)  # sinks
            states = list(range(d - 1, t + 1, d))
            got = store.keys[:, :, p + w + 1:p + w + 1 + len(states)]
            torch.testing.assert_close(got, k[:, :, states], **TOL)  # chunk ends
            torch.testing.assert_close(store.values[:, :, p + w + 1:p + w + 1 + len(states)], v[:, :, states], **TOL)
            ring = store.ring_pos[0].tolist()
            assert sorted(ring) == list(range(t - w, t + 1))  # the window: the last W + 1 positions
            torch.testing.assert_close(store.keys[:, :, p:p + w + 1], k[:, :, ring], **TOL)
            torch.testing.assert_close(cache.state[:, 1], v[:, :, t].float(), **TOL)  # v~ of the last token


def test_dense_and_topk_keep_the_full_cache(model):
    for pattern in ("dense", "topk:k=1,block=4"):
        set_attention_pattern(model, pattern)
        with DecodeSession(model, 1, 40) as session:
            assert session.nbytes == LAYERS * (HEADS * 40 * 2 * HEAD_DIM * 4 + HEADS * 2 * HEAD_DIM * 4)
    set_attention_pattern(model, "dense|dilated:8")  # half the heads dense, half 2 + 40/8 ... slots
    with DecodeSession(model, 1, 40) as session:
        per_layer = 2 * 40 + 2 * (1 + 40 // 8)
        assert session.nbytes == LAYERS * (per_layer * 2 * HEAD_DIM * 4 + HEADS * 2 * HEAD_DIM * 4)


def test_session_refuses_positions_past_capacity(model):
    set_attention_pattern(model, "dilated:4")
    with DecodeSession(model, 1, 5) as session:
        session.prefill(torch.zeros(1, 5, dtype=torch.long), torch.tensor([5]))
        with pytest.raises(CacheFullError, match="5 positions"):
            session.step(torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("pattern", ["dense", "dilated:4,w=2,p=1", "dense;local:w=3"])
def test_ragged_batch_generation_equals_one_by_one(model, pattern):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 1, 12, 8)]
    sampling = SamplingConfig(max_new_tokens=10)
    batched = generate(model, prompts, sampling, pattern=pattern)
    single = [generate(model, [p], sampling).tokens[0] for p in prompts]
    assert batched.tokens == single
    assert all(len(t) == 10 for t in single) and batched.finish_reasons == ["length"] * 4


def test_stop_tokens_end_each_sequence(model):
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (6, 3)]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=12), pattern="dilated:4")
    stop = free.tokens[0][4]
    cut = generate(model, prompts, SamplingConfig(max_new_tokens=12, stop_tokens=[stop]))
    first = free.tokens[0].index(stop)
    assert cut.tokens[0] == free.tokens[0][:first] and cut.finish_reasons[0] == "stop"
    if stop in free.tokens[1]:
        assert cut.tokens[1] == free.tokens[1][:free.tokens[1].index(stop)]
    else:
        assert cut.tokens[1] == free.tokens[1] and cut.finish_reasons[1] == "length"


def test_sampling_greedy_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    assert torch.equal(sample(logits), torch.zeros(4000, dtype=torch.long))
    gen = torch.Generator().manual_seed(5)
    nucleus = sample(logits, temperature=1.0, top_p=0.7, generator=gen)
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert abs((nucleus == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    hot = sample(logits, temperature=2.0, generator=gen)
    expected = torch.softmax(logits[0] / 2.0, dim=0)
    freq = torch.bincount(hot, minlength=4).float() / 4000
    assert (freq - expected).abs().max() < 0.03


def test_seeded_sampling_is_reproducible(model):
    prompts = [[1, 2, 3], [4, 5]]
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, prompts, sampling).tokens == generate(model, prompts, sampling).tokens


def test_per_head_composition_applies_each_heads_pattern(model):
    mixer = _mixers(model)[0]
    mixer.set_attention_pattern("1*dense|3*dilated:4,w=1")
    q, k, v = torch.randn(3, 20, 2, HEADS, HEAD_DIM).unbind(0)
    scale = mixer.core_attention.softmax_scale
    expected = torch.cat([pattern_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], "dense", scale),
                          pattern_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], "dilated:4,w=1", scale)], dim=2)
    torch.testing.assert_close(mixer.attend(q, k, v), expected)
    assert mixer.pattern is None and mixer.head_patterns[1] == parse_pattern("dilated:4,w=1")


@pytest.mark.parametrize("pattern, needle", [
    ("dense;dilated:4;dense", "names 3 layers, but the model has 2"),
    ("dense|dilated:4|local:w=1", "3 head groups do not divide the 4 attention heads"),
])
def test_model_level_pattern_errors(model, pattern, needle):
    with pytest.raises(PatternError, match=needle):
        set_attention_pattern(model, pattern)


@pytest.mark.parametrize("prompts, settings, needle", [
    ([[1] * 60], dict(max_new_tokens=10), "exceeds the model's maximum length of 64"),
    ([[1, VOCAB]], {}, f"token id {VOCAB} outside the vocabulary"),
    ([[]], {}, "prompt 0 is empty"),
    ([[1]], dict(top_p=0.0), "top_p must be in"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_generation_input_errors(model, prompts, settings, needle):
    with pytest.raises(GenerationError, match=needle):
        generate(model, prompts, SamplingConfig(**settings))
