"""Preprocessing throughput (tokens/s) by worker count, and a projection for a 100B-token corpus.

Writes a synthetic .jsonl.gz corpus of English-like documents (word lengths and frequencies of
a Zipf law), trains a small SentencePiece BPE model on part of it, and times
megatron_ratplus.data.preprocess.build for each tokenizer and worker count.

    python3 tools/bench_preprocess.py [--documents 20000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import positive_float, positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402


def make_corpus(path: str, documents: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(5000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for _ in range(documents):
            words = rng.choice(vocab, size=int(rng.integers(100, 1500)), p=weights)
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=positive_int, default=20000)
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--target-tokens", type=positive_float, default=100e9)
    parser.add_argument("--target-cores", type=positive_int, default=64)
    args = parser.parse_args()
    import sentencepiece

    from megatron_ratplus.data.preprocess import build

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl.gz")
        make_corpus(corpus, args.documents)
        sample = os.path.join(tmp, "sample.txt")
        with gzip.open(corpus, "rt") as f, open(sample, "w") as out:
            for _, line in zip(range(2000), f):
                out.write(json.loads(line)["text"] + "\n")
        sentencepiece.SentencePieceTrainer.train(input=sample, model_prefix=os.path.join(tmp, "sp"), vocab_size=8000,
                                                 model_type="bpe", minloglevel=2)
        print(f"corpus: {args.documents} documents, {os.path.getsize(corpus) / 1e6:.1f} MB gzip")
        print("| tokenizer | workers | tokens | seconds | tokens/s | 100B tokens on "
              f"{args.target_cores} cores (h) |")
        print("|---|---|---|---|---|---|")
        for name, spec in (("byte", "byte"), ("sentencepiece bpe 8k", f"sentencepiece:{tmp}/sp.model")):
            for workers in args.workers:
                out = os.path.join(tmp, f"out-{name.split()[0]}-{workers}")
                start = time.perf_counter()
                stats = build([corpus], out, spec, workers=workers)
                seconds = time.perf_counter() - start
                rate = stats["tokens"] / seconds
                # Projection: the per-worker rate times the target cores (one reader process and
                # perfect scaling assumed; the measured 1 -> 2 worker scaling says how far that holds).
                hours = args.target_tokens / (rate / workers * args.target_cores) / 3600
                print(f"| {name} | {workers} | {stats['tokens']:,} | {seconds:.1f} | {rate:,.0f} | {hours:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
