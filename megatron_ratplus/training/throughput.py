"""Throughput and memory over each --log-interval: tokens/s, model TFLOP/s per GPU, peak memory.

Model FLOPs come from megatron_ratplus.flops (the layer's parts under each step's pattern; joint
training counts its sparse and its dense step), over the wall time of the interval's iterations
(evaluation and checkpointing excluded), divided by every GPU of the run (tensor x pipeline x
context x data), as Megatron-LM reports "TFLOP/s/GPU". Memory is torch.cuda's max allocated on a
GPU; on CPU there is no allocator statistic, so it is the process's peak resident set, named so.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Dict, Sequence

import torch

from megatron_ratplus.flops import iteration_flops


def _clock() -> float:
    return time.perf_counter()


def peak_memory() -> Dict[str, float]:
    """{scalar name: GB} of this process's peak memory so far."""
    if torch.cuda.is_available():
        return {"train/memory_max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"train/memory_peak_rss_gb": rss * (1 if sys.platform == "darwin" else 1024) / 1e9}


class Throughput:
    """Times training iterations and turns them into throughput scalars once per interval."""

    def __init__(self, model_config, patterns: Sequence[str], tokens_per_iteration: int, seq_length: int,
                 gpus: int):
        self.tokens = tokens_per_iteration
        self.flops = iteration_flops(model_config, patterns, tokens_per_iteration, seq_length)
        self.gpus = gpus
        self.seconds, self.iterations, self._began = 0.0, 0, None

    def begin(self) -> None:
        """An iteration starts."""
        self._began = _clock()

    def end(self) -> None:
        """The iteration that began last is done (its losses are known, so the device is idle)."""
        self.seconds += _clock() - self._began
        self.iterations += 1

    def report(self) -> Dict[str, float]:
        """Scalars over the iterations since the last report, then start a new interval."""
        seconds = max(self.seconds, 1e-12)
        scalars = {"train/tokens_per_s": self.iterations * self.tokens / seconds,
                   "train/tflops_per_gpu": self.iterations * self.flops / seconds / self.gpus / 1e12,
                   **peak_memory()}
        self.seconds, self.iterations = 0.0, 0
        return scalars


def console_line(iteration: int, train_iters: int, scalars: Dict[str, float]) -> str:
    """Megatron-LM's style of log line: iteration, losses, LR, throughput, memory."""
    parts = [f"iteration {iteration}/{train_iters}"]
    parts += [f"{name.split('/')[-1]} {value:.4f}" for name, value in scalars.items() if "loss" in name]
    parts.append(f"lr {scalars['train/lr']:.3e}")
    parts.append(f"{scalars['train/tokens_per_s']:.0f} tokens/s")
    parts.append(f"{scalars['train/tflops_per_gpu']:.3f} TFLOP/s/GPU")
    for name, value in scalars.items():
        if name.startswith("train/memory_"):
            parts.append(f"{name[len('train/memory_'):-len('_gb')].replace('_', ' ')} {value:.2f} GB")
    return " | ".join(parts)


__all__ = ["Throughput", "console_line", "peak_memory"]
