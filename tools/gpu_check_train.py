"""Training-path sections of tools/gpu_check.py (one H200; toy sizes on CPU with --dry-run).

Each section is a function ``(ctx) -> dict`` that raises :class:`Skip` with a reason when what
it needs is absent (a GPU, Transformer Engine, DALI); tools/gpu_check.py runs them guarded, so a
failing section does not stop the others, and writes the JSON after each.

- ``train local``: a 12-layer, d 768 RAT+ model (99M parameters with the byte-level vocabulary of
  the embedded corpus; 124M with a 32K vocabulary) for 30 iterations at sequence 4096, bf16,
  ``--transformer-impl local``, distributed optimizer, a checkpoint at iteration 15;
- ``resume``: from that iteration-15 checkpoint to 30: losses against the uninterrupted run;
- ``train transformer_engine`` and ``train fp8`` (E4M3/E5M2 hybrid, delayed scaling): loss
  curves beside the local run, FP8's final loss within 2% of TE bf16's;
- ``fp8 precision boundaries``: under FP8 the four GEMMs run in FP8 and the mixer core (scan,
  RoPE, pattern attention) receives plain bf16 tensors (docs/DESIGN.md §8);
- ``cp building blocks``: the context-parallel pieces of one rank timed on one GPU (local scan
  + correction; pack of public keys + attention over the gathered keys);
- ``dali loader``: DALI's prefetching loader against the plain one.

Training runs drive ``ratplus-pretrain`` with Megatron-LM's flags and read its TensorBoard scalars.
"""

from __future__ import annotations

import importlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """A section that cannot run here; the message says why."""


@dataclass
class TrainSizes:
    model: tuple = ("--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
                    "--ffn-hidden-size", "3072", "--seq-length", "4096")
    batch: tuple = ("--micro-batch-size", "2", "--global-batch-size", "8")
    iterations: int = 30
    lr: str = "6e-4"
    timeout_s: int = 150  # per ratplus-pretrain process
    fp8_tolerance: float = 0.02
    cp_size: int = 4  # context-parallel blocks: one rank's share of a CP group of this size
    cp_tokens: int = 32768
    cp_heads: int = 16
    cp_head_dim: int = 128
    cp_patterns: tuple = ("dense", "dilated:16,w=256,p=4")
    dali_iterations: int = 50


DRY_TRAIN = TrainSizes(model=("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
                              "--seq-length", "64"),
                       batch=("--micro-batch-size", "2", "--global-batch-size", "4"), iterations=4, lr="3e-3",
                       timeout_s=240, cp_size=2, cp_tokens=64, cp_heads=2, cp_head_dim=8,
                       cp_patterns=("dense", "dilated:4,w=3,p=1"), dali_iterations=3)


