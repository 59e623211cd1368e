import pytest

from megatron_ratplus.patterns import AttentionPattern, PatternError, allowed_mask, parse_pattern


@pytest.mark.parametrize("text, expected", [
    ("dense", AttentionPattern("dense", dilation=1)),
    ("dilated:16", AttentionPattern("dilated", dilation=16)),
    ("dilated:16,w=256,p=4", AttentionPattern("dilated", dilation=16, window=256, sinks=4)),
    ("local:w=128", AttentionPattern("local", dilation=None, window=128)),
    ("local:w=0,p=2", AttentionPattern("local", dilation=None, window=0, sinks=2)),
    ("topk:k=4,block=32,d=8,w=16,p=1,pool=max",
     AttentionPattern("topk", dilation=8, window=16, sinks=1, topk=4, block=32, pool="max")),
    (" Dilated:4 ", AttentionPattern("dilated", dilation=4)),
])
def test_parse_valid(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(str(expected)) == expected  # str() round-trips through the grammar


@pytest.mark.parametrize("text, needle", [
    ("dilated:0", "dilation D must be an integer >= 1"),
    ("dilated:-3", "dilation D"),
    ("dilated:4,w=-1", "window W"),
    ("dilated:4,p=-2", "sinks P"),
    ("sparse:4", "unknown kind 'sparse'"),
    ("dilated:x", "d must be an integer, got 'x'"),
    ("dilated:4,q=3", "unknown parameter 'q'"),
    ("dilated:4,,w=2", "empty parameter"),
    ("local:p=2", "'local' needs w="),
    ("topk:block=4", "'topk' needs k="),
    ("topk:k=2,pool=median", "pool must be one of"),
    ("dense:4", "'dense' takes no parameters"),
    ("dilated:4,w=2,w=3", "given twice"),
    ("", "empty pattern"),
])
def test_parse_errors_name_the_bad_part(text, needle):
    with pytest.raises(PatternError) as err:
        parse_pattern(text)
    assert needle in str(err.value)


def test_allowed_mask_rule():
    mask = allowed_mask(parse_pattern("dilated:4,w=1,p=1"), 10)
    for t in range(10):
        for j in range(10):
            expect = j <= t and ((j + 1) % 4 == 0 or t - j <= 1 or j < 1)
            assert bool(mask[t, j]) == expect


def test_cache_slots_formula():
    p = parse_pattern("dilated:16,w=256,p=4")
    assert p.cache_slots(8192) == 4 + 256 + 1 + 8192 // 16
    assert parse_pattern("dense").cache_slots(100) == 100
    assert parse_pattern("local:w=10").cache_slots(5) == 5


# --- compositions: per-layer lists, cycles, per-head groups -------------------------------------------

from megatron_ratplus.patterns import LayerPatterns, PatternComposition, head_runs, parse_composition  # noqa: E402

DENSE, D64, D16 = parse_pattern("dense"), parse_pattern("dilated:64"), parse_pattern("dilated:16")


@pytest.mark.parametrize("text, layers, heads, expected", [
    ("dilated:16", 3, 2, [[D16, D16]] * 3),
    ("dense;dilated:64;dense", 3, 1, [[DENSE], [D64], [DENSE]]),
    ("cycle(dense;dilated:64)", 4, 1, [[DENSE], [D64], [DENSE], [D64]]),
    ("2*dense;1*dilated:64", 3, 1, [[DENSE], [DENSE], [D64]]),
    ("dense|dilated:16", 2, 4, [[DENSE, DENSE, D16, D16]] * 2),
    ("1*dense|3*dilated:16", 1, 4, [[DENSE, D16, D16, D16]]),
    ("2*(dense|dilated:16);dilated:64", 3, 2, [[DENSE, D16], [DENSE, D16], [D64, D64]]),
    (["dense", "dilated:64"], 2, 1, [[DENSE], [D64]]),
])
def test_composition_resolves_per_layer_and_head(text, layers, heads, expected):
    composition = parse_composition(text)
    assert [list(layer) for layer in composition.resolve(layers, heads)] == expected
    assert parse_composition(str(composition)) == composition  # str() round-trips


def test_single_pattern_is_a_one_item_composition():
    assert parse_composition("dilated:16,w=8") == PatternComposition((LayerPatterns(((parse_pattern("dilated:16,w=8"), None),)),))
    assert parse_composition(parse_pattern("dense")).resolve(2, 1) == ((DENSE,), (DENSE,))


@pytest.mark.parametrize("text, layers, heads, needle", [
    ("dense;dilated:64", 3, 4, "names 2 layers, but the model has 3"),
    ("cycle(dense;dilated:64)", 3, 4, "a cycle of 2 layer patterns does not divide the 3 layers"),
    ("dense|dilated:16", 2, 3, "2 head groups do not divide the 3 attention heads"),
    ("1*dense|1*dilated:16", 2, 3, "head counts add up to 2, but the layer has 3"),
    ("2*dense|dilated:16", 2, 4, "give a head count to every group or to none"),
    ("dense;;dense", 2, 1, "empty layer pattern"),
    ("(dense", 1, 1, "parentheses"),
    ("cycle(dense", 1, 1, "closing ')'"),
    ("0*dense", 1, 1, "a count must be in [1, 65536]"),
    ("70000*dense", 1, 1, "a count must be in [1, 65536]"),
    ("dilated:1_6", 1, 1, "d must be an integer"),
    ("dense;dilated:0", 2, 1, "dilation D must be an integer >= 1"),
])
def test_composition_errors(text, layers, heads, needle):
    with pytest.raises(PatternError) as err:
        parse_composition(text).resolve(layers, heads)
    assert needle in str(err.value)


def test_head_runs_group_neighbours():
    assert head_runs([DENSE, DENSE, D16, DENSE]) == [(DENSE, 0, 2), (D16, 2, 3), (DENSE, 3, 4)]


@pytest.mark.parametrize("text, expected", [
    ("dense,dilated:4,dilated:16,dilated:64", ["dense", "dilated:4", "dilated:16", "dilated:64"]),
    ("dense,dilated:16,w=256,p=4,local:w=8", ["dense", "dilated:16,w=256,p=4", "local:w=8"]),
    ("dilated:4,w=2;dilated:8,p=1,cycle(dense;dilated:64)", ["dilated:4,w=2;dilated:8,p=1", "cycle(dense;dilated:64)"]),
])
def test_split_pattern_list(text, expected):
    from megatron_ratplus.patterns import split_pattern_list

    assert split_pattern_list(text) == expected


def test_split_pattern_list_errors():
    from megatron_ratplus.patterns import split_pattern_list

    with pytest.raises(PatternError, match="empty entry"):
        split_pattern_list("dense,,dilated:4")
    with pytest.raises(PatternError, match="unknown kind 'dilatd'"):
        split_pattern_list("dense,dilatd:4")
