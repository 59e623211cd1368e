"""The pretraining loop: dense pretraining with active recurrence learning, adaptation, resume.

Each iteration takes one global batch. With joint training (the default) the same micro-batches
go through a sparse step (--sparse-pattern, dilated:64) and then a dense step, each with its own
forward, backward, clip and optimizer update; the LR scheduler steps once per iteration.
Resolution adaptation (--adapt-pattern) loads only the model weights of a pretrained checkpoint
and trains at that one pattern with a fresh optimizer and schedule.
"""

from __future__ import annotations

import math
import os
import time
from argparse import Namespace
from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ratplus import checkpoint, distributed
from megatron_ratplus.config import PRESETS, preset
from megatron_ratplus.data.datasets import SampleOrder, build_datasets, collate
from megatron_ratplus.data.tokenizer import build_tokenizer, padded_vocab_size
from megatron_ratplus.parallel import validate_parallel_config, virtual_pipeline_size
from megatron_ratplus.parallel.data_parallel import wrap_model
from megatron_ratplus.parallel.schedule import build_model_chunks
from megatron_ratplus.training.arguments import MODEL_FLAGS, UsageError
from megatron_ratplus.training.metrics import Metrics
from megatron_ratplus.training.optimizer import build_optimizer, build_scheduler
from megatron_ratplus.training.steps import evaluate, train_step

DEFAULT_LR, DEFAULT_WARMUP, DEFAULT_ITERS = 3e-3, 0.05, 300


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the last checkpoint is intact."""


def parallel_layout(args: Namespace, num_layers: int, num_heads: int, seq_length: int):
    """Check the parallel layout before any process group exists; returns the virtual stages per rank."""
    try:
        vpp = virtual_pipeline_size(num_layers, args.pipeline_model_parallel_size,
                                    args.num_layers_per_virtual_pipeline_stage)
        validate_parallel_config(int(os.environ.get("WORLD_SIZE", "1")), args.tensor_model_parallel_size,
                                 args.pipeline_model_parallel_size, args.context_parallel_size, vpp, num_layers,
                                 num_heads, seq_length, sequence_parallel=args.sequence_parallel)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return vpp


def model_config(args: Namespace, tokenizer, loaded_meta):
    """The model config: preset, then the checkpoint's shape, then explicit flags (which must agree)."""
    shape = dict(loaded_meta["model"]) if loaded_meta else {}
    explicit = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if args.no_recurrence:
        explicit["recurrence"] = False
    for key, value in explicit.items():
        if key in shape and shape[key] != value and key != "seq_length":
            raise UsageError(f"--load {args.load} has {key} {shape[key]}, but this run asks for {value}")
    shape.update(explicit)
    vocab = padded_vocab_size(tokenizer.vocab_size, args.tensor_model_parallel_size)
    if loaded_meta and shape.get("vocab_size") != vocab:
        raise UsageError(f"--load {args.load} has vocabulary {shape.get('vocab_size')}, this tokenizer needs {vocab}")
    shape["vocab_size"] = vocab
    full = {**PRESETS[args.preset], **shape}
    vpp = parallel_layout(args, full["num_layers"], full["num_attention_heads"], full["seq_length"])
    return preset(args.preset, **shape, bf16=args.bf16, params_dtype=torch.float32, pipeline_dtype=torch.float32,
                  tensor_model_parallel_size=args.tensor_model_parallel_size,
                  pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                  virtual_pipeline_model_parallel_size=vpp,
                  context_parallel_size=args.context_parallel_size,
                  sequence_parallel=args.sequence_parallel,
                  attention_pattern=args.adapt_pattern or args.attention_pattern)


