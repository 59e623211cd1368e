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

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.config import SHAPE_KEYS, RATPlusConfig, model_config, preset_settings
from megatron_ratplus.data.dali import require_dali
from megatron_ratplus.data.datasets import check_split
from megatron_ratplus.data.tokenizer import build_tokenizer, padded_vocab_size
from megatron_ratplus.errors import UserError
from megatron_ratplus.layers.specs import resolve_transformer_impl
from megatron_ratplus.optional import require
from megatron_ratplus.patterns import PatternError, parse_composition
from megatron_ratplus.precision import check_fp8_recipe, check_fp8_shapes
from megatron_ratplus.userfiles import check_output_path
from megatron_ratplus.training.parallel_layout import validate_parallel_config, virtual_pipeline_size

DEFAULT_LR, DEFAULT_WARMUP, DEFAULT_ITERS = 3e-3, 0.05, 300
ADAPTATION_LR_FACTOR = 0.1  # resolution adaptation trains at this fraction of the pretraining LR

# Shape flags the user may give; the vocabulary comes from the tokenizer, the recurrence from --no-recurrence.
SHAPE_FLAGS = tuple(key for key in SHAPE_KEYS if key not in ("vocab_size", "real_vocab_size", "recurrence"))


@dataclass(frozen=True)
class TrainingConfig:
    # model: the full shape, resolved
    preset: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    vocab_size: int                 # the tokenizer's, padded to a multiple of 128 (independent of TP)
    real_vocab_size: int            # the tokenizer's own; padded ids are never scored or sampled
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
    training_mode: str              # "joint", "single" (one pattern) or "adaptation"; checkpoints record it
    # data
    data_path: Optional[Tuple[str, ...]]
    split: str
    tokenizer: str                  # tokenizer spec: --tokenizer-file, else the checkpoint's, else byte
    data_cache_path: Optional[str]
    # checkpoints and logging
    save: str
    load: Optional[str]             # None when there is nothing to load yet
    override_opt_param_scheduler: bool   # on resume: the flags' LR schedule (Megatron-LM's flag)
    save_interval: int
    eval_interval: int
    eval_iters: int
    log_interval: int               # console line and throughput/memory scalars every this many iterations
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
    # GPU features (Megatron-LM's flags; checked by _check_gpu_flags)
    transformer_impl: str           # resolved: transformer_engine or local
    fp8_format: Optional[str]
    fp8_recipe: str
    fp8_margin: int
    fp8_amax_history_len: int
    fp8_amax_compute_algo: str
    fp8_param_gather: bool
    recompute_granularity: Optional[str]
    recompute_method: Optional[str]
    recompute_num_layers: Optional[int]
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    dataloader_type: str
    dry_run: bool
    gpu_memory_gb: float

    @classmethod
    def from_flags(cls, flags: Mapping[str, object]) -> "TrainingConfig":
        """Check the flag values (training/arguments.py's names) and resolve everything derived."""
        flags = dict(flags)
        _check_values(flags)
        flags["transformer_impl"] = _check_gpu_flags(flags)
        # schedule flags left unset on a resume take the checkpoint's values (see _resume_schedule)
        explicit = {name for name in SCHEDULE_FLAGS if flags[name] is not None}
        explicit |= {"train_iters"} if flags["train_tokens"] is not None else set()
        for name, default in SCHEDULE_DEFAULTS.items():
            flags[name] = default if flags[name] is None else flags[name]
        load = flags["load"]
        if load and _same_dir(load, flags["save"]) and not checkpoint.latest_checkpoint(load):
            load = None  # --load SAVE --save SAVE on a first run (SLURM requeue style): start fresh
        meta = checkpoint.read_meta(load) if load else None
        if meta:
            _check_saved_schedule(meta)
        adapting = bool(flags["adapt_pattern"])
        if meta and not adapting:
            _check_optimizer_layout(flags, meta["args"])
        if checkpoint.latest_checkpoint(flags["save"]) and not (load and not adapting and _same_dir(load, flags["save"])):
            raise UserError(f"--save {flags['save']} already holds a checkpoint; refusing to overwrite it "
                            f"(resume with --load {flags['save']}, or choose another --save)")
        tokenizer = flags["tokenizer_file"] or (meta["tokenizer"] if meta else "byte")
        if meta and not _same_tokenizer(build_tokenizer(tokenizer).spec, meta["tokenizer"]):
            raise UserError(f"--tokenizer-file {flags['tokenizer_file']} is not the tokenizer of --load "
                            f"{flags['load']} ({meta['tokenizer']}); its token ids would mean other text")
        shape = _model_shape(flags, meta, build_tokenizer(tokenizer).vocab_size)
        vpp = virtual_pipeline_size(shape["num_layers"], flags["pipeline_model_parallel_size"],
                                    flags["num_layers_per_virtual_pipeline_stage"])
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate_parallel_config(world, flags["tensor_model_parallel_size"],
                                 flags["pipeline_model_parallel_size"], flags["context_parallel_size"], vpp,
                                 shape["num_layers"], shape["num_attention_heads"], shape["seq_length"],
                                 sequence_parallel=flags["sequence_parallel"])
        if vpp:
            _check_interleaved_microbatches(flags, world)
        # A resumed adaptation run stays one: its pattern, no joint training (docs/DESIGN.md §6).
        continuing = meta if meta and not adapting and meta.get("training_mode") == "adaptation" else None
        pattern = flags["adapt_pattern"] or (continuing or flags)["attention_pattern"]
        for name, text in (("--attention-pattern", pattern), ("--sparse-pattern", flags["sparse_pattern"])):
            try:
                parse_composition(text).validate(shape["num_layers"], shape["num_attention_heads"])
            except PatternError as err:
                raise UserError(f"{name}: {err}") from None
        if flags["lr"] is None and adapting and meta["args"].get("lr") is None:
            raise UserError(f"--load {flags['load']} records no pretraining learning rate; give --lr")
        if flags["lr"] is None:
            flags["lr"] = ADAPTATION_LR_FACTOR * meta["args"]["lr"] if adapting else DEFAULT_LR
        if flags["lr_warmup_fraction"] is None:
            flags["lr_warmup_fraction"] = 0.0 if adapting else DEFAULT_WARMUP
        if flags["train_tokens"] is not None:
            flags["train_iters"] = max(1, flags["train_tokens"] // (flags["global_batch_size"] * shape["seq_length"]))
        flags["train_iters"] = flags["train_iters"] or DEFAULT_ITERS
        if meta and not adapting:
            _resume_schedule(flags, meta, explicit)
        if flags["min_lr"] > flags["lr"]:
            raise UserError(f"--min-lr {flags['min_lr']} is above --lr {flags['lr']}")
        joint = flags["joint_training"] and not adapting and not continuing
        values = {**flags, **shape,
                  "joint_training": joint,
                  "training_mode": "adaptation" if adapting or continuing else "joint" if joint else "single",
                  "attention_pattern": pattern,
                  "data_path": tuple(flags["data_path"]) if flags["data_path"] else None,
                  "tokenizer": tokenizer, "load": load,
                  "tensorboard_dir": flags["tensorboard_dir"] or os.path.join(flags["save"], "tensorboard"),
                  "virtual_pipeline_model_parallel_size": vpp}
        config = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
        if config.fp8_format:
            check_fp8_shapes(config.model_config(), config.micro_batch_size)
        return config

    @property
    def step_patterns(self) -> Tuple[Tuple[str, str], ...]:
        """(name, pattern) of each optimizer step of an iteration: joint training's sparse then
        dense step, or the one step (named "") at the training pattern."""
        if self.joint_training:
            return (("sparse", self.sparse_pattern), ("dense", "dense"))
        return (("", self.attention_pattern),)

    def model_config(self) -> RATPlusConfig:
        """The model: this shape, this parallel layout, its precision (with --bf16, bf16 parameters
        and pipeline activations as Megatron-LM's; the optimizer keeps fp32 main copies), FP8 and
        recomputation as megatron's TransformerConfig takes them."""
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        fp8 = {}
        if self.fp8_format:
            fp8 = dict(fp8=self.fp8_format, fp8_recipe=self.fp8_recipe, fp8_margin=self.fp8_margin,
                       fp8_amax_history_len=self.fp8_amax_history_len,
                       fp8_amax_compute_algo=self.fp8_amax_compute_algo, fp8_param=self.fp8_param_gather)
        return model_config(**{key: getattr(self, key) for key in SHAPE_KEYS}, **fp8,
                            attention_pattern=self.attention_pattern, bf16=self.bf16,
                            params_dtype=dtype, pipeline_dtype=dtype,
                            recompute_granularity=self.recompute_granularity,
                            recompute_method=self.recompute_method,
                            recompute_num_layers=self.recompute_num_layers,
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


# LR-schedule flags: a resume keeps the checkpoint's unless overridden (Megatron-LM's rule).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_fraction", "lr_decay_style", "train_iters", "weight_decay")
SCHEDULE_DEFAULTS = {"min_lr": 1e-5, "lr_decay_style": "cosine", "weight_decay": 0.1}  # argparse gives None


def _check_saved_schedule(meta: dict) -> None:
    """The checkpoint's recorded LR-schedule flags, which a resume or an adaptation computes with,
    must be values their flags take (a number for a number, one of the choices): a hand-edited
    ratplus.json ends in one line naming it, not in a TypeError."""
    from megatron_ratplus.training.arguments import build_parser

    actions = {action.dest: action for action in build_parser()._actions}
    for name in SCHEDULE_FLAGS:
        value, action = meta["args"].get(name), actions[name]
        if value is None:
            continue
        if action.choices:
            ok = value in action.choices
        else:
            try:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and action.type(str(value)) == value
            except argparse.ArgumentTypeError:
                ok = False
        if not ok:
            raise UserError(f"{os.path.join(meta['path'], checkpoint.META_FILE)}: args.{name} is {value!r}, "
                            f"not a value of --{name.replace('_', '-')}")


def _resume_schedule(flags: dict, meta: dict, explicit: set) -> None:
    """The LR schedule of a resumed run, as Megatron-LM decides it: flags the user left unset
    take the checkpoint's values; a changed value needs --override-opt_param-scheduler (the
    flags' schedule, from the checkpoint's step) or --use-checkpoint-opt_param-scheduler (the
    checkpoint's schedule, while --train-iters still ends the run); a run already past
    --train-iters is refused (a checkpoint's name must say which iteration it holds)."""
    saved, iteration = meta["args"], meta.get("iteration", 0)
    if flags["override_opt_param_scheduler"] and flags["use_checkpoint_opt_param_scheduler"]:
        raise UserError("give --override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler, not both")
    for name in SCHEDULE_FLAGS:
        if name not in saved:
            continue
        if name not in explicit:
            flags[name] = saved[name]
        elif flags["use_checkpoint_opt_param_scheduler"]:  # its scheduler keeps its own decay length
            flags[name] = saved[name] if name != "train_iters" else flags[name]
        elif flags[name] != saved[name] and not flags["override_opt_param_scheduler"]:
            raise UserError(f"--{name.replace('_', '-')} {flags[name]} differs from the checkpoint's {saved[name]}; "
                            f"pass --override-opt_param-scheduler to use it or --use-checkpoint-opt_param-scheduler")
    if flags["train_iters"] < iteration:
        raise UserError(f"--load {flags['load']} is at iteration {iteration}, "
                        f"past --train-iters {flags['train_iters']}")


# The distributed optimizer stores its state per gradient bucket (checkpoint.SHARDED_METADATA),
# which only the same model layout rebuilds; the data-parallel size may change.
OPTIMIZER_LAYOUT = ("use_distributed_optimizer", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "num_layers_per_virtual_pipeline_stage", "transformer_impl")


def _check_optimizer_layout(flags: dict, saved: dict) -> None:
    """Refuse a resume whose optimizer state cannot load into this run's distributed optimizer."""
    if not (flags["use_distributed_optimizer"] or saved.get("use_distributed_optimizer")):
        return
    for name in OPTIMIZER_LAYOUT:
        if name in saved and flags[name] != saved[name]:
            raise UserError(f"--load {flags['load']} was saved with {name} {saved[name]} and this run has "
                            f"{flags[name]}; with --use-distributed-optimizer a resume may change only the "
                            f"data-parallel size")


def _check_interleaved_microbatches(flags: dict, world: int) -> None:
    """megatron's interleaved schedule needs a multiple of the pipeline size in micro-batches per
    global batch; checked at start-up, not at the first step (validation runs whole global
    batches, so it then fits too)."""
    pp = flags["pipeline_model_parallel_size"]
    dp = max(1, world // (flags["tensor_model_parallel_size"] * pp * flags["context_parallel_size"]))
    count = flags["global_batch_size"] // (flags["micro_batch_size"] * dp)
    if count % pp:
        raise UserError(f"the interleaved pipeline needs a multiple of --pipeline-model-parallel-size {pp} "
                        f"micro-batches per global batch; --global-batch-size / (--micro-batch-size x "
                        f"data-parallel size) gives {count}")


def _same_tokenizer(spec: str, saved: str) -> bool:
    """Same spec, or two tokenizer files with the same bytes (a copy elsewhere is the same tokenizer)."""
    if spec == saved:
        return True
    kind, _, path = spec.partition(":")
    saved_kind, _, saved_path = saved.partition(":")
    if kind != saved_kind or not path or not os.path.isfile(saved_path):
        return False
    with open(path, "rb") as a, open(saved_path, "rb") as b:
        return a.read() == b.read()


def _same_dir(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _check_values(flags: dict) -> None:
    """Checks across values that need no files (each value's own type and range is the parser's,
    megatron_ratplus/cli/types.py; data and checkpoints are checked where they are opened)."""
    if flags["train_iters"] is not None and flags["train_tokens"] is not None:
        raise UserError("give --train-iters or --train-tokens, not both")
    if flags["adapt_pattern"] and not flags["load"]:
        raise UserError("--adapt-pattern continues from a pretrained checkpoint: give --load DIR")
    for name in ("sparse_pattern", "attention_pattern", "adapt_pattern"):
        if flags[name]:
            try:
                parse_composition(flags[name])
            except PatternError as err:
                raise UserError(f"--{name.replace('_', '-')}: {err}") from None
    check_split(flags["split"])  # even where the embedded corpus ignores it
    if os.path.exists(flags["save"]) and not os.path.isdir(flags["save"]):
        raise UserError(f"--save {flags['save']} is a file, not a directory")
    check_output_path("--save", flags["save"], directory=True)
    if flags["tensorboard_dir"]:
        check_output_path("--tensorboard-dir", flags["tensorboard_dir"], directory=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = (flags["tensor_model_parallel_size"] * flags["pipeline_model_parallel_size"]
                      * flags["context_parallel_size"])
    dp_rank_batch = flags["micro_batch_size"] * max(1, world // model_parallel)
    if flags["global_batch_size"] % dp_rank_batch:
        raise UserError(f"--global-batch-size {flags['global_batch_size']} is not divisible by "
                        f"--micro-batch-size x data-parallel size ({dp_rank_batch})")


def _check_gpu_flags(flags: dict) -> str:
    """Refuse GPU flags that conflict, or that this machine or its packages cannot honour (one
    line each, before any process group starts); returns the --transformer-impl to build.
    --dry-run plans a GPU run from anywhere: it checks consistency, not this machine."""
    impl = flags["transformer_impl"]
    connections = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if flags["sequence_parallel"] and connections != "1":  # the package sets it unless the user did
        raise UserError(f"--sequence-parallel needs CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's TP/SP communication "
                        f"overlap relies on one kernel queue); it is {connections}")
    if flags["fp8_format"]:
        if impl == "local":
            raise UserError("--fp8-format needs --transformer-impl transformer_engine (FP8 runs in TE's GEMMs)")
        if not flags["bf16"]:
            raise UserError("--fp8-format needs --bf16 (the tensors outside the FP8 GEMMs are bf16)")
    elif flags["fp8_param_gather"]:
        raise UserError("--fp8-param-gather needs --fp8-format")
    granularity, method, layers = (flags["recompute_granularity"], flags["recompute_method"],
                                   flags["recompute_num_layers"])
    if granularity == "full" and (method is None or layers is None):
        raise UserError("--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers")
    if granularity != "full" and (method is not None or layers is not None):
        raise UserError("--recompute-method and --recompute-num-layers apply only with --recompute-granularity full")
    if flags["overlap_param_gather"] and not flags["use_distributed_optimizer"]:
        raise UserError("--overlap-param-gather needs --use-distributed-optimizer")
    if flags["dry_run"]:
        return impl or ("transformer_engine" if flags["fp8_format"] else "local")
    if flags["fp8_format"]:
        require("transformer_engine", "--fp8-format", cuda=True)
        check_fp8_recipe(flags["fp8_recipe"])
    impl = resolve_transformer_impl(impl)
    if flags["fp8_format"] and impl != "transformer_engine":
        raise UserError("--fp8-format needs --transformer-impl transformer_engine (FP8 runs in TE's GEMMs)")
    if flags["dataloader_type"] == "dali":
        require_dali()
    if not torch.cuda.is_available():  # the distributed optimizer runs on CPU (data_parallel.uses_megatron_optimizer)
        for name in ("overlap_grad_reduce", "overlap_param_gather"):
            if flags[name]:
                raise UserError(f"--{name.replace('_', '-')} needs GPUs (megatron overlaps its collectives "
                                f"on CUDA streams); drop it on CPU")
    return impl


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
    tp = flags["tensor_model_parallel_size"]
    padded = shape["vocab_size"] if meta else padded_vocab_size(vocab, tp)
    if padded < vocab or padded % tp:  # a checkpoint's padding serves every TP size dividing it
        raise UserError(f"--load {flags['load']} has a vocabulary of {padded}, which does not hold this tokenizer's "
                        f"{vocab} tokens split over {tp} tensor-parallel ranks")
    shape["vocab_size"], shape["real_vocab_size"] = padded, vocab
    full = preset_settings(flags["preset"], **shape)
    if full["hidden_size"] % full["num_attention_heads"]:
        raise UserError(f"--hidden-size {full['hidden_size']} is not divisible by "
                        f"--num-attention-heads {full['num_attention_heads']}")
    return {key: full[key] for key in SHAPE_KEYS}
