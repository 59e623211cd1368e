"""ratplus-pretrain's flags: Megatron-LM's names where one exists, and a YAML config file.

Precedence: built-in defaults < YAML (--config) < command line; the flag values then become a
TrainingConfig (training/config.py), which checks them and adds the checkpoint's shape. Every
problem is a UserError with one line for the user.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import yaml

from megatron_ratplus.cli.types import (fraction, non_negative_float, non_negative_int, positive_float,
                                        positive_int, seed)
from megatron_ratplus.config import PRESETS
from megatron_ratplus.data.datasets import DEFAULT_SEED, DEFAULT_SPLIT
from megatron_ratplus.errors import ArgumentParser, UserError


def build_parser() -> argparse.ArgumentParser:
    """The flags; model-shape flags default to None: "from the checkpoint (with --load) or the preset"."""
    p = ArgumentParser(prog="ratplus-pretrain", description="Pretrain a RAT+ model on megatron-core "
                "(default: the tiny preset on the embedded corpus, on CPU).")
    p.add_argument("--config", help="YAML file of flag values (keys as flag names, - or _)")

    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    m.add_argument("--num-layers", type=positive_int)
    m.add_argument("--hidden-size", type=positive_int)
    m.add_argument("--num-attention-heads", type=positive_int)
    m.add_argument("--ffn-hidden-size", type=positive_int)
    m.add_argument("--seq-length", type=positive_int)
    m.add_argument("--no-recurrence", action="store_true", help="train the attention-only baseline")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=positive_int, default=8)
    t.add_argument("--global-batch-size", type=positive_int, default=16)
    t.add_argument("--train-iters", type=positive_int)
    t.add_argument("--train-tokens", type=positive_int, help="alternative to --train-iters")
    t.add_argument("--lr", type=positive_float, help="peak learning rate (default 3e-3; 0.1x the checkpoint's with --adapt-pattern)")
    t.add_argument("--min-lr", type=non_negative_float, help="default 1e-5")
    t.add_argument("--lr-warmup-fraction", type=fraction, help="default 0.05 (0 with --adapt-pattern)")
    t.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], help="default cosine")
    t.add_argument("--weight-decay", type=non_negative_float, help="default 0.1")
    t.add_argument("--adam-beta1", type=fraction, default=0.9)
    t.add_argument("--adam-beta2", type=fraction, default=0.95)
    t.add_argument("--adam-eps", type=positive_float, default=1e-8)
    t.add_argument("--clip-grad", type=non_negative_float, default=1.0)
    t.add_argument("--bf16", action="store_true", help="bf16 compute with fp32 master weights")
    t.add_argument("--seed", type=seed, default=DEFAULT_SEED)
    t.add_argument("--max-nan-steps", type=positive_int, default=3,
                   help="stop after this many non-finite losses in a row (each is skipped)")

    r = p.add_argument_group("RAT+ recipes")
    r.add_argument("--no-joint-training", dest="joint_training", action="store_false",
                   help="one dense step per iteration instead of sparse + dense")
    r.add_argument("--sparse-pattern", default="dilated:64", help="pattern of the sparse step of joint training")
    r.add_argument("--attention-pattern", default="dense", help="training pattern without joint training")
    r.add_argument("--adapt-pattern", help="resolution adaptation at this pattern (needs --load)")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", help="indexed dataset prefixes (.bin/.idx); default: embedded corpus")
    d.add_argument("--split", default=DEFAULT_SPLIT)
    d.add_argument("--tokenizer-file", help="tokenizer.json (HF) or tokenizer.model (SentencePiece); default: byte-level")
    d.add_argument("--data-cache-path")

    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save", default="checkpoints/ratplus-tiny")
    c.add_argument("--load")
    c.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, take the LR schedule from these flags, not the checkpoint")
    c.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule whatever the flags say")
    c.add_argument("--save-interval", type=non_negative_int, default=0, help="0: only at the end")
    c.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGUSR1 finish the iteration, save a checkpoint and exit 0")
    c.add_argument("--exit-duration-in-mins", type=positive_float, help="save and exit 0 after this much wall time")
    c.add_argument("--exit-interval", type=positive_int, help="save and exit 0 after an iteration divisible by this")
    c.add_argument("--eval-interval", type=non_negative_int, default=100)
    c.add_argument("--eval-iters", type=positive_int, default=10)
    c.add_argument("--log-interval", type=positive_int, default=10,
                   help="console line and TensorBoard throughput/memory scalars every this many iterations")
    c.add_argument("--tensorboard-dir", help="default: SAVE/tensorboard")
    c.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")

    par = p.add_argument_group("parallelism (megatron names)")
    par.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=positive_int)
    par.add_argument("--context-parallel-size", type=positive_int, default=1)
    par.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False,
                     help="(--no-sequence-parallel overrides a run config's true)")
    par.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=False,
                     help="megatron's distributed optimizer (GPUs; --no-use-distributed-optimizer overrides "
                          "a run config's true)")
    _add_gpu_flags(p)
    return p


def _add_gpu_flags(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's GPU flags; training/config.py refuses the ones a CPU or a missing TE cannot honour."""
    g = p.add_argument_group("GPU (Megatron-LM names; not yet run on a GPU)")
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"],
                   help="default: transformer_engine when TE imports and CUDA is visible, else local")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], help="FP8 in the four GEMMs of a layer (needs TE)")
    g.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "mxfp8"])
    g.add_argument("--fp8-margin", type=non_negative_int, default=0)
    g.add_argument("--fp8-amax-history-len", type=positive_int, default=1024)
    g.add_argument("--fp8-amax-compute-algo", default="max", choices=["max", "most_recent"])
    g.add_argument("--fp8-param-gather", action="store_true", help="keep parameters in FP8 (all-gather in FP8)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"], help="with --recompute-granularity full")
    g.add_argument("--recompute-num-layers", type=positive_int, help="with --recompute-granularity full")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true", help="needs --use-distributed-optimizer")
    g.add_argument("--dataloader-type", default="single", choices=["single", "dali"])
    g.add_argument("--dry-run", action="store_true",
                   help="print the run's parameter, FLOP and memory estimate and exit (2 if it does not fit)")
    g.add_argument("--gpu-memory-gb", type=positive_float, default=80.0, help="GPU memory --dry-run plans for")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice (PyYAML silently keeps the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_argv(parser: argparse.ArgumentParser, path: str, strict: bool = True) -> List[str]:
    """The YAML file's values as command-line words, so argparse checks their types and choices
    exactly as it checks the command line's (``lr: true`` or ``micro_batch_size: 2.0`` fail).

    ``strict``: an unknown key is an error; otherwise keys ``parser`` does not know are skipped
    (tools/estimate.py reads the run configs, which also hold training-only keys).
    """
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions}
    words = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            if strict:
                raise UserError(f"unknown config key '{key}' in {path}")
            continue
        action, where = known[dest], f"config key '{key}' in {path}"
        if value is None:
            if action.default is not None:
                raise UserError(f"{where} is null; give a value (default {action.default}) or drop the key")
            continue
        if action.nargs == 0:  # store_true / store_false: the YAML value is the destination's value
            if not isinstance(value, bool):
                raise UserError(f"{where} must be true or false, got {value!r}")
            words += [action.option_strings[0]] if value != action.default else []
            continue
        items = value if isinstance(value, list) and action.nargs == "+" else [value]
        if any(isinstance(item, (bool, list, dict)) or item is None for item in items):
            raise UserError(f"{where} must be {'a list of values' if action.nargs == '+' else 'one value'}, "
                            f"got {value!r}")
        words += [action.option_strings[0], *map(str, items)]
    try:
        parser.parse_args(words)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return words


def parse_flags(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """The flag values of ``argv`` over the YAML file's over the defaults, by destination name."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    flags = vars(parser.parse_args((yaml_argv(parser, first.config) if first.config else []) + argv))
    flags.pop("config")
    return flags
