"""Indexed datasets: weighted blends, split strings, the recorded validation, bad token ids."""

import os

import numpy as np
import pytest
import torch

from megatron_ratplus.data import datasets
from megatron_ratplus.data.datasets import CHECK_SUFFIX, build_datasets, check_indexed_dataset, parse_blend
from megatron_ratplus.data.tokenizer import ByteTokenizer, DataError


def write_dataset(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_weighted_blend_draws_in_proportion(megatron_single, tmp_path):
    rng = np.random.default_rng(0)
    a = write_dataset(str(tmp_path / "a"), [rng.integers(0, 100, 300) for _ in range(40)])
    b = write_dataset(str(tmp_path / "b"), [rng.integers(100, 200, 300) for _ in range(40)])
    train, valid = build_datasets(["0.7", a, "0.3", b], ByteTokenizer(), 32, 1234, "90,10,0", 400, 20,
                                  cache_dir=str(tmp_path / "cache"))
    from_a = sum(int(train[i]["tokens"].max() < 100) for i in range(400))
    from_b = sum(int(train[i]["tokens"].min() >= 100) for i in range(400))
    assert from_a + from_b == 400 and abs(from_a / 400 - 0.7) < 0.03
    assert len(valid) >= 20
    # Without weights both prefixes are read (shares by size).
    train, _ = build_datasets([a, b], ByteTokenizer(), 32, 1234, "90,10,0", 100, 5, cache_dir=str(tmp_path / "c2"))
    assert {bool(train[i]["tokens"].max() < 100) for i in range(100)} == {True, False}


@pytest.mark.parametrize("path, expected", [
    (["A"], (["A"], None)), (["A", "B"], (["A", "B"], None)), (["A", "B", "C"], (["A", "B", "C"], None)),
    (["0.7", "A", "0.3", "B"], (["A", "B"], [0.7, 0.3])), (["2", "A"], (["A"], [2.0])),
])
def test_parse_blend(path, expected):
    assert parse_blend(path) == expected


@pytest.mark.parametrize("path, needle", [
    (["0.5", "A", "B"], "mixes weights and prefixes"), (["0.5", "A", "B", "C"], "mixes weights"),
    (["A", "0.5", "B", "0.5"], "mixes weights"), (["0", "A", "1", "B"], "weights must be positive"),
    (["-1", "A"], "weights must be positive"),
])
def test_parse_blend_refuses(path, needle):
    with pytest.raises(DataError, match=needle):
        parse_blend(path)


@pytest.mark.parametrize("split", ["98,2", "x,1", "1,2,3,4", "-1,2,0", "0,0,0", ""])
def test_bad_split_is_one_line(megatron_single, tmp_path, split):
    a = write_dataset(str(tmp_path / "a"), [list(range(50))] * 100)
    ok = {"98,2"}
    if split in ok:
        build_datasets([a], ByteTokenizer(), 8, 1, split, 4, 1, cache_dir=str(tmp_path / "c"))
        return
    with pytest.raises(DataError, match="--split"):
        build_datasets([a], ByteTokenizer(), 8, 1, split, 4, 1)


def test_validation_is_recorded_and_reused(tmp_path, monkeypatch):
    prefix = write_dataset(str(tmp_path / "d"), [list(range(200))] * 3)
    record = prefix + ".idx" + CHECK_SUFFIX
    assert check_indexed_dataset(prefix, 257) == 600 and os.path.isfile(record)

    def no_scan(*_):
        raise AssertionError("the .bin was scanned again")

    monkeypatch.setattr(datasets, "_token_range", no_scan)
    assert check_indexed_dataset(prefix, 257) == 600  # the record answers
    with pytest.raises(DataError, match="token id 199, beyond the vocabulary size 150"):
        check_indexed_dataset(prefix, 150)  # the recorded ids meet this run's vocabulary
    monkeypatch.undo()
    # New files under the same prefix (other size and mtime): scanned again, the new id caught.
    for ext in (".bin", ".idx"):
        os.remove(prefix + ext)
    write_dataset(prefix, [list(range(200)) + [300]] * 3)
    with pytest.raises(DataError, match="token id 300"):
        check_indexed_dataset(prefix, 257)
    # A garbled record is ignored, not trusted.
    with open(record, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="token id 300"):
        check_indexed_dataset(prefix, 257)


def test_read_only_directory_still_validates(tmp_path, monkeypatch):
    prefix = write_dataset(str(tmp_path / "d"), [list(range(100))] * 2)
    real_open = open

    def refuse_tmp(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "read-only", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse_tmp)
    assert check_indexed_dataset(prefix, 257) == 200
    assert not os.path.exists(prefix + ".idx" + CHECK_SUFFIX)


def test_negative_ids_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_SCAN_CHUNK", 64)  # the bad id sits in a later chunk
    prefix = write_dataset(str(tmp_path / "s"), [list(range(100)), [5, -3, 7] + [1] * 97], dtype=np.int32)
    with pytest.raises(DataError, match="negative token id -3"):
        check_indexed_dataset(prefix, 257)


def test_scan_in_chunks_matches_numpy(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    docs = [rng.integers(-50, 5000, rng.integers(1, 90)) for _ in range(30)]
    prefix = write_dataset(str(tmp_path / "r"), docs, dtype=np.int32)
    monkeypatch.setattr(datasets, "_SCAN_CHUNK", 37)
    flat = np.concatenate(docs)
    assert datasets._token_range(prefix, np.int32) == (flat.min(), flat.max())
