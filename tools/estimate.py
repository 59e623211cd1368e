"""Estimate a RAT+ run before launching it: parameters, FLOPs, memory per GPU, time.

Reads the same model/batch/parallel flags as ratplus-pretrain (and its --config YAML; keys the
estimate does not need, such as data paths, are ignored), plus the cluster: --gpus,
--gpu-memory-gb, --mfu, --peak-tflops. Exit status 0 when the layout fits, 1 when it does not
(the reason is printed), 2 on a usage error.

    python3 tools/estimate.py --config examples/configs/pretrain_1.5b_100b.yaml --gpus 64
"""

from __future__ import annotations

import argparse
import sys

from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import non_negative_float, positive_float, positive_int, probability
from megatron_ratplus.config import PRESETS, preset
from megatron_ratplus.errors import ArgumentParser, UserError, first_line
from megatron_ratplus.estimate import Layout, iterations_for_tokens, report
from megatron_ratplus.patterns import PatternError, split_pattern_list
from megatron_ratplus.training.arguments import yaml_argv
from megatron_ratplus.training.parallel_layout import validate_parallel_config

PROG = "estimate.py"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="ratplus-pretrain YAML run config")
    p.add_argument("--preset", default="1.5b", choices=sorted(PRESETS))
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size", "--seq-length",
                 "--vocab-size"):
        p.add_argument(flag, type=positive_int)
    p.add_argument("--no-recurrence", action="store_true")
    p.add_argument("--micro-batch-size", type=positive_int, default=1)
    p.add_argument("--global-batch-size", type=positive_int, default=512)
    p.add_argument("--train-iters", type=positive_int)
    p.add_argument("--train-tokens", type=positive_int)
    p.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    p.add_argument("--context-parallel-size", type=positive_int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="(the estimate assumes bf16 unless --fp32)")
    precision.add_argument("--fp32", action="store_true", help="fp32 training (weights, grads, activations)")
    p.add_argument("--recompute", action="store_true", help="full activation recomputation")
    p.add_argument("--joint-training", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--sparse-pattern", default="dilated:64")
    p.add_argument("--attention-pattern", default="dense")
    p.add_argument("--adapt-pattern")
    p.add_argument("--gpus", type=positive_int, default=8, help="GPUs in the job (data parallel = gpus / TP / PP / CP)")
    p.add_argument("--gpu-memory-gb", type=positive_float, default=80.0)
    p.add_argument("--overhead-gb", type=non_negative_float, default=4.0, help="CUDA context, NCCL, fragmentation")
    p.add_argument("--mfu", type=probability, default=0.4)
    p.add_argument("--peak-tflops", type=positive_float, default=989.0, help="per GPU (H100 SXM bf16 dense: 989)")
    return p


def run(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    args = parser.parse_args((yaml_argv(parser, first.config, strict=False) if first.config else []) + argv)
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if args.gpus < 1 or args.gpus % model_parallel:
        raise UserError(f"--gpus {args.gpus} is not a multiple of TP x PP x CP = {model_parallel}")
    overrides = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                  "ffn_hidden_size", "seq_length", "vocab_size")
                 if getattr(args, k) is not None}
    try:
        config = preset(args.preset, recurrence=not args.no_recurrence, **overrides)
        if args.adapt_pattern:
            patterns = [args.adapt_pattern]
        elif args.joint_training:
            patterns = [args.sparse_pattern, "dense"]
        else:
            patterns = [args.attention_pattern]
        for p in patterns:
            split_pattern_list(p)
    except (ValueError, PatternError) as err:
        raise UserError(first_line(err)) from None
    # the layouts and shapes ratplus-pretrain refuses are refused here too, not estimated
    if config.hidden_size % config.num_attention_heads:
        raise UserError(f"--hidden-size {config.hidden_size} is not divisible by "
                        f"--num-attention-heads {config.num_attention_heads}")
    validate_parallel_config(args.gpus, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                             args.context_parallel_size, None, config.num_layers, config.num_attention_heads,
                             config.seq_length, sequence_parallel=args.sequence_parallel)
    if args.train_iters is not None and args.train_tokens is not None:
        raise UserError("give --train-iters or --train-tokens, not both")
    layout = Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                    args.context_parallel_size, args.gpus // model_parallel,
                    args.sequence_parallel, args.use_distributed_optimizer)
    if args.train_iters is not None:
        iters = args.train_iters
    elif args.train_tokens is not None:
        iters = iterations_for_tokens(args.train_tokens, args.global_batch_size, config.seq_length)
    else:
        raise UserError("give --train-iters or --train-tokens")
    text, fits, reason = report(config, layout, args.micro_batch_size, args.global_batch_size, iters,
                                gpu_memory_gb=args.gpu_memory_gb, patterns=patterns, bf16=not args.fp32,
                                recompute=args.recompute, mfu=args.mfu, peak_tflops=args.peak_tflops,
                                overhead_gb=args.overhead_gb)
    if text:
        print(text)
    print("fits" if fits else f"does not fit: {reason}")
    return 0 if fits else 1


def main(argv=None) -> int:
    """run() under run_cli (one line and 2 on a usage error, 130 on Ctrl-C); else run()'s status."""
    return run_cli(PROG, lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