def resolve_schedule(args: Namespace, loaded_meta) -> int:
    """Fill LR/warmup defaults (adaptation: 0.1x the checkpoint's LR, no warmup); returns train iters."""
    if args.lr is None:
        args.lr = 0.1 * loaded_meta["args"]["lr"] if args.adapt_pattern else DEFAULT_LR
    if args.lr_warmup_fraction is None:
        args.lr_warmup_fraction = 0.0 if args.adapt_pattern else DEFAULT_WARMUP
    if args.train_tokens is not None:
        return max(1, args.train_tokens // (args.global_batch_size * args.seq_length))
    return args.train_iters or DEFAULT_ITERS


class BatchSource:
    """This rank's micro-batches of global batch k, from the consumed-sample count alone."""

    def __init__(self, dataset, args, shuffle: bool, seed: int):
        self.dataset, self.order = dataset, SampleOrder(len(dataset), seed, shuffle)
        self.micro = args.micro_batch_size
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()

    def microbatches(self, consumed: int, global_batch: int) -> List[dict]:
        out = []
        for m in range(global_batch // (self.micro * self.dp_size)):
            start = consumed + (m * self.dp_size + self.dp_rank) * self.micro
            out.append(collate([self.dataset[self.order(start + i)] for i in range(self.micro)]))
        return out


def _check_save_dir(args: Namespace) -> None:
    existing = checkpoint.latest_checkpoint(args.save)  # None for a missing directory
    resuming = args.load and not args.adapt_pattern and os.path.abspath(args.load) == os.path.abspath(args.save)
    if existing and not resuming:
        raise UsageError(f"--save {args.save} already holds a checkpoint; refusing to overwrite it "
                         f"(resume with --load {args.save}, or choose another --save)")


def pretrain(args: Namespace) -> str:
    """Train as ``args`` say; returns the final checkpoint directory."""
    auto_resume = args.load and os.path.abspath(args.load) == os.path.abspath(args.save)
    if auto_resume and not checkpoint.latest_checkpoint(args.load):
        args.load = None  # --load SAVE --save SAVE on a first run (SLURM requeue style): start fresh
    loaded_meta = checkpoint.read_meta(args.load) if args.load else None
    _check_save_dir(args)
    tokenizer = build_tokenizer(args.tokenizer_file or (loaded_meta["tokenizer"] if loaded_meta else "byte"))
    config = model_config(args, tokenizer, loaded_meta)
    distributed.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           args.context_parallel_size, config.virtual_pipeline_model_parallel_size, seed=args.seed)
    checkpoint.lock_save_dir(args.save)  # before anything writes there (TensorBoard, checkpoints)
    torch.manual_seed(args.seed)
    args.seq_length = config.seq_length
    train_iters = resolve_schedule(args, loaded_meta)

    eval_samples = args.eval_iters * args.micro_batch_size * parallel_state.get_data_parallel_world_size()
    train_data, valid_data = build_datasets(
        args.data_path, tokenizer, args.seq_length, args.seed, args.split,
        train_iters * args.global_batch_size, eval_samples, args.data_cache_path)
    train_batches = BatchSource(train_data, args, shuffle=True, seed=args.seed)
    valid_batches = BatchSource(valid_data, args, shuffle=False, seed=args.seed)
    valid_micro = valid_batches.microbatches(0, min(eval_samples, len(valid_data)) // (
        args.micro_batch_size * valid_batches.dp_size) * args.micro_batch_size * valid_batches.dp_size)

    model_chunks = wrap_model(build_model_chunks(config), config, args.use_distributed_optimizer)
    optimizer = build_optimizer(model_chunks, args)
    scheduler = build_scheduler(optimizer, args, train_iters)
    start_iter, consumed, skipped = 0, 0, 0
    if loaded_meta and args.adapt_pattern:
        checkpoint.load(args.load, model_chunks)
    elif loaded_meta:
        common = checkpoint.load(args.load, model_chunks, optimizer)
        scheduler.load_state_dict(common["scheduler"])
        start_iter, consumed, skipped = common["iteration"], common["consumed_samples"], common["nan_skipped"]

    patterns = [args.sparse_pattern, "dense"] if args.joint_training else [config.attention_pattern]
    eval_patterns = dict(zip(("sparse", "dense"), patterns)) if args.joint_training else {"": patterns[0]}
    log_dir = args.tensorboard_dir or os.path.join(args.save, "tensorboard")
    metrics = Metrics(log_dir, train_iters, start_iter, args.progress_bar)
    meta = {"model": checkpoint.model_meta(config), "tokenizer": tokenizer.spec,
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}}

    def save(iteration: int) -> str:
        common = {"scheduler": scheduler.state_dict(), "iteration": iteration, "consumed_samples": consumed,
                  "nan_skipped": skipped}
        return checkpoint.save(args.save, iteration, model_chunks, optimizer, common, meta)

    def validate(iteration: int) -> dict:
        losses = {f"valid/loss{'_' + name if name else ''}": evaluate(model_chunks, valid_micro, args.seq_length, p)
                  for name, p in eval_patterns.items()}
        metrics.log(iteration, losses)
        shown = ", ".join(f"{k} {v:.4f} (ppl {math.exp(min(v, 50)):.2f})" for k, v in losses.items())
        metrics.message(f"iteration {iteration}: {shown}")
        return losses

    start_time, in_a_row, last_ckpt = time.time(), 0, checkpoint.latest_checkpoint(args.save)
    if start_iter == 0 and args.eval_interval:
        validate(0)
    for iteration in range(start_iter + 1, train_iters + 1):
        tick = time.time()
        micro = train_batches.microbatches(consumed, args.global_batch_size)
        results = [train_step(model_chunks, optimizer, micro, args.seq_length, p) for p in patterns]
        scheduler.step(increment=1)
        consumed += args.global_batch_size
        bad = sum(not r["updated"] for r in results)
        skipped += bad
        in_a_row = in_a_row + 1 if bad else 0
        if in_a_row >= args.max_nan_steps:
            raise TrainingStopped(f"{in_a_row} iterations in a row had a non-finite loss or gradient; stopping "
                                  f"(last checkpoint: {last_ckpt or 'none'})")
        tokens = args.global_batch_size * args.seq_length
        scalars = {"train/lr": optimizer.param_groups[0]["lr"], "train/tokens_per_s": tokens / (time.time() - tick),
                   "train/nan_skipped": skipped}
        for name, r in zip(eval_patterns, results):
            suffix = f"_{name}" if name else ""
            scalars[f"train/loss{suffix}"] = r["loss"]
            scalars[f"train/grad_norm{suffix}"] = r["grad_norm"]
        metrics.log(iteration, scalars)
        metrics.advance()
        if args.eval_interval and iteration % args.eval_interval == 0 and iteration != train_iters:
            validate(iteration)
        if args.save_interval and iteration % args.save_interval == 0 and iteration != train_iters:
            last_ckpt = save(iteration)
    final_losses = validate(train_iters)
    last_ckpt = last_ckpt if start_iter == train_iters else save(train_iters)
    elapsed = time.time() - start_time
    done = train_iters - start_iter
    loss_text = ", ".join(f"{k} {v:.4f}" for k, v in final_losses.items())
    metrics.close(f"done: {done} iterations ({done * args.global_batch_size * args.seq_length} tokens) in "
                  f"{elapsed:.0f} s; {loss_text}; {skipped} non-finite steps skipped; checkpoint {last_ckpt}")
    if dist.is_initialized():
        dist.barrier()
    checkpoint.unlock_save_dir(args.save)
    return last_ckpt
