"""ratplus-pretrain's flags: Megatron-LM's names where one exists, a YAML config file, validation.

Precedence: built-in defaults < the checkpoint's model shape (with --load) < YAML (--config)
< command line. Every problem becomes a UsageError with one line for the user.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

import torch
import yaml

from megatron_ratplus.config import PRESETS
from megatron_ratplus.patterns import PatternError, parse_pattern


class UsageError(ValueError):
    """A bad flag, config key or value; the message is one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise UsageError(message)


# Model-shape flags: None means "from the checkpoint (with --load) or the preset".
MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ratplus-pretrain", description="Pretrain a RAT+ model on megatron-core "
                "(default: the tiny preset on the embedded corpus, on CPU).")
    p.add_argument("--config", help="YAML file of flag values (keys as flag names, - or _)")

    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--ffn-hidden-size", type=int)
    m.add_argument("--seq-length", type=int)
    m.add_argument("--no-recurrence", action="store_true", help="train the attention-only baseline")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=8)
    t.add_argument("--global-batch-size", type=int, default=16)
    t.add_argument("--train-iters", type=int)
    t.add_argument("--train-tokens", type=int, help="alternative to --train-iters")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3; 0.1x the checkpoint's with --adapt-pattern)")
    t.add_argument("--min-lr", type=float, default=1e-5)
    t.add_argument("--lr-warmup-fraction", type=float, help="default 0.05 (0 with --adapt-pattern)")
    t.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.95)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master weights")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--max-nan-steps", type=int, default=3,
                   help="stop after this many non-finite losses in a row (each is skipped)")

    r = p.add_argument_group("RAT+ recipes")
    r.add_argument("--no-joint-training", dest="joint_training", action="store_false",
                   help="one dense step per iteration instead of sparse + dense")
    r.add_argument("--sparse-pattern", default="dilated:64", help="pattern of the sparse step of joint training")
    r.add_argument("--attention-pattern", default="dense", help="training pattern without joint training")
    r.add_argument("--adapt-pattern", help="resolution adaptation at this pattern (needs --load)")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (.bin/.idx); default: embedded corpus")
    d.add_argument("--split", default="98,2,0")
    d.add_argument("--tokenizer-file", help="HF tokenizers JSON file (default: byte-level)")
    d.add_argument("--data-cache-path")

    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save", default="checkpoints/ratplus-tiny")
    c.add_argument("--load")
    c.add_argument("--save-interval", type=int, default=0, help="0: only at the end")
    c.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGUSR1 finish the iteration, save a checkpoint and exit 0")
    c.add_argument("--exit-duration-in-mins", type=float, help="save and exit 0 after this much wall time")
    c.add_argument("--exit-interval", type=int, help="save and exit 0 after an iteration divisible by this")
    c.add_argument("--eval-interval", type=int, default=100)
    c.add_argument("--eval-iters", type=int, default=10)
    c.add_argument("--log-interval", type=int, default=10)
    c.add_argument("--tensorboard-dir", help="default: SAVE/tensorboard")
    c.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")

    par = p.add_argument_group("parallelism (megatron names)")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False,
                     help="(--no-sequence-parallel overrides a run config's true)")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    return p


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise UsageError(f"unknown config key '{key}' in {path}")
        out[dest] = value
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_yaml_defaults(parser, first.config))
    args = parser.parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Value checks that need no files (data and checkpoints are checked where they are opened)."""
    for name in ("micro_batch_size", "global_batch_size", "eval_iters", "log_interval", "max_nan_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("train_iters", "train_tokens", *MODEL_FLAGS):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_iters is not None and args.train_tokens is not None:
        raise UsageError("give --train-iters or --train-tokens, not both")
    for name in ("exit_duration_in_mins", "exit_interval"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
    if args.save_interval < 0 or args.eval_interval < 0:
        raise UsageError("--save-interval and --eval-interval must be >= 0")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction < 1:
        raise UsageError("--lr-warmup-fraction must be in [0, 1)")
    if args.adapt_pattern and not args.load:
        raise UsageError("--adapt-pattern continues from a pretrained checkpoint: give --load DIR")
    for flag in ("sparse_pattern", "attention_pattern", "adapt_pattern"):
        if getattr(args, flag):
            try:
                parse_pattern(getattr(args, flag))
            except PatternError as err:
                raise UsageError(f"--{flag.replace('_', '-')}: {err}") from None
    if args.adapt_pattern:
        args.joint_training = False
    if args.bf16 and not torch.cuda.is_available():
        raise UsageError("--bf16 needs a GPU (megatron's mixed-precision path); drop it on CPU")
    dp_rank_batch = args.micro_batch_size * data_parallel_size(args)
    if args.global_batch_size % dp_rank_batch:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size x data-parallel size ({dp_rank_batch})")


def data_parallel_size(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    return max(1, world // model_parallel)