@dataclass
class Context:
    torch: object
    device: object
    dry_run: bool
    sizes: TrainSizes
    work: Path  # scratch directory for checkpoints
    timer: object
    deadline: float  # time.time() by which every section must be done
    runs: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.time()

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def have(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken GPU install raises more than ImportError
        return False


def need_gpu(ctx: Context) -> None:
    if not ctx.gpu:
        raise Skip("needs a CUDA GPU (dry run)" if ctx.dry_run else "needs a CUDA GPU")


def need_te(ctx: Context) -> None:
    need_gpu(ctx)
    if not have("transformer_engine.pytorch"):
        raise Skip("Transformer Engine is not installed: TE and FP8 are verified where a cluster image "
                   "provides them (NGC PyTorch containers do), or give --wheels DIR with its wheels")


def need_megatron() -> None:
    if not have("megatron.core"):
        raise Skip("megatron-core is not installed (give --wheels DIR with its wheel)")


# ---- ratplus-pretrain runs ------------------------------------------------------------------

def read_scalars(log_dir: Path) -> dict:
    """tag -> {iteration: value} of every scalar in a TensorBoard directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def loss_tag(scalars: dict) -> str:
    tags = sorted(t for t in scalars if t.startswith("train/loss"))
    if not tags:
        raise RuntimeError("the run logged no train/loss scalar")
    return "train/loss_dense" if "train/loss_dense" in tags else tags[0]


def pretrain(ctx: Context, save: Path, extra: list, load: Path = None) -> dict:
    """One ratplus-pretrain process; returns its losses and throughput figures."""
    s = ctx.sizes
    cmd = [sys.executable, "-m", "megatron_ratplus.cli.pretrain", "--preset", "tiny", *s.model, *s.batch,
           "--train-iters", str(s.iterations), "--lr", s.lr, "--lr-warmup-fraction", "0.1",
           "--no-joint-training", "--eval-interval", "0", "--eval-iters", "1", "--log-interval", "1",
           "--no-progress-bar", "--save", str(save), *extra]
    if load is not None:
        cmd += ["--load", str(load)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    budget = min(s.timeout_s, ctx.remaining())
    if budget < 30:
        raise Skip(f"out of time ({ctx.remaining():.0f} s left of the check's budget)")
    began = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env, cwd=str(ROOT))
    seconds = time.time() - began
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"ratplus-pretrain exited {result.returncode}: {lines[-1]}")
    scalars = read_scalars(save / "tensorboard")
    losses = scalars[loss_tag(scalars)]

    def steady(tag):  # median over iterations after the first few (compilation, warm-up)
        values = [v for step, v in sorted(scalars.get(tag, {}).items()) if step > 3]
        return statistics.median(values) if values else None

    figures = {tag.split("/", 1)[1]: steady(tag) for tag in scalars
               if any(word in tag for word in ("tokens_per_s", "tflop", "mem"))}
    return dict(command=" ".join(cmd[2:]), seconds=seconds, losses=losses, figures=figures,
                final_loss=statistics.mean([losses[k] for k in sorted(losses)[-3:]]))


def impl_flags(ctx: Context, impl: str) -> list:
    if ctx.dry_run:  # CPU: fp32, megatron's local layers (the flags below are GPU-only)
        return []
    return ["--bf16", "--transformer-impl", impl]


def model_flops_per_token(ctx: Context) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of a dense-causal step:
    2 x parameters of the GEMMs (W_in, W_out, MLP, logits) + 2 x T x width of causal attention."""
    s = dict(zip(ctx.sizes.model[::2], ctx.sizes.model[1::2]))
    layers, d = int(s["--num-layers"]), int(s["--hidden-size"])
    ffn, seq = int(s.get("--ffn-hidden-size", 4 * d)), int(s["--seq-length"])
    vocab = 384  # byte-level tokenizer of the embedded corpus, padded
    gemm = layers * (5 * d * d + d * d + 2 * d * ffn) + d * vocab
    return 3 * (2 * gemm + layers * 2 * seq * d)


def summarize(ctx: Context, run: dict) -> dict:
    tokens_per_s = run["figures"].get("tokens_per_s")
    out = {k: v for k, v in run.items() if k != "losses"}
    out["losses"] = {str(k): v for k, v in sorted(run["losses"].items())}
    if tokens_per_s:
        out["model_TFLOPs_per_s_estimate"] = tokens_per_s * model_flops_per_token(ctx) / 1e12
    return out


def section_train_local(ctx: Context) -> dict:
    need_megatron()
    half = ctx.sizes.iterations // 2
    extra = impl_flags(ctx, "local") + ([] if ctx.dry_run else ["--use-distributed-optimizer"])
    save = ctx.work / "local"
    shutil.rmtree(save, ignore_errors=True)
    ctx.runs["local"] = pretrain(ctx, save, extra + ["--save-interval", str(half)])
    ctx.runs["local"]["extra"] = extra
    return summarize(ctx, ctx.runs["local"])


def section_resume(ctx: Context) -> dict:
    """Iteration-half checkpoint of the local run, resumed to the end: the same losses."""
    if "local" not in ctx.runs:
        raise Skip("needs the 'train local' section's run")
    half = ctx.sizes.iterations // 2
    source = ctx.work / "local" / f"iter_{half:07d}"
    save = ctx.work / "resumed"
    shutil.rmtree(save, ignore_errors=True)
    save.mkdir(parents=True)
    shutil.copytree(source, save / source.name)
    (save / "latest").write_text(source.name)
    resumed = pretrain(ctx, save, ctx.runs["local"]["extra"], load=save)
    whole = ctx.runs["local"]["losses"]
    later = sorted(k for k in resumed["losses"] if k > half)
    if later != list(range(half + 1, ctx.sizes.iterations + 1)):
        raise RuntimeError(f"the resumed run logged iterations {later}")
    diffs = [abs(resumed["losses"][k] - whole[k]) for k in later]
    return dict(resumed_from=half, iterations=later, max_abs_loss_difference=max(diffs),
                equal=max(diffs) == 0.0, within_1e_3_relative=all(d <= 1e-3 * abs(whole[k])
                                                                   for d, k in zip(diffs, later)),
                losses_uninterrupted=[whole[k] for k in later], losses_resumed=[resumed["losses"][k] for k in later])


def section_train_te(ctx: Context) -> dict:
    need_te(ctx)
    save = ctx.work / "te"
    shutil.rmtree(save, ignore_errors=True)
    ctx.runs["transformer_engine"] = pretrain(ctx, save, impl_flags(ctx, "transformer_engine"))
    return summarize(ctx, ctx.runs["transformer_engine"])


def section_train_fp8(ctx: Context) -> dict:
    need_te(ctx)
    save = ctx.work / "fp8"
    shutil.rmtree(save, ignore_errors=True)
    run = pretrain(ctx, save, impl_flags(ctx, "transformer_engine") +
                   ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"])
    ctx.runs["fp8"] = run
    out = summarize(ctx, run)
    if "transformer_engine" in ctx.runs:
        bf16 = ctx.runs["transformer_engine"]["final_loss"]
        out["final_loss_relative_to_te_bf16"] = run["final_loss"] / bf16 - 1
        out["within_tolerance"] = abs(run["final_loss"] / bf16 - 1) <= ctx.sizes.fp8_tolerance
    return out


def loss_curves(ctx: Context) -> dict:
    """iteration -> {run: loss}, the runs side by side."""
    steps = sorted({k for run in ctx.runs.values() for k in run["losses"]})
    return {str(k): {name: run["losses"].get(k) for name, run in ctx.runs.items()} for k in steps}


# ---- in-process checks --------------------------------------------------------------------------

def section_fp8_boundaries(ctx: Context) -> dict:
    """Under FP8, TE's four GEMMs run in FP8 while the mixer core receives plain bf16 tensors."""
    need_te(ctx)
    torch = ctx.torch
    from megatron_ratplus import distributed
    from megatron_ratplus.config import preset
    from megatron_ratplus.layers.mixer import RATPlusMixer
    from megatron_ratplus.model import build_model

    distributed.initialize()
    config = preset("tiny", num_layers=2, hidden_size=256, num_attention_heads=4, seq_length=512,
                    fp8="hybrid", fp8_recipe="delayed", bf16=True, params_dtype=torch.bfloat16)
    model = build_model(config, "transformer_engine").cuda()
    mixers = [m for m in model.modules() if isinstance(m, RATPlusMixer)]
    core_inputs = set()
    for mixer in mixers:
        mixer.core_attention.register_forward_pre_hook(
            lambda module, args: core_inputs.update((type(a).__name__, str(a.dtype)) for a in args[:3]))
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length), device="cuda")
    positions = torch.arange(config.seq_length, device="cuda").unsqueeze(0).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    gemms = {name: bool(getattr(module, "fp8", False)) for mixer in mixers[:1]
             for name, module in (("W_in", mixer.linear_in), ("W_out", mixer.linear_out))}
    layer = model.decoder.layers[0]
    gemms.update(fc1=bool(getattr(layer.mlp.linear_fc1, "fp8", False)),
                 fc2=bool(getattr(layer.mlp.linear_fc2, "fp8", False)))
    return dict(gemms_in_fp8=gemms, core_inputs=sorted(map(list, core_inputs)),
                ok=all(gemms.values()) and core_inputs == {("Tensor", "torch.bfloat16")},
                loss=float(loss))


