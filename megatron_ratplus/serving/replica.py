"""Tensor-parallel serving: rank 0 runs the HTTP API and the engine, and broadcasts every pool
operation (prefill of some prompts, a decode step with its fed tokens, a row release) before
running it; the other ranks replay the same operations on their own pools. Every rank thus runs
the same forwards on its shard of the heads, in the same order, so the model's collectives
match; sampling, text and HTTP stay on rank 0 (each rank holds the gathered logits).
"""

from __future__ import annotations

import signal
from types import SimpleNamespace
from typing import Dict

import torch
import torch.distributed as dist

from megatron_ratplus.serving.pool import PatternPool


def announce(op: tuple) -> None:
    """Rank 0: hand ``op`` to the other ranks."""
    dist.broadcast_object_list([op], src=0)


def stop_followers() -> None:
    announce(("stop", None, None))


def follow(pools: Dict[str, PatternPool]) -> None:
    """A rank other than 0: replay rank 0's pool operations until it says stop. Signals are left
    to rank 0, which drains and then stops the others (torchrun passes SIGTERM to every rank)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with torch.no_grad():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            op, pattern, arg = box[0]
            if op == "stop":
                return
            pool = pools[pattern]
            if op == "prefill":
                prompts, every_position = arg
                pool.prefill([SimpleNamespace(prompt=prompt) for prompt in prompts], every_position)
            elif op == "chunk":
                pool.chunk(*arg)
            elif op == "promote":
                pool.promote(SimpleNamespace())
            elif op == "step":
                pool.step(torch.tensor(arg))
            else:
                pool.release_row(arg)
