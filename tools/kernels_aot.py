"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, no GPU needed.

Our launchers run on CPU tensors with their CUDA tile choices, on representative shapes (bf16
and fp32, d_h 64 and 128, ragged lengths), while Triton's launch is replaced by a recorder: each
launch (kernel, arguments, num_warps, num_stages) is kept, not run. Each distinct launch is
then specialised by Triton's own binder exactly as a GPU launch would be and compiled with
``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)`` (ptxas ships in the Triton wheel).
The table gives each kernel's shared memory against the target's opt-in limit per block, and
the registers and spill bytes that ptxas reports. Results are cached by source hash under
Triton's cache directory, so a repeated run only re-reads them.

Usage: python3 tools/kernels_aot.py [--json PATH] [--targets sm_80,sm_90]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions (the test suite interprets them); before triton

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "kernels")]

# compute capability and opt-in shared memory per block (bytes): A100 163 KiB, H100/H200 227 KiB
TARGETS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
SHAPES = dict(seq=300, batch=2, heads=3, far=45, slots=200)  # ragged: no length a multiple of 16


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    case: str  # which launcher call produced it


@dataclass
class Result:
    kernel: str
    case: str
    target: str
    constexprs: str
    num_warps: int
    num_stages: int
    shared: int = 0
    limit: int = 0
    registers: int = 0
    spill_bytes: int = 0
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= self.limit


def _cuda_tiles():
    """The launchers' tile choices with ``device`` read as a CUDA device (the tensors stay on CPU)."""
    import ratplus_kernels.attention as attention
    import ratplus_kernels.scan as scan
    import ratplus_kernels.slice_attention as slice_attention

    cuda = torch.device("cuda")
    blocks, tiles = attention._blocks, scan._tiles
    return [mock.patch.object(attention, "_blocks", lambda device, *a: blocks(cuda, *a)),
            mock.patch.object(slice_attention, "_blocks", lambda device, *a: blocks(cuda, *a)),
            mock.patch.object(scan, "_tiles", lambda device: tiles(cuda))]


def _calls(dtype: torch.dtype, head_dim: int):
    """(case name, thunk) pairs: every launcher, forward and backward, at one dtype and head dim."""
    from ratplus_kernels.attention import dilated_attention
    from ratplus_kernels.decode import decode_attention
    from ratplus_kernels.scan import gated_scan, gated_scan_kv
    from ratplus_kernels.slice_attention import slice_attention
    from ratplus_kernels.topk import topk_attention

    s = SHAPES
    shape = (s["seq"], s["batch"], s["heads"], head_dim)

    def leaf(*size):
        return torch.randn(size or shape).to(dtype).requires_grad_()

    def attention():
        q, k, v = leaf(), leaf(), leaf()
        out = dilated_attention(q, k, v, 16, 64, 4)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    def sliced():
        q, k, v, fk, fv = leaf(), leaf(), leaf(), leaf(s["far"], *shape[1:]), leaf(s["far"], *shape[1:])
        pos = torch.arange(s["far"]) * 15 + 14
        out = slice_attention(q, k, v, fk, fv, pos, 1000, 16, 64, 4)
        torch.autograd.grad(out, (q, k, v, fk, fv), torch.ones_like(out))

    def topk():
        q, k, v = leaf(), leaf(), leaf()
        chosen = torch.randint(-1, 4, (s["batch"], s["heads"], s["seq"], 2))
        out = topk_attention(q, k, v, chosen, 4, 32, 4, 16)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    def decode(splits):
        def run():
            q = torch.randn(s["batch"], s["heads"], head_dim).to(dtype)
            caches = [torch.randn(s["batch"], s["heads"], s["slots"], head_dim).to(dtype) for _ in range(2)]
            slot_pos = torch.randint(-1, 1000, (s["batch"], s["slots"]))
            decode_attention(q, *caches, slot_pos, torch.full((s["batch"],), 999), 16, 64, 4, splits=splits)
        return run

    def scan(segments):
        def run():
            x, g, h0 = leaf(), leaf(), leaf(*shape[1:])
            h, last = gated_scan(x, torch.sigmoid(g), h0, segments=segments)
            torch.autograd.grad(h.sum() + last.sum(), (x, g, h0))
            k, v, logits = leaf(), leaf(), leaf()
            hk, hv, state = gated_scan_kv(k, v, logits, segments=segments)
            torch.autograd.grad(hk.sum() + hv.sum() + state.sum(), (k, v, logits))
        return run

    return [("attention", attention), ("slice attention", sliced), ("top-k", topk),
            ("decode, one split", decode(1)), ("decode, 3 splits", decode(3)),
            ("scan, one segment", scan(1)), ("scan, 4 segments", scan(4))]


