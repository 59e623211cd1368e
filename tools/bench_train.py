"""CPU training throughput: RAT+ dense step vs the recurrence-free baseline, and a joint iteration.

Same model size for both (the tiny preset unless flags say otherwise); a "step" is one forward,
backward, clip and AdamW update of one global batch through megatron-core's schedule.
Target: RAT+ dense step at most 1.25x the baseline's time.

Usage: python3 tools/bench_train.py [--seq-length 256] [--global-batch-size 16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from megatron_ratplus import distributed
from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import positive_int
from megatron_ratplus.config import preset
from megatron_ratplus.data.corpus import embedded_splits
from megatron_ratplus.data.datasets import TokenWindows, collate
from megatron_ratplus.data.tokenizer import ByteTokenizer, padded_vocab_size
from megatron_ratplus.errors import ArgumentParser
from megatron_ratplus.model import build_model
from megatron_ratplus.training.arguments import parse_flags
from megatron_ratplus.training.config import TrainingConfig
from megatron_ratplus.training.data_parallel import wrap_model
from megatron_ratplus.training.optimizer import build_optimizer
from megatron_ratplus.training.steps import train_step
from megatron_ratplus.userfiles import check_output_path


def time_steps(recurrence: bool, patterns, args, batches) -> float:
    """Median seconds of one iteration made of a train_step per pattern."""
    torch.manual_seed(0)
    config = preset(args.preset, recurrence=recurrence, seq_length=args.seq_length,
                    vocab_size=padded_vocab_size(ByteTokenizer.vocab_size))
    model = wrap_model([build_model(config)], config)
    with tempfile.TemporaryDirectory() as save:  # the optimizer settings of a training run; nothing is saved
        training = TrainingConfig.from_flags(parse_flags([
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--lr", "1e-3", "--save", save]))
    optimizer = build_optimizer(model, training)
    times = []
    for i in range(args.repeats + 2):
        start = time.perf_counter()
        for pattern in patterns:
            train_step(model, optimizer, batches[i % len(batches)], args.seq_length, pattern)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-length", type=positive_int, default=256)
    parser.add_argument("--micro-batch-size", type=positive_int, default=8)
    parser.add_argument("--global-batch-size", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.json:  # before the measurements, not after them
        check_output_path("--json", args.json)

    distributed.initialize()
    tokens, _ = embedded_splits(ByteTokenizer())
    windows = TokenWindows(tokens, args.seq_length)
    per_step = args.global_batch_size // args.micro_batch_size
    batches = [[collate([windows[(b * per_step + m) * args.micro_batch_size + j] for j in range(args.micro_batch_size)])
                for m in range(per_step)] for b in range(4)]
    step_tokens = args.global_batch_size * args.seq_length

    base = time_steps(False, ["dense"], args, batches)
    dense = time_steps(True, ["dense"], args, batches)
    joint = time_steps(True, ["dilated:64", "dense"], args, batches)
    rows = [("baseline (no recurrence) dense step", base), ("RAT+ dense step", dense),
            ("RAT+ joint iteration (dilated:64 + dense)", joint)]
    print(f"preset {args.preset}, seq {args.seq_length}, global batch {args.global_batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':44s} {'ms':>8s} {'tokens/s':>10s}")
    for name, seconds in rows:
        print(f"{name:44s} {seconds * 1e3:8.1f} {step_tokens / seconds:10.0f}")
    print(f"RAT+ dense step / baseline step: {dense / base:.2f}x (target <= 1.25x); "
          f"joint iteration / dense step: {joint / dense:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_ms": base * 1e3, "ratplus_dense_ms": dense * 1e3, "joint_ms": joint * 1e3,
                       "tokens_per_step": step_tokens}, f, indent=2)


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
