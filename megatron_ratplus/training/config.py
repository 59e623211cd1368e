"""The training configuration: built once from the flags and the checkpoint, then only read.

:meth:`TrainingConfig.from_flags` checks every value, reads the checkpoint's metadata (with
--load) and computes everything derived: the model shape (preset < checkpoint < flags, which
must agree with the checkpoint), the padded vocabulary, the virtual pipeline stages, the LR and
warmup defaults (resolution adaptation: 0.1x the checkpoint's LR, no warmup, no joint
training), the iterations from --train-tokens, and the start of a SLURM-requeue-style run
(``--load SAVE --save SAVE`` before SAVE holds a checkpoint: start fresh). Field names are
Megatron-LM's flag names; a checkpoint records the fields under "args".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.config import SHAPE_KEYS, RATPlusConfig, model_config, preset_settings
from megatron_ratplus.data.tokenizer import build_tokenizer, padded_vocab_size
from megatron_ratplus.errors import UserError
from megatron_ratplus.patterns import PatternError, parse_pattern
from megatron_ratplus.training.parallel_layout import validate_parallel_config, virtual_pipeline_size

DEFAULT_LR, DEFAULT_WARMUP, DEFAULT_ITERS = 3e-3, 0.05, 300
ADAPTATION_LR_FACTOR = 0.1  # resolution adaptation trains at this fraction of the pretraining LR

# Shape flags the user may give; the vocabulary comes from the tokenizer, the recurrence from --no-recurrence.
SHAPE_FLAGS = tuple(key for key in SHAPE_KEYS if key not in ("vocab_size", "recurrence"))


@dataclass(frozen=True)
class TrainingConfig:
    # model: the full shape, resolved
    preset: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    vocab_size: int                 # the tokenizer's, padded by megatron's rule for the TP size
    recurrence: bool
    # optimisation
    micro_batch_size: int
    global_batch_size: int
    train_iters: int                # --train-iters, or --train-tokens / tokens per iteration
    lr: float
    min_lr: float
    lr_warmup_fraction: float
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    bf16: bool
    seed: int
    max_nan_steps: int
    # RAT+ recipes
    joint_training: bool
    sparse_pattern: str
    attention_pattern: str          # the pattern the model trains at without joint training
    adapt_pattern: Optional[str]
    # data
    data_path: Optional[Tuple[str, ...]]
    split: str
    tokenizer: str                  # tokenizer spec: --tokenizer-file, else the checkpoint's, else byte
    data_cache_path: Optional[str]
    # checkpoints and logging
    save: str
    load: Optional[str]             # None when there is nothing to load yet
    save_interval: int
    eval_interval: int
    eval_iters: int
    log_interval: int               # accepted for Megatron-LM compatibility; not read yet
    tensorboard_dir: str
    progress_bar: bool
    # early exit with a checkpoint (preemption, time limits)
    exit_signal_handler: bool
    exit_duration_in_mins: Optional[float]
    exit_interval: Optional[int]
    # parallelism
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    num_layers_per_virtual_pipeline_stage: Optional[int]
    virtual_pipeline_model_parallel_size: Optional[int]
    context_parallel_size: int
    sequence_parallel: bool
    use_distributed_optimizer: bool

    @classmethod
    def from_flags(cls, flags: Mapping[str, object]) -> "TrainingConfig":
        """Check the flag values (training/arguments.py's names) and resolve everything derived."""
        flags = dict(flags)
        _check_values(flags)
        load = flags["load"]
        if load and _same_dir(load, flags["save"]) and not checkpoint.latest_checkpoint(load):
            load = None  # --load SAVE --save SAVE on a first run (SLURM requeue style): start fresh
        meta = checkpoint.read_meta(load) if load else None
        adapting = bool(flags["adapt_pattern"])
        if checkpoint.latest_checkpoint(flags["save"]) and not (load and not adapting and _same_dir(load, flags["save"])):
            raise UserError(f"--save {flags['save']} already holds a checkpoint; refusing to overwrite it "
                            f"(resume with --load {flags['save']}, or choose another --save)")
        tokenizer = flags["tokenizer_file"] or (meta["tokenizer"] if meta else "byte")
        shape = _model_shape(flags, meta, build_tokenizer(tokenizer).vocab_size)
        vpp = virtual_pipeline_size(shape["num_layers"], flags["pipeline_model_parallel_size"],
                                    flags["num_layers_per_virtual_pipeline_stage"])
        validate_parallel_config(int(os.environ.get("WORLD_SIZE", "1")), flags["tensor_model_parallel_size"],
                                 flags["pipeline_model_parallel_size"], flags["context_parallel_size"], vpp,
                                 shape["num_layers"], shape["num_attention_heads"], shape["seq_length"],
                                 sequence_parallel=flags["sequence_parallel"])
        if flags["lr"] is None:
            flags["lr"] = ADAPTATION_LR_FACTOR * meta["args"]["lr"] if adapting else DEFAULT_LR
        if flags["lr_warmup_fraction"] is None:
            flags["lr_warmup_fraction"] = 0.0 if adapting else DEFAULT_WARMUP
        if flags["train_tokens"] is not None:
            flags["train_iters"] = max(1, flags["train_tokens"] // (flags["global_batch_size"] * shape["seq_length"]))
        values = {**flags, **shape,
                  "train_iters": flags["train_iters"] or DEFAULT_ITERS,
                  "joint_training": flags["joint_training"] and not adapting,
                  "attention_pattern": flags["adapt_pattern"] or flags["attention_pattern"],
                  "data_path": tuple(flags["data_path"]) if flags["data_path"] else None,
                  "tokenizer": tokenizer, "load": load,
                  "tensorboard_dir": flags["tensorboard_dir"] or os.path.join(flags["save"], "tensorboard"),
                  "virtual_pipeline_model_parallel_size": vpp}
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    @property
    def step_patterns(self) -> Tuple[Tuple[str, str], ...]:
        """(name, pattern) of each optimizer step of an iteration: joint training's sparse then
        dense step, or the one step (named "") at the training pattern."""
        if self.joint_training:
            return (("sparse", self.sparse_pattern), ("dense", "dense"))
        return (("", self.attention_pattern),)

    def model_config(self) -> RATPlusConfig:
        """The model: this shape, this parallel layout, fp32 master weights (bf16 compute with --bf16)."""
        return model_config(**{key: getattr(self, key) for key in SHAPE_KEYS},
                            attention_pattern=self.attention_pattern, bf16=self.bf16,
                            params_dtype=torch.float32, pipeline_dtype=torch.float32,
                            tensor_model_parallel_size=self.tensor_model_parallel_size,
                            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
                            context_parallel_size=self.context_parallel_size,
                            sequence_parallel=self.sequence_parallel)

    def as_record(self) -> dict:
        """The fields as JSON values, as a checkpoint records them under "args"."""
        record = dataclasses.asdict(self)
        record["data_path"] = list(self.data_path) if self.data_path else None
        return record


def _same_dir(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _check_values(flags: dict) -> None:
    """Value checks that need no files (data and checkpoints are checked where they are opened)."""
    for name in ("micro_batch_size", "global_batch_size", "eval_iters", "log_interval", "max_nan_steps"):
        if flags[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("train_iters", "train_tokens", *SHAPE_FLAGS):
        if flags[name] is not None and flags[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if flags["train_iters"] is not None and flags["train_tokens"] is not None:
        raise UserError("give --train-iters or --train-tokens, not both")
    for name in ("exit_duration_in_mins", "exit_interval"):
        if flags[name] is not None and flags[name] <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if flags["save_interval"] < 0 or flags["eval_interval"] < 0:
        raise UserError("--save-interval and --eval-interval must be >= 0")
    if flags["lr_warmup_fraction"] is not None and not 0 <= flags["lr_warmup_fraction"] < 1:
        raise UserError("--lr-warmup-fraction must be in [0, 1)")
    if flags["adapt_pattern"] and not flags["load"]:
        raise UserError("--adapt-pattern continues from a pretrained checkpoint: give --load DIR")
    for name in ("sparse_pattern", "attention_pattern", "adapt_pattern"):
        if flags[name]:
            try:
                parse_pattern(flags[name])
            except PatternError as err:
                raise UserError(f"--{name.replace('_', '-')}: {err}") from None
    if flags["bf16"] and not torch.cuda.is_available():
        raise UserError("--bf16 needs a GPU (megatron's mixed-precision path); drop it on CPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = (flags["tensor_model_parallel_size"] * flags["pipeline_model_parallel_size"]
                      * flags["context_parallel_size"])
    dp_rank_batch = flags["micro_batch_size"] * max(1, world // model_parallel)
    if flags["global_batch_size"] % dp_rank_batch:
        raise UserError(f"--global-batch-size {flags['global_batch_size']} is not divisible by "
                        f"--micro-batch-size x data-parallel size ({dp_rank_batch})")


def _model_shape(flags: dict, meta: Optional[dict], vocab: int) -> dict:
    """The full model shape: the preset, then the checkpoint's shape, then explicit flags (which
    must agree with the checkpoint, except --seq-length: a checkpoint may continue at another length)."""
    shape = dict(meta["model"]) if meta else {}
    explicit = {key: flags[key] for key in SHAPE_FLAGS if flags[key] is not None}
    if flags["no_recurrence"]:
        explicit["recurrence"] = False
    for key, value in explicit.items():
        if key in shape and shape[key] != value and key != "seq_length":
            raise UserError(f"--load {flags['load']} has {key} {shape[key]}, but this run asks for {value}")
    shape.update(explicit)
    padded = padded_vocab_size(vocab, flags["tensor_model_parallel_size"])
    if meta and shape.get("vocab_size") != padded:
        raise UserError(f"--load {flags['load']} has vocabulary {shape.get('vocab_size')}, this tokenizer needs {padded}")
    shape["vocab_size"] = padded
    full = preset_settings(flags["preset"], **shape)
    return {key: full[key] for key in SHAPE_KEYS}
