"""GPU check of megatron-ratplus on one GPU (sized for an H200, < 8 minutes): one JSON report.

1. kernel correctness (bf16, d_h 128) of every Triton kernel against its reference op evaluated
   in fp32 on the same inputs: gated scan (T = 32K), shared-gate k/v scan, pattern attention
   forward and gradients (T up to 32K), top-k block attention, decode over a compact cache;
2. the training path (tools/gpu_check_train.py): a 12-layer d 768 model for 30 iterations at
   sequence 4096 with --transformer-impl local, then transformer_engine, then FP8, loss curves
   side by side; a checkpoint at iteration 15 resumed to 30 with the distributed optimizer;
   FP8's precision boundaries; the context-parallel building blocks timed; DALI vs the plain loader;
3. kernel timings with CUDA events (warm-up, then the median of repeats): scan GB/s next to a
   measured device copy bandwidth; pattern attention forward and backward against dense causal
   scaled_dot_product_attention (flash backend) at T = 8K, 32K, 128K for D = 16 and 64; decode
   step latency at context 32K, sparse (D = 16) against dense.

Every section is guarded: one that fails is reported and the others still run; one that cannot
run here (no Transformer Engine, no DALI) is skipped with its reason. The JSON is rewritten
after every section, so a run cut short keeps what it measured.

--wheels DIR installs the wheels in DIR (megatron-core, Transformer Engine, DALI...) with pip,
offline, before the sections that need them. --dry-run runs at toy sizes on CPU under Triton's
interpreter: the kernel sections and the CPU-capable training sections (a run and its resume),
skipping the GPU-only ones with a reason.

Usage: tools/gpu_check.sh [--json PATH] [--dry-run] [--wheels DIR] [--sections a,b,...]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sizes:
    dtype: str = "bfloat16"
    head_dim: int = 128
    heads: int = 16
    check_heads: int = 4
    scan_check_len: int = 32768
    attn_check: tuple = (("dilated:16,w=256,p=4", 32768), ("dilated:64", 8192), ("local:w=512,p=4", 8192),
                         ("dilated:5,w=3,p=1", 4099))
    topk_check: tuple = (("topk:k=8,block=64", 4096), ("topk:k=4,block=32,d=4,w=64,p=4", 4096))
    decode_check: tuple = (8, 4096)  # batch, cache capacity
    scan_shape: tuple = (8192, 8, 16, 128)  # T, b, heads, d_h for the throughput figure
    copy_bytes: int = 1 << 30
    attn_lens: tuple = (8192, 32768, 131072)
    dilations: tuple = (16, 64)
    decode_batch: int = 8
    decode_context: int = 32768
    warmup: int = 3
    repeats: int = 10
    dense_repeats: dict = field(default_factory=lambda: {131072: 3})
    tol: float = 3e-2


DRY_RUN = Sizes(dtype="float32", head_dim=16, heads=2, check_heads=2, scan_check_len=45,
                attn_check=(("dilated:4,w=3,p=2", 37), ("local:w=5", 20)), topk_check=(("topk:k=1,block=4", 17),),
                decode_check=(2, 40), scan_shape=(20, 1, 2, 8), copy_bytes=1 << 16, attn_lens=(32,),
                dilations=(4,), decode_batch=1, decode_context=64, warmup=0, repeats=1, dense_repeats={}, tol=1e-4)


def import_kernels():
    """This checkout's megatron_ratplus, tools/ and ratplus_kernels (its kernels/ folder) first
    on the path, installed or not."""
    for path in (ROOT / "kernels", ROOT / "tools", ROOT):
        sys.path.insert(0, str(path))


class Timer:
    """Median milliseconds of fn() after warm-up: CUDA events on a GPU, perf_counter otherwise."""

    def __init__(self, torch, device, sizes):
        self.torch, self.cuda, self.sizes = torch, device.type == "cuda", sizes

    def __call__(self, fn, repeats=None) -> float:
        repeats = repeats or self.sizes.repeats
        for _ in range(self.sizes.warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, stop = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)


def kernel_attention(q, k, v, pattern: str):
    """The kernels' path for a sparse pattern (the backend's, without its device choice)."""
    from megatron_ratplus.backend import kernel_attention as kernel
    from megatron_ratplus.patterns import parse_pattern

    return kernel(q, k, v, parse_pattern(pattern))


def rel_error(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def with_grads(fn, inputs, grad_out_seed=0):
    """(output, input gradients) of fn under a fixed random output weighting, inputs as fresh leaves."""
    import torch

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if not out.requires_grad:  # forward-only op (decode)
        return [out.detach()]
    gen = torch.Generator(device=out.device).manual_seed(grad_out_seed)
    weight = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
    grads = torch.autograd.grad((out.float() * weight).sum(), leaves)
    return [out.detach(), *grads]


def correctness(torch, device, dtype, s: Sizes):
    """Kernel (in ``dtype``) vs reference (fp32 copies of the same inputs): name -> max relative error."""
    from megatron_ratplus.ops import gated_scan as ref_scan
    from megatron_ratplus.ops import pattern_attention as ref_attention
    from megatron_ratplus.ops.decode import decode_attention as ref_decode
    from megatron_ratplus.patterns import parse_pattern
    from ratplus_kernels.decode import decode_attention
    from ratplus_kernels.scan import gated_scan, gated_scan_kv

    torch.manual_seed(0)
    errors = {}

    def compare(name, fn, ref, inputs):
        try:  # a kernel that fails to compile or run is reported, and the others still checked
            got = with_grads(fn, inputs)
            want = with_grads(ref, [t.float() for t in inputs])
            errors[name] = max(rel_error(a, b) for a, b in zip(got, want))
        except Exception as err:  # noqa: BLE001
            errors[name] = f"{type(err).__name__}: {err}"

    shape = (s.scan_check_len, 1, s.check_heads, s.head_dim)
    x = torch.randn(shape, device=device).to(dtype)
    g = torch.sigmoid(torch.randn(shape, device=device) + 2).to(dtype)
    h0 = torch.randn(shape[1:], device=device).to(dtype)

    def states_and_last(scan):  # one output that depends on both h and h_last
        return lambda a, b, c: (lambda h, last: h.float() + last.float())(*scan(a, b, c))

    compare(f"scan T={shape[0]}", states_and_last(gated_scan), states_and_last(ref_scan), [x, g, h0])

    def kv_reference(k, v, logits):
        gate = torch.sigmoid(logits.float()).unsqueeze(2)
        kv = torch.stack([k, v], dim=2)
        return ref_scan(kv, gate.expand_as(kv))[0]

    logits = torch.randn(shape, device=device).to(dtype) + 2
    compare(f"scan k/v shared gate T={shape[0]}", lambda k, v, lg: torch.stack(gated_scan_kv(k, v, lg)[:2], 2),
            kv_reference, [x, torch.randn_like(x), logits])

    for pattern, seq_len in s.attn_check + s.topk_check:
        qkv = [torch.randn(seq_len, 1, s.check_heads, s.head_dim, device=device).to(dtype) for _ in range(3)]
        compare(f"attention {pattern} T={seq_len}", lambda q, k, v: kernel_attention(q, k, v, pattern),
                lambda q, k, v: ref_attention(q, k, v, pattern), qkv)

    batch, capacity = s.decode_check  # ragged query positions; a quarter of the slots empty or duplicate (-1)
    q = torch.randn(batch, s.heads, s.head_dim, device=device).to(dtype)
    caches = [torch.randn(batch, s.heads, capacity, s.head_dim, device=device).to(dtype) for _ in range(2)]
    query_pos = torch.randint(capacity, 4 * capacity, (batch,), device=device)
    slot_pos = torch.stack([torch.randperm(int(t) + 1, device=device)[:capacity] for t in query_pos])
    slot_pos[torch.rand(batch, capacity, device=device) < 0.25] = -1
    decode_pattern = parse_pattern("dilated:16,w=64,p=4")
    numbers = (decode_pattern.dilation, decode_pattern.window, decode_pattern.sinks)
    compare(f"decode {decode_pattern} S={capacity}", lambda *a: decode_attention(*a, slot_pos, query_pos, *numbers),
            lambda *a: ref_decode(*a, slot_pos, query_pos, decode_pattern), [q, *caches])
    return errors


def copy_and_scan(torch, device, dtype, s: Sizes, timer: Timer, rows, results):
    from ratplus_kernels.scan import gated_scan, gated_scan_kv

    src = torch.empty(s.copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * s.copy_bytes / timer(lambda: dst.copy_(src)) / 1e6
    del src, dst
    results["copy_bandwidth_GBps"] = copy_gbps
    rows.append(("device copy (read + write)", f"{copy_gbps:.0f} GB/s", ""))

    seq_len, batch, heads, head_dim = s.scan_shape
    numel = seq_len * batch * heads * head_dim
    k, v, logits = (torch.randn(s.scan_shape, device=device).to(dtype) for _ in range(3))
    gate = torch.sigmoid(logits)
    leaves = [t.clone().requires_grad_() for t in (k, v, logits)]
    outs = gated_scan_kv(*leaves)
    grads = [torch.randn_like(o) for o in outs[:2]]
    cases = (("scan_fwd", "scan fwd (x, g -> h)", lambda: gated_scan(k, gate), 3),
             ("scan_fwd_one_segment", "scan fwd, one segment", lambda: gated_scan(k, gate, segments=1), 3),
             ("scan_kv_fwd", "scan k/v shared gate fwd", lambda: gated_scan_kv(k, v, logits), 5),
             ("scan_kv_bwd", "scan k/v shared gate bwd",
              lambda: torch.autograd.grad(outs[:2], leaves, grads, retain_graph=True), 10))
    for key, name, fn, units in cases:
        ms = timer(fn)
        gbps = units * numel * k.element_size() / ms / 1e6  # bytes each must move at least once
        results[key] = dict(ms=ms, GBps=gbps, fraction_of_copy=gbps / copy_gbps)
        rows.append((f"{name} {tuple(s.scan_shape)}", f"{gbps:.0f} GB/s",
                     f"{ms:.3f} ms, {100 * gbps / copy_gbps:.0f}% of copy"))


def attention(torch, device, dtype, s: Sizes, timer: Timer, rows, results, seq_len: int):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    qkv = [torch.randn(1, s.heads, seq_len, s.head_dim, device=device).to(dtype) for _ in range(3)]
    dense_inputs = [t.requires_grad_() for t in qkv]
    sparse_inputs = [t.detach().permute(2, 0, 1, 3).contiguous().requires_grad_() for t in qkv]
    cases = [("dense flash", flash, dense_inputs)]
    cases += [(f"dilated:{d}", (lambda d: lambda a, b, c: kernel_attention(a, b, c, f"dilated:{d}"))(d),
               sparse_inputs) for d in s.dilations]
    repeats = s.dense_repeats.get(seq_len)
    base = {}
    for name, fn, inputs in cases:
        fwd = timer(lambda: fn(*inputs), repeats)
        out = fn(*inputs)
        grad = torch.randn_like(out)
        bwd = timer(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), repeats)
        del out, grad
        base.setdefault("fwd", fwd)
        base.setdefault("bwd", bwd)
        results[f"attention T={seq_len} {name}"] = dict(fwd_ms=fwd, bwd_ms=bwd, fwd_speedup=base["fwd"] / fwd,
                                                        bwd_speedup=base["bwd"] / bwd)
        rows.append((f"attention T={seq_len} {name} fwd / bwd", f"{fwd:.2f} / {bwd:.2f} ms",
                     "" if name.startswith("dense") else
                     f"{base['fwd'] / fwd:.1f}x / {base['bwd'] / bwd:.1f}x vs dense"))


def decode(torch, device, dtype, s: Sizes, timer: Timer, rows, results):
    import torch.nn.functional as F

    from megatron_ratplus.patterns import parse_pattern
    from ratplus_kernels.decode import decode_attention

    context, batch = s.decode_context, s.decode_batch
    q = torch.randn(batch, s.heads, s.head_dim, device=device).to(dtype)
    measured = {}
    t = context - 1  # the query's position; dense: the full layout, dilated:16: [ring of 1 | chunk ends]
    query_pos = torch.full((batch,), t, device=device, dtype=torch.int32)
    for name, slots in (("dense", context), ("dilated:16", parse_pattern("dilated:16").cache_slots(context))):
        caches = [torch.randn(batch, s.heads, slots, s.head_dim, device=device).to(dtype) for _ in range(2)]
        if name == "dense":
            slot_pos, numbers = torch.arange(slots, device=device), (1, 0, 0)
        else:
            ring = torch.tensor([-1 if (t + 1) % 16 == 0 else t], device=device)  # a chunk end counts in its state slot
            slot_pos, numbers = torch.cat([ring, torch.arange(1, slots, device=device) * 16 - 1]), (16, 0, 0)
        slot_pos = slot_pos.to(torch.int32).expand(batch, slots).contiguous()
        measured[name] = timer(lambda: decode_attention(q, *caches, slot_pos, query_pos, *numbers))
        rows.append((f"decode b={batch} context={context} {name} ({slots} slots)", f"{measured[name] * 1e3:.1f} us",
                     "our kernel"))
        if name == "dense":
            measured["dense sdpa"] = timer(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), *caches))
            rows.append((f"decode b={batch} context={context} dense (SDPA)", f"{measured['dense sdpa'] * 1e3:.1f} us",
                         ""))
        del caches
    results["decode_ms"] = measured
    results["decode_speedup_D16_vs_best_dense"] = min(measured["dense"], measured["dense sdpa"]) / measured["dilated:16"]


def targets(results, s: Sizes):
    """The GPU targets, evaluated on what was measured."""
    scan = max((results[k]["fraction_of_copy"] for k in ("scan_fwd", "scan_fwd_one_segment") if k in results),
               default=None)
    prefill = results.get("attention T=32768 dilated:16", {}).get("fwd_speedup")
    decode_speedup = results.get("decode_speedup_D16_vs_best_dense")
    return {  # None: not measured (a failed section, or a dry run's sizes)
        "scan fwd >= 60% of copy bandwidth": None if scan is None else scan >= 0.6,
        "dilated:16 prefill at 32K >= 8x dense flash": None if prefill is None else prefill >= 8,
        "decode 32K D=16 >= 10x dense": None if decode_speedup is None else decode_speedup >= 10,
    }


def install_wheels(directory: str) -> dict:
    """pip install every wheel in ``directory``, offline (dependencies from the same folder only)."""
    wheels = sorted(str(p) for p in Path(directory).glob("*.whl"))
    if not wheels:
        return dict(installed=[], note=f"no wheels in {directory}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", directory, *wheels]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return dict(installed=[Path(w).name for w in wheels], returncode=result.returncode,
                tail=(result.stdout + result.stderr).strip().splitlines()[-3:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="where to write the JSON (default $OUT/gpu_check.json or ./gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--wheels", metavar="DIR", help="pip-install the wheels in DIR first (offline)")
    parser.add_argument("--sections", help="comma-separated section names to run (default: all)")
    parser.add_argument("--budget-s", type=float, default=450, help="time for all sections (default 450)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    began = time.time()
    wheels = install_wheels(args.wheels) if args.wheels else None
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU smoke test)", file=sys.stderr)
        return 2
    import_kernels()
    import gpu_check_train as train

    sizes = DRY_RUN if args.dry_run else Sizes()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = getattr(torch, sizes.dtype)
    path = Path(args.json or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, results, failures, skipped, training = [], {}, {}, {}, {}
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  versions=installed_versions(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), sizes=asdict(sizes), wheels=wheels,
                  timings=results, training=training, failures=failures, skipped=skipped)

    def save():  # after every section, so a run cut short by the time limit keeps what it measured
        report.update(targets=targets(results, sizes), seconds=time.time() - began)
        path.write_text(json.dumps(report, indent=2, default=str))

    timer = Timer(torch, device, sizes)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = train.Context(torch=torch, device=device, dry_run=args.dry_run,
                        sizes=train.DRY_TRAIN if args.dry_run else train.TrainSizes(), work=work, timer=timer,
                        deadline=began + args.budget_s)
    kernel_timings = [("copy and scan", copy_and_scan, ())] + \
        [(f"attention T={n}", attention, (n,)) for n in sizes.attn_lens] + [("decode", decode, ())]
    sections = [("kernel correctness", None)] + [(n, f) for n, f in train.SECTIONS] + \
        [(n, (f, extra)) for n, f, extra in kernel_timings]
    wanted = set(args.sections.split(",")) if args.sections else {n for n, _ in sections}
    unknown = wanted - {n for n, _ in sections}
    if unknown:
        print(f"gpu_check: unknown section(s) {sorted(unknown)}; choose from {[n for n, _ in sections]}",
              file=sys.stderr)
        return 2
    for name, section in sections:
        if name not in wanted:
            continue
        if ctx.remaining() < 20:
            skipped[name] = f"out of time ({args.budget_s:.0f} s budget spent)"
            continue
        try:  # one failing section must not cost the figures of the others
            if section is None:
                errors = correctness(torch, device, dtype, sizes)
                report.update(max_relative_error=errors,
                              correct=all(not isinstance(e, str) and e <= sizes.tol for e in errors.values()))
            elif isinstance(section, tuple):
                section[0](torch, device, dtype, sizes, timer, rows, results, *section[1])
            else:
                training[name] = section(ctx)
        except train.Skip as why:
            skipped[name] = str(why)
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
            failures[name] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if ctx.runs:
            report["loss_curves"] = train.loss_curves(ctx)
        save()
    shutil.rmtree(work, ignore_errors=True)

    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}, {report['date']}")
    print(f"{'check':58s} {'value':>18s}  note")
    errors = report.get("max_relative_error", {})
    for name, err in errors.items():
        if isinstance(err, str):
            print(f"{'correct: ' + name:58s} {'FAIL':>18s}  {err}")
        else:
            print(f"{'correct: ' + name:58s} {err:18.1e}  {'ok' if err <= sizes.tol else 'FAIL'} (tol {sizes.tol:.0e})")
    for name, value, note in rows:
        print(f"{name:58s} {value:>18s}  {note}")
    for name, out in training.items():
        shown = {k: v for k, v in out.items() if not isinstance(v, (dict, list)) and k != "command"}
        print(f"{'training: ' + name:58s} {'':>18s}  {shown}")
    if report.get("loss_curves"):
        names = list(ctx.runs)
        print("loss by iteration: " + " / ".join(names))
        for step, losses in report["loss_curves"].items():
            print(f"  {step:>4s}  " + "  ".join("-" if losses[n] is None else f"{losses[n]:.4f}" for n in names))
    for name, why in skipped.items():
        print(f"{'skipped: ' + name:58s} {'-':>18s}  {why}")
    for name, err in failures.items():
        print(f"{'FAILED: ' + name:58s} {'-':>18s}  {err}")
    for name, met in report["targets"].items():
        print(f"{'target: ' + name:58s} {str(met):>18s}")
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return 0 if report.get("correct", "kernel correctness" not in wanted) and not failures else 1


def installed_versions() -> dict:
    """Versions of the optional stack, from package metadata (no import: TE/DALI imports are slow)."""
    from importlib import metadata

    candidates = {"megatron-core": ("megatron-core", "megatron_core"),
                  "transformer-engine": ("transformer-engine", "transformer_engine"),
                  "nvidia-dali": ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali"),
                  "apex": ("apex",)}
    found = {}
    for label, names in candidates.items():
        found[label] = None
        for name in names:
            try:
                found[label] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


if __name__ == "__main__":
    sys.exit(main())
