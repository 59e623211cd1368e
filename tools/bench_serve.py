"""Benchmark ratplus-serve's engine: output tokens/s, time to first token (TTFT) and time per
output token (TPOT), p50/p99, and the most concurrent sequences a fixed cache budget holds, per
pattern and prompt length.

Clients run in-process against the engine, which runs on the main thread as in ratplus-serve
(the HTTP layer adds the same small cost to every pattern), with their prompts made before the
clock starts: either a closed loop of ``--clients`` clients (default: as many as the pool
holds) each sending ``--requests`` requests back to back, or ``--rate`` Poisson arrivals per
second of ``--requests`` requests in all. The pool for each pattern is sized from the same
``--cache-mb`` budget at ``--max-model-len`` = prompt + new tokens, so a sparse pattern holds more
sequences (P + W + 1 + T/D slots per head instead of T, docs/DESIGN.md §5) and batches them.

Usage: python3 tools/bench_serve.py [--patterns dense,dilated:16,dilated:64] [--prompt-lens 2048,8192]
       [--new-tokens 32] [--cache-mb 64] [--clients N] [--requests 1] [--rate R] [--layers 2]
       [--hidden 128] [--heads 2] [--max-num-seqs 64] [--max-prefill-tokens N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import int_list, non_negative_float, non_negative_int, positive_float, positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402

from megatron_ratplus import distributed  # noqa: E402
from megatron_ratplus.config import preset  # noqa: E402
from megatron_ratplus.data.tokenizer import ByteTokenizer  # noqa: E402
from megatron_ratplus.model import build_model  # noqa: E402
from megatron_ratplus.patterns import split_pattern_list  # noqa: E402
from megatron_ratplus.serving.engine import Engine  # noqa: E402
from megatron_ratplus.serving.pool import PatternPool, row_bytes  # noqa: E402
from megatron_ratplus.serving.sequence import SamplingParams, Sequence  # noqa: E402


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def bench(model, pattern, prompt_len, args):
    max_len = prompt_len + args.new_tokens
    rows = min(args.max_num_seqs, int(args.cache_mb * 2**20 // row_bytes(model, pattern, max_len, torch.float32)))
    if rows < 1:
        return dict(pattern=pattern, prompt=prompt_len, rows=0)
    engine = Engine({pattern: PatternPool(model, pattern, rows, max_len, torch.float32)}, rows, 10**6,
                    args.max_prefill_tokens or prompt_len)
    records, lock = [], threading.Lock()
    rng = random.Random(0)
    clients = 0 if args.rate else args.clients or rows
    prompts = iter([[rng.randrange(256) for _ in range(prompt_len)]  # before the clock starts
                    for _ in range(args.requests * (clients or 1))])

    def one_request():
        done = threading.Event()
        times = []
        with lock:
            prompt = next(prompts)
        seq = Sequence(prompt, SamplingParams(max_tokens=args.new_tokens, temperature=0), pattern, ByteTokenizer(), [],
                       lambda s: (times.append(time.perf_counter()), s.finished and done.set()))
        start = time.perf_counter()
        engine.submit([seq])
        done.wait()
        with lock:
            records.append((start, times))

    def closed_client():
        for _ in range(args.requests):
            one_request()

    def load():
        """The clients, then the engine's stop; the engine runs on the main thread, as in ratplus-serve."""
        threads = []
        if args.rate:
            for _ in range(args.requests):
                threads.append(threading.Thread(target=one_request))
                threads[-1].start()
                time.sleep(rng.expovariate(args.rate))
        else:
            threads = [threading.Thread(target=closed_client) for _ in range(clients)]
            for thread in threads:
                thread.start()
        for thread in threads:
            thread.join()
        engine.stop()

    begin = time.perf_counter()
    loader = threading.Thread(target=load)
    loader.start()
    engine.run()
    loader.join()
    wall = time.perf_counter() - begin
    ttft = [times[0] - start for start, times in records]
    tpot = [(times[-1] - times[0]) / (len(times) - 1) for _, times in records if len(times) > 1]
    tokens = sum(len(times) for _, times in records)
    return dict(pattern=pattern, prompt=prompt_len, rows=rows, tokens=tokens, tok_s=tokens / wall,
                ttft50=percentile(ttft, 50), ttft99=percentile(ttft, 99), tpot50=percentile(tpot, 50),
                tpot99=percentile(tpot, 99))


def main():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patterns", default="dense,dilated:16,dilated:64")
    parser.add_argument("--prompt-lens", type=int_list, default="2048,8192")
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--cache-mb", type=positive_float, default=64.0, help="decode-cache budget per pattern")
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    parser.add_argument("--clients", type=non_negative_int, default=0, help="closed-loop clients (default: the pool's rows)")
    parser.add_argument("--requests", type=positive_int, default=1, help="requests per client (closed) or in all (--rate)")
    parser.add_argument("--rate", type=non_negative_float, default=0.0, help="Poisson arrivals per second instead")
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--max-prefill-tokens", type=non_negative_int, default=0,
                        help="prompt tokens prefilled per engine step (ratplus-serve's flag; default 0: a "
                             "whole prompt per step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    distributed.initialize()
    lengths = args.prompt_lens
    torch.manual_seed(0)
    config = preset("tiny", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    seq_length=max(lengths) + args.new_tokens, vocab_size=384, real_vocab_size=257)
    model = build_model(config).eval()
    mode = f"Poisson {args.rate}/s, {args.requests} requests" if args.rate else \
        f"closed loop, {args.clients or 'rows'} clients x {args.requests} requests"
    print(f"# {args.layers} layers, d={args.hidden}, {args.heads} heads, {args.new_tokens} new tokens, "
          f"cache budget {args.cache_mb} MiB per pattern, {mode}, fp32, {args.threads} threads, "
          f"prefill {args.max_prefill_tokens or 'a whole prompt'} tokens per step")
    print("| prompt | pattern | max concurrent seqs | output tok/s | TTFT p50 / p99 s | TPOT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for length in lengths:
        for pattern in split_pattern_list(args.patterns):
            r = bench(model, pattern, length, args)
            if not r["rows"]:
                print(f"| {length} | {pattern} | 0 (budget too small) | - | - | - |")
                continue
            print(f"| {length} | {pattern} | {r['rows']} | {r['tok_s']:.1f} | {r['ttft50']:.2f} / {r['ttft99']:.2f} "
                  f"| {1000 * r['tpot50']:.1f} / {1000 * r['tpot99']:.1f} |", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