def _cp_blocks():
    """(scan_slices, compose_and_correct, pack_public, attend_slices): the CP building blocks."""
    from megatron_ratplus.layers.context_parallel.attention import attend_slices, pack_public
    from megatron_ratplus.layers.context_parallel.scan import compose_and_correct, scan_slices

    return dict(scan_slices=scan_slices, compose_and_correct=compose_and_correct, pack_public=pack_public,
                attend_slices=attend_slices)


def section_cp_blocks(ctx: Context) -> dict:
    """One rank of a CP group (the last: the most earlier chunks to attend) on one device."""
    need_megatron()
    torch, s = ctx.torch, ctx.sizes
    blocks = _cp_blocks()
    from megatron_ratplus.patterns import parse_pattern

    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    size, rank = s.cp_size, s.cp_size - 1
    local = s.cp_tokens // size
    shape = (local, 1, s.cp_heads, s.cp_head_dim)
    x = torch.randn(shape, device=ctx.device).to(dtype)
    g = torch.sigmoid(torch.randn(shape, device=ctx.device) + 2).to(dtype)
    out = {"cp_size": size, "rank": rank, "local_tokens": local}
    out["local_scan_ms"] = ctx.timer(lambda: blocks["scan_slices"](x, g))
    states, decays, summary = blocks["scan_slices"](x, g)
    summaries = torch.stack([summary] * size)  # every rank's summary, as the all-gather returns them
    out["correction_ms"] = ctx.timer(lambda: blocks["compose_and_correct"](states, decays, summaries, None, rank, size))
    q, k, v = (torch.randn(shape, device=ctx.device).to(dtype) for _ in range(3))
    for name in s.cp_patterns:
        pattern = parse_pattern(name)
        pack = lambda: blocks["pack_public"](k, v, pattern, rank, size)  # noqa: E731
        public = torch.cat([pack()] * size)  # [CP * 2, ...] as gathered
        out[f"pack_public_ms {name}"] = ctx.timer(pack)
        out[f"gathered_tokens_per_rank {name}"] = int(public.shape[0] * public.shape[2])
        out[f"attend_gathered_ms {name}"] = ctx.timer(
            lambda: blocks["attend_slices"](q, k, v, public, pattern, rank, size, s.cp_head_dim ** -0.5))
    return out


