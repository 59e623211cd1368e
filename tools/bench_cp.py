"""Context-parallel communication volume and CPU wall time (docs/DESIGN.md §4).

(a) Bytes each CP rank sends per layer, forward (the backward reduce-scatter mirrors it):
    the recurrence's state exchange at T = 4K, 16K, 64K (measured on the tensor the code
    all-gathers; it must not grow with T), the attention exchange for dense vs dilated:16
    (measured from the exchange width the code uses), each next to what an all-to-all
    (Ulysses-style, as megatron's CP for Mamba/GDN) CP would send for the same operator.
    Ring all-gather: a rank sends its piece to CP - 1 peers; all-to-all: (CP - 1) / CP of its
    local activations each way. Layer of the 1.5B model: d = 2048, 16 heads, micro-batch 1,
    bf16 activations, fp32 recurrence state.
(b) Wall time of one RAT+ mixer layer (forward + backward) at T = 16K on CPU, CP1 vs CP2
    (torchrun under gloo on this machine's cores), and the compute of the recurrence + attention
    alone in one process: the whole sequence vs CP2 rank 0's share (the exchange replaced by
    stacking both ranks' pieces), which separates per-rank work from process contention.
(c) Peak extra memory (max-RSS growth, forward + backward, each case in a fresh process) of
    dense attention at T = 2K, 4K, 8K (4 heads of 64, micro-batch 1, fp32): one rank holding
    the whole sequence, CP2 rank 0 with the all-gathered K~/V~ (the public-token exchange,
    which for dense is every token) and CP2 rank 0 with the ring. Rank 1 is stood in for by an
    exchange that hands back a fresh buffer of the sent size, as a real receive allocates.

Usage: python3 tools/bench_cp.py [--seq-len 16384] [--repeats 3] [--skip-timing] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ratplus.cli import run_cli  # noqa: E402
from megatron_ratplus.cli.types import positive_int  # noqa: E402
from megatron_ratplus.errors import ArgumentParser  # noqa: E402

HIDDEN, HEADS, BATCH, ACT_BYTES = 2048, 16, 1, 2  # the 1.5B layer, bf16 activations


def recurrence_bytes(seq_len: int, cp: int) -> dict:
    """The state exchange, measured on scan_slices' summary for a reduced width, scaled to d."""
    from megatron_ratplus.layers.context_parallel.scan import scan_slices

    width = 64  # channels actually scanned here; bytes are linear in channels
    local = seq_len // cp
    x = torch.randn(local, BATCH, 2, width)  # keys and values, as the mixer stacks them
    g = torch.rand(local, BATCH, 2, width)
    _, _, summary = scan_slices(x, g)
    piece = summary.numel() * summary.element_size() * HIDDEN // width
    a2a = (cp - 1) / cp * local * BATCH * HIDDEN * ACT_BYTES * (3 + 2)  # k, v, g out; k~, v~ back
    return {"T": seq_len, "cp": cp, "state_passing": piece * (cp - 1), "all_to_all": int(a2a)}


def attention_bytes(seq_len: int, cp: int, pattern: str) -> dict:
    from megatron_ratplus.layers.context_parallel.attention import exchanged_tokens
    from megatron_ratplus.patterns import parse_pattern

    chunk = seq_len // (2 * cp)
    tokens = 2 * exchanged_tokens(parse_pattern(pattern), chunk, cp)  # two slices per rank
    gather = tokens * BATCH * 2 * HIDDEN * ACT_BYTES * (cp - 1)  # K~ and V~
    a2a = (cp - 1) / cp * (seq_len // cp) * BATCH * HIDDEN * ACT_BYTES * (3 + 1)  # q, k~, v~ out; y back
    return {"T": seq_len, "cp": cp, "pattern": pattern, "all_gather": gather, "all_to_all": int(a2a)}


def time_mixer(seq_len: int, repeats: int, pattern: str) -> float:
    """Best-of-N forward + backward seconds of one mixer on this rank's share of the sequence."""
    import torch.distributed as dist

    from megatron_ratplus import distributed
    from megatron_ratplus.config import preset
    from megatron_ratplus.layers.specs import get_ratplus_layer_local_spec
    from megatron_ratplus.training.schedule import slice_batch_for_cp
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    cp = int(os.environ.get("WORLD_SIZE", "1"))
    distributed.initialize(context_parallel=cp)
    config = preset("tiny", num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=seq_len,
                    attention_pattern=pattern, context_parallel_size=cp)
    torch.manual_seed(0)
    mixer = build_module(get_ratplus_layer_local_spec().submodules.self_attention, config=config)
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0)(seq_len)
    x = slice_batch_for_cp({"x": torch.randn(1, seq_len, config.hidden_size)})["x"].transpose(0, 1)
    x.requires_grad_()

    def step():
        out, _ = mixer(x, rotary_pos_emb=rope)
        out.sum().backward()

    step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return min(times)  # best of N: the machine may be shared


