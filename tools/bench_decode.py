"""Benchmark sparse-cache decoding on CPU: tokens/s and cache bytes, dense vs dilated.

For each pattern: prefill ``--context`` random tokens, then decode ``--new-tokens`` steps and
time them (median of per-step times). Each step is ``GPTModel.forward`` with the
``DecodeSession`` as megatron's inference context; every mixer runs ``decode_step`` and its
layer's cache attends through ``backend.decode_attention`` (the reference op on CPU, the Triton
decode kernel on CUDA; docs/DESIGN.md §5). Cache bytes are read from the live cache tensors and
compared with the formula (P + W + 1 + floor(T/D) slots per head, plus the recurrent state).

Usage: python3 tools/bench_decode.py [--context 8192] [--new-tokens 32] [--batch 1] [--hidden 256]
       [--heads 4] [--layers 4] [--patterns dense,dilated:16,dilated:64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402

from megatron_ratplus import distributed  # noqa: E402
from megatron_ratplus.config import preset  # noqa: E402
from megatron_ratplus.inference import DecodeSession  # noqa: E402
from megatron_ratplus.model import build_model, count_parameters, set_attention_pattern  # noqa: E402
from megatron_ratplus.patterns import parse_pattern, split_pattern_list  # noqa: E402


def bench(model, pattern: str, context: int, new_tokens: int, batch: int, vocab: int):
    set_attention_pattern(model, pattern)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen)
    with DecodeSession(model, batch, context + new_tokens) as session:
        start = time.perf_counter()
        logits = session.prefill(prompt, torch.full((batch,), context))[:, -1]
        prefill_s = time.perf_counter() - start
        steps = []
        for _ in range(new_tokens):
            start = time.perf_counter()
            logits = session.step(logits.argmax(-1))
            steps.append(time.perf_counter() - start)
        return dict(pattern=pattern, prefill_s=prefill_s, step_s=statistics.median(steps[1:] or steps),
                    bytes=session.nbytes, formula=session.formula_bytes())


def main():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=positive_int, default=8192)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--patterns", default="dense,dilated:16,dilated:64")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    distributed.initialize()
    torch.manual_seed(0)
    config = preset("tiny", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    seq_length=args.context + args.new_tokens)
    model = build_model(config).eval()
    print(f"model: tiny preset widened to {args.layers} layers x d={args.hidden} ({args.heads} heads x "
          f"{args.hidden // args.heads}), vocab {config.vocab_size}, {count_parameters(config) / 1e6:.2f}M params, "
          f"fp32; batch {args.batch}; context {args.context}; {torch.get_num_threads()} threads")
    results = [bench(model, p, args.context, args.new_tokens, args.batch, config.vocab_size)
               for p in split_pattern_list(args.patterns)]
    dense = next((r for r in results if parse_pattern(r["pattern"]).is_dense), results[0])
    capacity = args.context + args.new_tokens
    print("| pattern | prefill s | decode ms/step | tokens/s | speed-up vs dense | cache bytes | "
          "= formula | dense/this bytes | dense/this slots (formula) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        slots = parse_pattern(r["pattern"]).cache_slots(capacity)
        print(f"| {r['pattern']} | {r['prefill_s']:.1f} | {r['step_s'] * 1e3:.2f} | {args.batch / r['step_s']:.1f} | "
              f"{dense['step_s'] / r['step_s']:.2f}x | {r['bytes']} | {r['bytes'] == r['formula']} | "
              f"{dense['bytes'] / r['bytes']:.2f} | {capacity / slots:.2f} |")


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