def dali_source(micro: int, seq: int, samples: int):
    """The plain loader the DALI section feeds from (one data-parallel rank); runs on CPU too."""
    from megatron_ratplus.data.datasets import BatchSource, build_datasets
    from megatron_ratplus.data.tokenizer import build_tokenizer

    train, _ = build_datasets(None, build_tokenizer("byte"), seq, 1, "98,2,0", samples, 1, None)
    return BatchSource(train, micro, dp_rank=0, dp_size=1, seed=1, shuffle=True)


def section_dali(ctx: Context) -> dict:
    """Iterations of token batches to the GPU: DALI's prefetching pipeline against the plain loader."""
    need_gpu(ctx)
    if not have("nvidia.dali"):
        raise Skip("nvidia-dali is not installed: DALI is verified where a cluster image provides it "
                   "(NGC PyTorch containers do), or give --wheels DIR with its wheel")
    torch = ctx.torch
    from megatron_ratplus import distributed
    from megatron_ratplus.data.dali import dali_batches

    distributed.initialize()
    micro, global_batch, seq, iters = 2, 16, 4096, ctx.sizes.dali_iterations
    source = dali_source(micro, seq, iters * global_batch)
    weight = torch.randn(seq, seq // 8, device="cuda")

    def consume(batch):  # stands in for a step: some GPU work on every micro-batch
        for micro_batch in batch:
            (micro_batch["tokens"].float() @ weight).sum().item()

    began = time.perf_counter()
    for i in range(iters):
        consume([{k: t.cuda(non_blocking=True) for k, t in mb.items()}
                 for mb in source.microbatches(i * global_batch, global_batch)])
    plain = (time.perf_counter() - began) / iters
    began = time.perf_counter()
    for batch in dali_batches(source, 0, global_batch, iters):
        consume(batch)
    dali = (time.perf_counter() - began) / iters
    return dict(ms_per_iteration_plain=plain * 1e3, ms_per_iteration_dali=dali * 1e3, speedup=plain / dali,
                micro_batch=micro, global_batch=global_batch, seq_length=seq)


SECTIONS = (("train local", section_train_local), ("resume", section_resume),
            ("train transformer_engine", section_train_te), ("train fp8", section_train_fp8),
            ("fp8 precision boundaries", section_fp8_boundaries), ("cp building blocks", section_cp_blocks),
            ("dali loader", section_dali))
