"""tools/preprocess_data.py: formats, workers, shards, tokenizers and bad input."""

import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO

from megatron_ratplus.data import preprocess

spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

rng = np.random.default_rng(7)
WORDS = ["alpha", "beta", "gamma", "δέλτα", "数据", "ok", "end.", "\n", "  "]
DOCS = [" ".join(rng.choice(WORDS, size=rng.integers(1, 40))) for _ in range(1100)]  # > 2 worker batches


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]


def write_jsonl(path, docs, key="text"):
    lines = "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    if path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(lines)
    elif path.endswith(".zst"):
        import zstandard

        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(lines))
    else:
        with open(path, "wb") as f:
            f.write(lines)
    return path


def write_parquet(path, docs, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path, row_group_size=300)
    return path


def byte_docs(docs, eod=True):
    return [list(d.encode()) + ([256] if eod else []) for d in docs]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"])
def test_formats_give_the_documents_in_order(tmp_path, name):
    path = str(tmp_path / name)
    write_parquet(path, DOCS) if name.endswith(".parquet") else write_jsonl(path, DOCS)
    stats = preprocess.build([path], str(tmp_path / "out"))
    assert stats["documents"] == len(DOCS) and not stats["skipped"]
    assert read_docs(str(tmp_path / "out")) == byte_docs(DOCS)  # a .gz is read as gzip, never raw bytes


@pytest.mark.slow
def test_two_workers_write_the_same_bytes(tmp_path):
    path = write_jsonl(str(tmp_path / "c.jsonl.gz"), DOCS)
    preprocess.build([path], str(tmp_path / "one"), workers=1)
    preprocess.build([path], str(tmp_path / "two"), workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_keys_partitions_and_no_eod(tmp_path):
    path = str(tmp_path / "c.jsonl")
    with open(path, "w") as f:
        for i, d in enumerate(DOCS[:10]):
            f.write(json.dumps({"text": d, "title": f"title {i}"}) + "\n")
    stats = preprocess.build([path], str(tmp_path / "o"), json_keys=["text", "title"], partitions=3,
                             append_eod=False)
    assert stats["documents"] == 10
    for shard in range(3):
        assert read_docs(str(tmp_path / f"o_text_{shard}")) == byte_docs(DOCS[shard:10:3], eod=False)
        assert read_docs(str(tmp_path / f"o_title_{shard}")) == byte_docs(
            [f"title {i}" for i in range(shard, 10, 3)], eod=False)


def test_bad_records_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "good one"}).encode(), b'{"text": "caf\xe9"}', b"not json",
             json.dumps([1, 2]).encode(), json.dumps({"text": None}).encode(), json.dumps({"text": 5}).encode(),
             json.dumps({"body": "x"}).encode(), b'{"text": "a\\ud800b"}', b"", json.dumps({"text": ""}).encode(),
             json.dumps({"text": "good two"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert cli.main(["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--no-progress-bar"]) == 0
    out = capsys.readouterr().out
    assert read_docs(str(tmp_path / "o")) == byte_docs(["good one", "good two"])
    for reason, line in [("not UTF-8", 2), ("not JSON", 3), ("not a JSON object", 4),
                         ("null or non-string 'text'", 5), ("no 'text' field", 7), ("lone surrogate", 8),
                         ("empty 'text'", 10)]:
        assert f": {reason} (first at {path}:line {line})" in out, (reason, out)
    assert "skipped 2 records: null or non-string 'text'" in out


def make_sentencepiece(tmp_path):
    import sentencepiece

    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(DOCS[:400]), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                             model_type="bpe", character_coverage=1.0, minloglevel=2)
    return str(tmp_path / "sp.model")


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece

    from megatron_ratplus.data.tokenizer import build_tokenizer

    model = make_sentencepiece(tmp_path)
    path = write_jsonl(str(tmp_path / "c.jsonl"), DOCS[:50])
    assert cli.main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--no-progress-bar",
                            "--tokenizer-type", "sentencepiece", "--tokenizer-model", model]) == 0
    reference = sentencepiece.SentencePieceProcessor(model_file=model)
    eos = reference.eos_id()
    assert read_docs(str(tmp_path / "o")) == [reference.encode(d) + [eos] for d in DOCS[:50]]
    tokenizer = build_tokenizer(model)  # training's --tokenizer-file path, and the checkpoint's spec
    assert tokenizer.spec == f"sentencepiece:{os.path.abspath(model)}"
    assert build_tokenizer(tokenizer.spec).encode(DOCS[3]) == reference.encode(DOCS[3])
    assert tokenizer.decode(tokenizer.encode("alpha beta") + [tokenizer.eod]) == "alpha beta"


def test_huggingface_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS[:200], trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_parquet(str(tmp_path / "c.parquet"), DOCS[:30])
    assert cli.main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--no-progress-bar",
                            "--tokenizer-file", str(tmp_path / "tokenizer.json")]) == 0
    eod = tok.token_to_id("</s>")
    assert read_docs(str(tmp_path / "o")) == [tok.encode(d, add_special_tokens=False).ids + [eod]
                                              for d in DOCS[:30]]


def corrupt_gzip(tmp_path):
    path = write_jsonl(str(tmp_path / "c.jsonl.gz"), DOCS)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    open(path, "wb").write(bytes(data))
    return path


def truncated_zst(tmp_path):
    path = write_jsonl(str(tmp_path / "c.jsonl.zst"), DOCS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make, extra, needle", [
    (corrupt_gzip, [], "corrupt or truncated gz data after line"),
    (truncated_zst, [], "corrupt or truncated zst data after line"),
    (lambda t: write_parquet(str(t / "c.parquet"), DOCS[:5], column="content"), [],
     "no column 'text' (columns: content, id)"),
    (lambda t: str(t.joinpath("x.parquet").write_bytes(b"PAR1 not really") and t / "x.parquet"), [],
     "not a readable parquet file"),
    (lambda t: write_jsonl(str(t / "c.jsonl"), DOCS[:5]), ["--tokenizer-type", "sentencepiece",
                                                           "--tokenizer-model", "/nonexistent/tokenizer.model"],
     "tokenizer model not found"),
    (lambda t: write_jsonl(str(t / "c.jsonl"), DOCS[:5]), ["--tokenizer-file", "/etc/hostname"],
     "cannot read tokenizer file"),
    (lambda t: write_jsonl(str(t / "c.jsonl"), DOCS[:5]), ["--tokenizer-type", "sentencepiece"],
     "needs --tokenizer-model"),
    (lambda t: write_jsonl(str(t / "c.jsonl"), ['{"x": 1}']), ["--json-keys", "body"], "no usable documents"),
    (lambda t: str(t / "missing.jsonl"), [], "input file not found"),
])
def test_bad_files_stop_with_one_line_and_write_nothing(tmp_path, capsys, make, extra, needle):
    path = str(make(tmp_path))
    before = set(os.listdir(tmp_path))
    code = cli.main(["--input", path, "--output-prefix", str(tmp_path / "out" / "o"), "--no-progress-bar",
                            *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("preprocess_data.py: error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    assert set(os.listdir(tmp_path)) - {"out"} == before


def test_zstd_with_several_frames(tmp_path):
    import zstandard

    frames = [zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in part).encode())
              for part in (DOCS[:7], DOCS[7:20])]
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(b"".join(frames))
    preprocess.build([str(path)], str(tmp_path / "o"))
    assert read_docs(str(tmp_path / "o")) == byte_docs(DOCS[:20])
