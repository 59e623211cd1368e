"""The pretraining loop: dense pretraining with active recurrence learning, adaptation, resume.

Each iteration takes one global batch. With joint training (the default) the same micro-batches
go through a sparse step (--sparse-pattern, dilated:64) and then a dense step, each with its own
forward, backward, clip and optimizer update; the LR scheduler steps once per iteration.
Resolution adaptation (--adapt-pattern) loads only the model weights of a pretrained checkpoint
and trains at that one pattern with a fresh optimizer and schedule. The loop only reads its
TrainingConfig (training/config.py), where every default and derived value is settled.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ratplus import checkpoint, distributed
from megatron_ratplus.data.datasets import BatchSource, build_datasets
from megatron_ratplus.data.tokenizer import build_tokenizer
from megatron_ratplus.errors import UserError
from megatron_ratplus.training.config import TrainingConfig
from megatron_ratplus.training.data_parallel import params_gathered, wrap_model
from megatron_ratplus.training.exit import ExitConditions
from megatron_ratplus.training.metrics import Metrics
from megatron_ratplus.training.optimizer import build_optimizer, build_scheduler
from megatron_ratplus.training.schedule import build_model_chunks
from megatron_ratplus.training.steps import evaluate, train_step
from megatron_ratplus.training.throughput import Throughput, console_line

# Perplexity is printed as exp(loss); above this loss it overflows to a meaningless number.
MAX_SHOWN_LOSS = 50.0


def train(config: TrainingConfig) -> str:
    """Train as ``config`` says; returns the final checkpoint directory (or the one saved on an early exit)."""
    try:
        with ExitConditions.from_config(config) as exits:
            return _train(config, exits)
    finally:
        checkpoint.unlock_save_dir(config.save)


def _train(config: TrainingConfig, exits: ExitConditions) -> str:
    tokenizer = build_tokenizer(config.tokenizer)
    model_config = config.model_config()
    distributed.initialize(config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                           config.context_parallel_size, config.virtual_pipeline_model_parallel_size, seed=config.seed)
    torch.manual_seed(config.seed)
    train_iters, seq_length, global_batch = config.train_iters, config.seq_length, config.global_batch_size

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    # The validation set in samples, as Megatron-LM counts it (--eval-iters global batches): the
    # same samples whatever the parallel layout, so validation losses compare across layouts.
    eval_samples = config.eval_iters * global_batch
    train_data, valid_data = build_datasets(
        config.data_path, tokenizer, seq_length, config.seed, config.split,
        train_iters * global_batch, eval_samples, config.data_cache_path)
    train_batches = BatchSource(train_data, config.micro_batch_size, dp_rank, dp_size, config.seed, shuffle=True)
    valid_batches = BatchSource(valid_data, config.micro_batch_size, dp_rank, dp_size, config.seed, shuffle=False)
    valid_count = min(eval_samples, len(valid_data)) // global_batch * global_batch
    if not valid_count:
        raise UserError(f"the validation split holds {len(valid_data)} windows of {seq_length} tokens, fewer than "
                        f"one global batch ({global_batch}); lower --seq-length, or give validation more data "
                        f"(--split)")
    valid_micro = valid_batches.microbatches(0, valid_count)

    model_chunks = wrap_model(build_model_chunks(model_config, config.transformer_impl), model_config,
                              config.use_distributed_optimizer, config.overlap_grad_reduce, config.overlap_param_gather)
    optimizer = build_optimizer(model_chunks, config)
    scheduler = build_scheduler(optimizer, config)
    start_iter, consumed, skipped = 0, 0, 0
    if config.load and config.adapt_pattern:
        checkpoint.load(config.load, model_chunks)
    elif config.load:
        common = checkpoint.load(config.load, model_chunks, optimizer)
        scheduler.load_state_dict(common["scheduler"])
        start_iter, consumed, skipped = common["iteration"], common["consumed_samples"], common["nan_skipped"]

    steps = config.step_patterns
    checkpoint.lock_save_dir(config.save)  # before anything writes there (TensorBoard, checkpoints)
    metrics = Metrics(config.tensorboard_dir, train_iters, start_iter, config.progress_bar)
    throughput = Throughput(model_config, [p for _, p in steps], global_batch * seq_length, seq_length,
                            dist.get_world_size())
    if config.dataloader_type == "dali":  # micro-batches prefetched onto the GPU (data/dali.py)
        from megatron_ratplus.data.dali import dali_batches

        dali = dali_batches(train_batches, consumed, global_batch, train_iters - start_iter)
    meta = {"model": checkpoint.model_meta(model_config), "tokenizer": tokenizer.spec, "args": config.as_record(),
            "attention_pattern": config.attention_pattern, "training_mode": config.training_mode}

    def save(iteration: int) -> str:
        common = {"scheduler": scheduler.state_dict(), "iteration": iteration, "consumed_samples": consumed,
                  "nan_skipped": skipped}
        with params_gathered(model_chunks, config.overlap_param_gather):
            return checkpoint.save(config.save, iteration, model_chunks, optimizer, common, meta)

    def validate(iteration: int) -> dict:
        with params_gathered(model_chunks, config.overlap_param_gather):
            losses = {f"valid/loss{'_' + name if name else ''}": evaluate(model_chunks, valid_micro, seq_length, p)
                      for name, p in steps}
        metrics.log(iteration, losses)
        shown = ", ".join(f"{k} {v:.4f} (ppl {math.exp(min(v, MAX_SHOWN_LOSS)):.2f})" for k, v in losses.items())
        metrics.message(f"iteration {iteration}: {shown}")
        return losses

    start_time, in_a_row, last_ckpt = time.time(), 0, checkpoint.latest_checkpoint(config.save)
    if start_iter == 0 and config.eval_interval:
        validate(0)
    for iteration in range(start_iter + 1, train_iters + 1):
        throughput.begin()
        micro = next(dali) if config.dataloader_type == "dali" else train_batches.microbatches(consumed, global_batch)
        results = [train_step(model_chunks, optimizer, micro, seq_length, p) for _, p in steps]
        scheduler.step(increment=1)
        throughput.end()
        consumed += global_batch
        bad = sum(not r["updated"] for r in results)
        skipped += bad
        in_a_row = in_a_row + 1 if bad else 0
        scalars = {"train/lr": optimizer.param_groups[0]["lr"], "train/nan_skipped": skipped}
        for (name, _), r in zip(steps, results):
            suffix = f"_{name}" if name else ""
            scalars[f"train/loss{suffix}"] = r["loss"]
            scalars[f"train/grad_norm{suffix}"] = r["grad_norm"]
        if in_a_row >= config.max_nan_steps:  # the run cannot go on at these settings: the user's to change
            metrics.log(iteration, {**scalars, "train/nan_stop": in_a_row})
            metrics.close(f"stopped at iteration {iteration}: {in_a_row} non-finite iterations in a row")
            raise UserError(f"{in_a_row} iterations in a row had a non-finite loss or gradient; stopping "
                            f"(last checkpoint: {last_ckpt or 'none'})")
        if iteration % config.log_interval == 0 or iteration == train_iters:
            scalars.update(throughput.report())
            metrics.message(console_line(iteration, train_iters, scalars))
        metrics.log(iteration, scalars)
        metrics.advance()
        if config.eval_interval and iteration % config.eval_interval == 0 and iteration != train_iters:
            validate(iteration)
        if config.save_interval and iteration % config.save_interval == 0 and iteration != train_iters:
            last_ckpt = save(iteration)
        stop = exits.reason(iteration) if iteration != train_iters else None
        if stop:
            if not (config.save_interval and iteration % config.save_interval == 0):
                last_ckpt = save(iteration)
            metrics.close(f"stopped after iteration {iteration} ({stop}); checkpoint {last_ckpt}")
            return last_ckpt
    final_losses = validate(train_iters)
    last_ckpt = last_ckpt if start_iter == train_iters else save(train_iters)
    elapsed = time.time() - start_time
    done = train_iters - start_iter
    loss_text = ", ".join(f"{k} {v:.4f}" for k, v in final_losses.items())
    metrics.close(f"done: {done} iterations ({done * global_batch * seq_length} tokens) in "
                  f"{elapsed:.0f} s; {loss_text}; {skipped} non-finite steps skipped; checkpoint {last_ckpt}")
    if dist.is_initialized():
        dist.barrier()
    return last_ckpt