def record_launches(dtypes=(torch.bfloat16, torch.float32), head_dims=(64, 128), only: str = ""):
    """Every kernel launch our launchers make at their CUDA tiles, recorded instead of run
    (``only``: the launcher calls whose case name starts with it)."""
    launches, case = [], [""]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, case[0]))

    with contextlib.ExitStack() as stack:
        for patch in _cuda_tiles() + [mock.patch.object(JITFunction, "run", record)]:
            stack.enter_context(patch)
        torch.manual_seed(0)
        for dtype in dtypes:
            for head_dim in head_dims:
                for name, call in _calls(dtype, head_dim):
                    if not name.startswith(only):
                        continue
                    case[0] = f"{name} {str(dtype).split('.')[-1]} d_h={head_dim}"
                    call()
    return launches


def _specialise(launch: Launch, target: GPUTarget):
    """(source, options) exactly as Triton's launch would build them for ``target``."""
    fn, backend = launch.kernel, make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, constexprs


def _ptxas_numbers(log: str):
    regs = re.findall(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return (int(regs[-1]) if regs else -1), (spills[-1] if spills else -1)


def _plan(launch: Launch, target_name: str):
    """(cache key, the Result without its compiled figures, what to compile) of one launch on one target."""
    capability, limit = TARGETS[target_name]
    target = GPUTarget("cuda", capability, 32)
    src, options, constexprs = _specialise(launch, target)
    names = launch.kernel.arg_names
    shown = {names[k[0]]: v for k, v in constexprs.items() if names[k[0]].isupper()}  # the tile constexprs
    name = f"{launch.kernel.__module__.rsplit('.', 1)[-1]}.{launch.kernel.__name__}"
    result = Result(name, launch.case, target_name, json.dumps(shown, sort_keys=True),
                    options.num_warps, options.num_stages, limit=limit)
    key = hashlib.sha256(f"{src.hash()}-{target_name}-{sorted(options.__dict__.items())}".encode()).hexdigest()
    return key, result, (src, target, options)


def _compile(job) -> tuple:
    """(key, figures) of one compile: shared bytes, and ptxas's registers and spills from its log."""
    key, (src, target, options) = job
    found, log = {}, io.StringIO()
    try:
        with contextlib.redirect_stdout(log), mock.patch.object(triton.knobs.nvidia, "dump_ptxas_log", True), \
                mock.patch.object(triton.knobs.compilation, "always_compile", True):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        found["shared"] = compiled.metadata.shared
        found["registers"], found["spill_bytes"] = _ptxas_numbers(log.getvalue())
    except Exception as err:  # noqa: BLE001 - an out-of-resources or codegen failure is the finding
        found["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return key, found


def _cache_path() -> Path:
    return Path(triton.knobs.cache.dir) / "ratplus_aot_results.json"


_JOBS: list = []  # what the forked workers compile (inherited, not pickled: sources hold JIT functions)


def _compile_nth(index: int) -> tuple:
    return _compile(_JOBS[index])


def compile_all(launches, targets=tuple(TARGETS), workers=None):
    """One Result per distinct compiled kernel: identical specialisations compile once, in
    ``workers`` processes (default: one per CPU), and results are cached by source hash."""
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    plans = [_plan(launch, target) for launch in launches for target in targets]
    todo = {key: what for key, _, what in plans if key not in cache}
    _JOBS[:] = list(todo.items())
    if len(_JOBS) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers or os.cpu_count() or 1, len(_JOBS))) as pool:
            cache.update(pool.imap_unordered(_compile_nth, range(len(_JOBS))))
    else:
        cache.update(map(_compile, _JOBS))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache))
    results, seen = [], set()
    for key, result, _ in plans:
        for name, value in cache[key].items():
            setattr(result, name, value)
        if (key, result.case) not in seen:  # a kernel launched twice alike by one call: one row
            seen.add((key, result.case))
            results.append(result)
    return results


def table(results) -> str:
    lines = ["| kernel | case | target | tiles (constexprs) | warps | stages | shared (B) | limit (B) | registers "
             "| spills (B) | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.case} | {r.target} | {r.constexprs.replace('|', '/')} | {r.num_warps} | "
                     f"{r.num_stages} | {r.shared} | {r.limit} | {r.registers} | {r.spill_bytes} | "
                     f"{'yes' if r.fits else 'NO ' + r.error} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    results = compile_all(record_launches(), targets)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([dict(asdict(r), fits=r.fits) for r in results], indent=1))
    bad = [r for r in results if not r.fits]
    print(f"{len(results)} compiled kernels, {len(bad)} over the shared-memory limit or failing", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
