"""Build a megatron indexed dataset (PREFIX.bin / PREFIX.idx) from jsonl or plain-text files.

Each jsonl line is one document (its --json-key field); each other file is one document.
Every document ends with the tokenizer's end-of-document token. Byte-level tokens by default,
or a local HF `tokenizers` file with --tokenizer-file.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from megatron_ratplus.data.tokenizer import DataError, build_tokenizer


def iter_documents(paths, json_key: str):
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        yield record[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{path}:{line_no}: not a JSON object with a '{json_key}' field") from None
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def build(paths, output_prefix: str, tokenizer_spec: str = "byte", json_key: str = "text") -> dict:
    """Tokenize ``paths`` into ``output_prefix``.bin/.idx; returns counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
    for ext in (".bin", ".idx"):
        if os.path.exists(output_prefix + ext):
            raise DataError(f"{output_prefix + ext} exists; refusing to overwrite it")
    tokenizer = build_tokenizer(tokenizer_spec)
    dtype = np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.int32
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_bin = output_prefix + ".bin.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    docs = tokens = 0
    try:
        for text in tqdm(iter_documents(paths, json_key), desc="documents", unit="doc", file=sys.stderr):
            ids = tokenizer.encode(text) + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            docs += 1
            tokens += len(ids)
        if docs == 0:
            raise DataError("the input holds no documents")
        builder.finalize(output_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, output_prefix + ".idx"):
            if os.path.exists(path):
                os.remove(path)
        raise
    os.replace(tmp_bin, output_prefix + ".bin")
    return {"documents": docs, "tokens": tokens, "vocab_size": tokenizer.vocab_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl or text files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-file", default=None, help="HF tokenizers JSON file (default: bytes)")
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    try:
        stats = build(args.input, args.output_prefix, args.tokenizer_file or "byte", args.json_key)
    except (DataError, OSError) as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
