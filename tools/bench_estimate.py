"""Check the activation estimate (megatron_ratplus.estimate) against what autograd really saves.

Builds the tiny model on CPU (fp32), runs one forward with a saved-tensors hook that records
every distinct storage autograd keeps for the backward (parameters excluded): that is the
activation memory alive at the start of the backward, the peak the estimate models.

    python3 tools/bench_estimate.py [--layers 4] [--micro-batches 1 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402


def saved_activation_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of ``model(tokens)`` + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, labels=tokens).mean()
    return sum(saved.values())


def main() -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--micro-batches", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    from megatron_ratplus import distributed
    from megatron_ratplus.config import preset
    from megatron_ratplus.estimate import Layout, memory_per_gpu
    from megatron_ratplus.model import build_model

    distributed.initialize()
    config = preset("tiny", num_layers=args.layers)
    torch.manual_seed(0)
    model = build_model(config)
    print(f"tiny preset, {args.layers} layers, d {config.hidden_size}, seq {config.seq_length}, fp32, CPU")
    print("| micro-batch | measured MB | estimate MB | estimate / measured |")
    print("|---|---|---|---|")
    for mb in args.micro_batches:
        tokens = torch.randint(0, config.vocab_size, (mb, config.seq_length))
        measured = saved_activation_bytes(model, tokens)
        mem = memory_per_gpu(config, Layout(), mb, config.seq_length, bf16=False)
        estimate = mem.activations + mem.logits
        print(f"| {mb} | {measured / 1e6:.2f} | {estimate / 1e6:.2f} | {estimate / measured:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
