"""Benchmark the reference ops on CPU.

(a) gated_scan forward/backward at T=4096, b=1, d=1024 vs a per-step Python loop and vs the
    memory-traffic floor (bytes moved / copy bandwidth measured in the same run);
(b) pattern_attention dilated:16 vs dense causal scaled_dot_product_attention at T=8192,
    8 heads of 64, forward and backward;
(c) the peak extra memory of each (max RSS growth, each case in a fresh subprocess).

Usage: python3 tools/bench_ops.py [--repeats N] [--seq-len T]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402
from megatron_ratplus.userfiles import check_output_path  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))  # the measured process imports from here, from any directory


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(num_bytes: int = 256 << 20) -> float:
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), 5)
    return 2 * num_bytes / seconds  # read + write


def scan_inputs(seq_len=4096, width=1024, grad=False):
    torch.manual_seed(0)
    x = torch.randn(seq_len, 1, width, requires_grad=grad)
    g = torch.sigmoid(torch.randn(seq_len, 1, width)).requires_grad_(grad)
    return x, g


def loop_scan(x, g):
    state, out = torch.zeros_like(x[0]), []
    for t in range(x.shape[0]):
        state = g[t] * state + (1 - g[t]) * x[t]
        out.append(state)
    return torch.stack(out)


def attention_inputs(seq_len, grad=False):
    torch.manual_seed(0)
    return [torch.randn(seq_len, 1, 8, 64, requires_grad=grad) for _ in range(3)]


def dense_sdpa(q, k, v):
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True)
    return out.permute(2, 0, 1, 3)


def fwd_bwd(fn, *inputs):
    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None
    return step


def case(name: str, seq_len: int):
    """Build the callable for one named case (also used by the memory subprocess)."""
    from megatron_ratplus.ops import gated_scan, pattern_attention

    if name.startswith("scan"):
        x, g = scan_inputs(grad=name.endswith("bwd"))
        fn = (lambda a, b: gated_scan(a, b)[0]) if "ref" in name else loop_scan
        return fwd_bwd(fn, x, g) if name.endswith("bwd") else (lambda: fn(x, g))
    q, k, v = attention_inputs(seq_len, grad=name.endswith("bwd"))
    fn = (lambda a, b, c: pattern_attention(a, b, c, "dilated:16")) if "dilated" in name else dense_sdpa
    return fwd_bwd(fn, q, k, v) if name.endswith("bwd") else (lambda: fn(q, k, v))


def peak_memory_mb(name: str, seq_len: int, module: str = "bench_ops") -> float:
    """Max-RSS growth of running one case (``module.case``), in a fresh process, over a process
    that only builds its inputs."""
    build = f"import resource,sys; sys.path.insert(0,{TOOLS!r}); import {module} as b; f=b.case('{name}',{seq_len}); "
    report = "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    peak = int(subprocess.check_output([sys.executable, "-c", build + "f(); " + report]).split()[-1])
    floor = int(subprocess.check_output([sys.executable, "-c", build + report]).split()[-1])
    return max(0, peak - floor) / 1024


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--seq-len", type=positive_int, default=8192, help="attention sequence length")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.json:  # before the measurements, not after them
        check_output_path("--json", args.json)
    # memory first: a child's max RSS starts at its parent's RSS (kept across exec), so the
    # parent must still be small when the measuring processes start
    memory = {n: peak_memory_mb(n, args.seq_len) for n in
              ("scan_ref_bwd", "scan_loop_bwd", "attn_dilated_bwd", "attn_dense_bwd")}
    bandwidth = copy_bandwidth()
    elems = 4096 * 1024
    floors = {"fwd": 3 * elems * 4 / bandwidth, "bwd": 9 * elems * 4 / bandwidth}
    rows, results = [], {"copy_bandwidth_GBps": bandwidth / 1e9, "threads": torch.get_num_threads()}
    for phase in ("fwd", "bwd"):
        loop_reps = 1 if phase == "bwd" else args.repeats
        ref = median_time(case(f"scan_ref_{phase}", 0), args.repeats)
        loop = median_time(case(f"scan_loop_{phase}", 0), loop_reps)
        results[f"scan_{phase}"] = dict(ref_ms=ref * 1e3, loop_ms=loop * 1e3, floor_ms=floors[phase] * 1e3)
        rows.append((f"gated_scan {phase} T=4096 d=1024", ref, loop, f"floor {floors[phase] * 1e3:.2f} ms"))
    for phase in ("fwd", "bwd"):
        sparse = median_time(case(f"attn_dilated_{phase}", args.seq_len), args.repeats)
        dense = median_time(case(f"attn_dense_{phase}", args.seq_len), args.repeats)
        results[f"attention_{phase}"] = dict(dilated16_ms=sparse * 1e3, dense_sdpa_ms=dense * 1e3)
        rows.append((f"dilated:16 vs dense SDPA {'fwd' if phase == 'fwd' else 'fwd+bwd'} T={args.seq_len}",
                     sparse, dense, f"speed-up {dense / sparse:.1f}x"))
    results["peak_extra_memory_MB"] = memory

    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    print(f"{'case':48s} {'ours ms':>9s} {'baseline ms':>12s}  note")
    for name, ours, base, note in rows:
        print(f"{name:48s} {ours * 1e3:9.1f} {base * 1e3:12.1f}  {note}")
    print("peak extra memory (fwd+bwd, MB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
