"""Benchmark evaluation throughput on CPU: requests/s for log-likelihood and generation.

A random-weight tiny model (the ``tiny`` preset: 4 layers, d = 128, 4 heads, seq 256; the
weights do not change the cost). Log-likelihood: ``--requests`` (context, continuation) pairs
of ragged lengths (contexts uniform in 16..seq - 16 tokens, continuations 1..8), scored by
``evaluation.scoring.continuation_logprobs`` with the requests sorted longest first and
batched, against the same requests one at a time. Generation: prompts of ragged lengths,
``--new-tokens`` greedy tokens each through the sparse decode cache
(``evaluation.scoring.greedy_until``). Each case is timed best of ``--repeats``.

Usage: python3 tools/bench_eval.py [--requests 64] [--prompts 16] [--new-tokens 32]
       [--patterns dense,dilated:16] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402

from megatron_ratplus import distributed  # noqa: E402
from megatron_ratplus.config import preset  # noqa: E402
from megatron_ratplus.evaluation.scoring import continuation_logprobs, greedy_until  # noqa: E402
from megatron_ratplus.model import build_model, set_attention_pattern  # noqa: E402
from megatron_ratplus.patterns import split_pattern_list  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=positive_int, default=64)
    parser.add_argument("--prompts", type=positive_int, default=16)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--patterns", default="dense,dilated:16")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    distributed.initialize()
    torch.manual_seed(0)
    config = preset("tiny")
    model = build_model(config).eval()
    seq, vocab = config.seq_length, config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    pairs = [(tokens(int(torch.randint(16, seq - 16, (1,), generator=gen))),
              tokens(int(torch.randint(1, 9, (1,), generator=gen)))) for _ in range(args.requests)]
    prompts = [tokens(int(torch.randint(16, seq - args.new_tokens, (1,), generator=gen)))
               for _ in range(args.prompts)]
    print(f"tiny preset (layers {config.num_layers}, d {config.hidden_size}, heads {config.num_attention_heads}, "
          f"seq {seq}), {args.threads} threads; {args.requests} log-likelihood requests, {args.prompts} prompts "
          f"x {args.new_tokens} new tokens")
    print("| pattern | loglikelihood req/s (batched {0}) | loglikelihood req/s (one at a time) | "
          "generation req/s (batched {0}) | generated tokens/s |".format(args.batch_size))
    print("|---|---|---|---|---|")
    for pattern in split_pattern_list(args.patterns):
        set_attention_pattern(model, pattern)
        batched = best_of(args.repeats, lambda: continuation_logprobs(model, pairs, seq, args.batch_size))
        single = best_of(args.repeats, lambda: continuation_logprobs(model, pairs, seq, 1))
        generation = best_of(args.repeats, lambda: greedy_until(model, prompts, lambda ids: "", args.new_tokens,
                                                               seq, batch_size=args.batch_size))
        print(f"| `{pattern}` | {args.requests / batched:.1f} | {args.requests / single:.1f} | "
              f"{args.prompts / generation:.2f} | {args.prompts * args.new_tokens / generation:.0f} |")


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