def time_rank_share(seq_len: int, repeats: int, pattern: str) -> dict:
    """Best-of-N seconds of scan + attention (forward + backward), whole sequence vs CP2 rank 0's share."""
    from megatron_ratplus.layers.context_parallel.attention import attend_slices, pack_public
    from megatron_ratplus.layers.context_parallel.ring import ring_attention
    from megatron_ratplus.layers.context_parallel.scan import compose_and_correct, scan_slices
    from megatron_ratplus.ops import gated_scan, pattern_attention
    from megatron_ratplus.patterns import parse_pattern

    pattern, heads, dim = parse_pattern(pattern), 4, 64
    torch.manual_seed(0)
    x, g = torch.randn(seq_len, 1, 2, heads, dim), torch.rand(seq_len, 1, 2, heads, dim)
    q, k, v = (torch.randn(seq_len, 1, heads, dim) for _ in range(3))

    def whole():
        leaves = [t.clone().requires_grad_() for t in (x, g, q, k, v)]
        h, _ = gated_scan(leaves[0], leaves[1])
        (h.sum() + pattern_attention(*leaves[2:], pattern, dim ** -0.5).sum()).backward()

    def share():  # rank 0 of 2 holds chunks 0 and 3: the first and last quarters
        quarter = seq_len // 4
        leaves = [torch.cat([t[:quarter], t[-quarter:]]).requires_grad_() for t in (x, g, q, k, v)]
        states, decays, summary = scan_slices(leaves[0], leaves[1])
        h, _ = compose_and_correct(states, decays, torch.stack([summary, summary.detach()]), None, 0, 2)
        if pattern.is_dense:  # the ring, rank 1 stood in for by a buffer of the same size
            y = ring_attention(*leaves[2:], LoopbackExchange(), 0, 2, dim ** -0.5)
        else:
            public = pack_public(leaves[3], leaves[4], pattern, 0, 2)
            public = torch.cat([public, public.detach()])  # rank 1's piece: same size, no work here
            y = attend_slices(*leaves[2:], public, pattern, 0, 2, dim ** -0.5)
        (h.sum() + y.sum()).backward()

    result = {}
    for name, fn in (("whole sequence", whole), ("cp2 rank share", share)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = min(times)
    return result


class LoopbackExchange:
    """Stands in for CP rank 1 in the ring: each receive is a fresh buffer of the sent tensor's size."""

    def start(self, tensor, tag):
        self.received = tensor.clone()
        return self

    def wait(self):
        return self.received


DENSE_MEMORY_CASES = ("one rank", "cp2 all-gather", "cp2 ring")


def case(name: str, seq_len: int):
    """A callable running forward + backward of dense attention as ``name`` (one of DENSE_MEMORY_CASES);
    its inputs are built here, outside the measured call."""
    from megatron_ratplus.layers.context_parallel.attention import attend_slices, pack_public
    from megatron_ratplus.layers.context_parallel.ring import ring_attention
    from megatron_ratplus.ops import pattern_attention
    from megatron_ratplus.patterns import parse_pattern

    torch.manual_seed(0)
    dense = parse_pattern("dense")
    length = seq_len if name == "one rank" else seq_len // 2
    q, k, v, k1, v1 = (torch.randn(length, 1, 4, 64) for _ in range(5))  # k1, v1: rank 1's, for the gather

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if name == "one rank":
            out = pattern_attention(*leaves, dense)
        elif name == "cp2 all-gather":
            public = torch.cat([pack_public(leaves[1], leaves[2], dense, 0, 2), pack_public(k1, v1, dense, 1, 2)])
            out = attend_slices(*leaves, public, dense, 0, 2, 0.125)
        else:
            out = ring_attention(*leaves, LoopbackExchange(), 0, 2, 0.125)
        out.sum().backward()

    return run


def launch_timing(nproc: int, seq_len: int, repeats: int, pattern: str) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.abspath(__file__), "--worker", "--seq-len", str(seq_len), "--repeats", str(repeats),
           "--pattern", pattern]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=positive_int, default=16384)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--pattern", default="dilated:16,w=8,p=2")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seconds = time_mixer(args.seq_len, args.repeats, args.pattern)
        if int(os.environ.get("RANK", "0")) == 0:
            print(seconds)
        return

    report = {"recurrence": [recurrence_bytes(t, cp) for t in (4096, 16384, 65536) for cp in (2, 8)],
              "attention": [attention_bytes(t, cp, p) for t in (4096, 16384, 65536) for cp in (2, 8)
                            for p in ("dense", "dilated:16")]}
    if not args.skip_timing:
        report["mixer_seconds"] = {f"cp{n} {p}": launch_timing(n, args.seq_len, args.repeats, p)
                                   for p in (args.pattern, "dense") for n in (1, 2)}
        torch.set_num_threads(1)  # as torchrun's workers
        report["scan_attention_seconds"] = {p: time_rank_share(args.seq_len, args.repeats, p)
                                            for p in (args.pattern, "dense")}
    if not args.skip_memory:
        from bench_ops import peak_memory_mb

        report["dense_attention_peak_extra_MB"] = {
            t: {n: round(peak_memory_mb(n, t, module="bench_cp"), 1) for n in DENSE_MEMORY_CASES}
            for t in (2048, 4096, 8192)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(run_cli(os.path.basename(__file__), main))
