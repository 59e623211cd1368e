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
