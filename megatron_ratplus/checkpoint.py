"""Checkpoints: megatron-core dist_checkpointing directories, written so a crash never costs one.

Layout of a save directory::

    SAVE/latest                 name of the newest complete checkpoint (replaced atomically)
    SAVE/iter_0000100/          dist_checkpointing files + ratplus.json (model shape, tokenizer, progress)

A save writes ``SAVE/.tmp.iter_0000100`` first (ratplus.json last), renames it into place when
every rank is done, and only then moves the ``latest`` marker; an existing checkpoint directory
is never written into. A process killed between the rename and the marker leaves a complete
``iter_*`` newer than ``latest``: :func:`latest_checkpoint` takes the newest complete one, so
the resume continues from it. Sharded tensors reshard on load, so a TP=2 checkpoint loads at
TP=1 and back (the padded vocabulary does not depend on the TP size: see
data.tokenizer.padded_vocab_size); each rank's RNG states are sharded state of their own
(restored on the same world size). One run at a time writes a save directory (:func:`lock_save_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import json
import os
import queue
import random
import re
import shutil
import socket
import threading
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
try:  # private: the per-file writer of torch's FileSystemWriter (see _Writer)
    from torch.distributed.checkpoint.filesystem import _write_files_from_queue
except ImportError:  # another torch than the pinned one: _Writer defers to torch's own threads
    _write_files_from_queue = None
from torch.futures import Future

from megatron_ratplus.config import SHAPE_KEYS
from megatron_ratplus.errors import UserError, first_line
from megatron_ratplus.userfiles import full_disk

EVAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # load_model's parameter types by name

META_FILE = "ratplus.json"
LATEST = "latest"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp."
ITER_DIR = re.compile(r"iter_(\d{7})$")
META_KEYS = ("model", "tokenizer", "args")  # what every reader of ratplus.json relies on
RNG_KEY = "rng_state"
WRITER_THREADS = 2
# Passed to every sharded_state_dict of a save and of a load, and recorded in the checkpoint as
# dist_checkpointing content metadata, as Megatron-LM does. Megatron's distributed optimizer
# saves its Adam state per gradient bucket ("dp_reshardable", Megatron-LM's default): every rank
# writes its own shard with no gather, and a resume may change the data-parallel size (buckets are
# stored without their DP padding) but not TP, PP or the spec (training/config.py refuses that).
# "fully_reshardable" would allow those too, but all-gathers each TPxPP domain's whole Adam state
# (12 bytes per parameter) onto every rank at each save. Without the key megatron 0.16 builds
# ShardedTensors with flattened_range, which its own dist_checkpointing rejects.
SHARDED_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointError(UserError):
    """A checkpoint path that cannot be used; the message is one line for the user."""


class _Writer(FileSystemWriter):
    """torch's FileSystemWriter whose writer threads report their failures to the caller.

    torch's own extra threads die alone on an error: a full disk prints their traceback on
    stderr and their files' results are lost, so the checkpoint's metadata would silently lack
    them. Here every thread's first failure is raised in the calling thread, and only after all
    writers stopped: a signal interrupts the main thread only, and the others would otherwise go
    on writing into the directory the failed save removes. On a failure the queue of files is
    emptied so the other threads stop after the file in hand. (torch 2.13's _write_data, with
    that one change; the per-file work is torch's own function.)
    """

    def _write_data(self, planner, file_queue: queue.Queue) -> Future:
        if not _WRITER_API:  # a torch whose private writer differs: its own threads (works; a full
            return super()._write_data(planner, file_queue)  # disk then also prints torch's traceback)
        result_queue: queue.Queue = queue.Queue()
        failures = []

        def work():
            try:
                _write_files_from_queue(
                    create_stream=self.fs.create_stream, file_queue=file_queue, result_queue=result_queue,
                    planner=planner, transforms=self.transforms, inflight_threshhold=self.per_thread_copy_ahead,
                    use_fsync=self.sync_files, thread_count=self.thread_count,
                    serialization_format=self.serialization_format)
            except BaseException as err:  # noqa: BLE001  (raised below, in the calling thread)
                failures.append(err)
                with contextlib.suppress(queue.Empty):
                    while True:
                        file_queue.get_nowait()

        threads = [threading.Thread(target=work, name="ratplus-checkpoint-writer", daemon=True)
                   for _ in range(1, self.thread_count)]
        for thread in threads:
            thread.start()
        work()
        for thread in threads:
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as err:  # noqa: BLE001  a signal while waiting: wait, then raise it
                    failures.append(err)
                    with contextlib.suppress(queue.Empty):
                        while True:
                            file_queue.get_nowait()
        if failures:
            raise failures[0]
        results = []
        with contextlib.suppress(queue.Empty):
            while True:
                results += result_queue.get_nowait()
        done: Future = Future()
        done.set_result(results)
        return done


# _Writer calls torch's private per-file writer with torch 2.13's arguments; any other shape
# (the GPU image's torch, a future one) keeps torch's own _write_data.
_WRITER_API = _write_files_from_queue is not None and hasattr(FileSystemWriter, "_write_data") and {
    "create_stream", "file_queue", "result_queue", "planner", "transforms", "inflight_threshhold", "use_fsync",
    "thread_count", "serialization_format"} == set(inspect.signature(_write_files_from_queue).parameters)


class ThreadedSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written by threads of this process.

    megatron's own strategy writes through a spawned multiprocessing Manager (kept for the life
    of the process) and forked writer processes; a run killed with SIGKILL leaves the Manager
    and its resource tracker behind. torch's FileSystemWriter writes the same files (one per
    thread) in this process, so nothing outlives it; the planner and key translation are
    megatron's, so its torch_dist loader reads the result unchanged.
    """

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        pyt_state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        torch.distributed.checkpoint.save(
            mcore_to_pyt_state_dict(pyt_state, False),
            storage_writer=_Writer(checkpoint_dir, thread_count=self.thread_count),
            planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                     flatten_state_dict=False))


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_checkpoint(path: str) -> Optional[str]:
    """The checkpoint a path names: a checkpoint directory itself, or a save dir's newest complete
    ``iter_*`` (the ``latest`` marker's, or a newer one whose save died before the marker moved)."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    candidates = []
    marker = os.path.join(path, LATEST)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8", errors="replace") as f:
            named = f.read().strip()
        if named and not ITER_DIR.match(named):  # '../elsewhere/iter_1' or '/abs/path': never followed
            raise CheckpointError(f"{marker} names '{named[:80]}', not an iter_NNNNNNN directory of {path}")
        candidates.append(named)
    if os.path.isdir(path):
        candidates += [name for name in os.listdir(path) if ITER_DIR.match(name)]
    complete = [name for name in candidates if name and os.path.isfile(os.path.join(path, name, META_FILE))]
    if not complete:
        return None
    return os.path.join(path, max(complete, key=lambda name: (bool(ITER_DIR.match(name)), name)))


_held_locks = {}  # real path of a save dir -> its open lock file, held by this process


def _take_lock(save_dir: str) -> Optional[str]:
    """flock SAVE/.lock for this process (re-entrant); None, or why the directory cannot be had."""
    key = os.path.realpath(save_dir)
    if key in _held_locks:
        return None
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        return f"save directory {save_dir} is a file"
    try:
        os.makedirs(save_dir, exist_ok=True)
        handle = open(os.path.join(save_dir, LOCK_FILE), "a+", encoding="utf-8")
    except OSError as err:
        return f"cannot use save directory {save_dir}: {err.strerror}"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown process"
        handle.close()
        return f"save directory {save_dir} is in use by another run ({owner}); one run per save directory"
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held_locks[key] = handle
    return None


def lock_save_dir(save_dir: str) -> None:
    """Make ``save_dir`` this run's alone until :func:`unlock_save_dir` or the process ends, then
    clear the debris of crashed saves. Collective: rank 0 takes the lock, every rank raises the
    same CheckpointError if it is taken. The lock is an flock, which the kernel drops when its
    holder dies, so a crashed or killed run never leaves a stale lock behind."""
    error = _take_lock(save_dir) if _is_rank0() else None
    if dist.is_initialized():
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise CheckpointError(error)
    if _is_rank0():
        for debris in [os.path.join(save_dir, n) for n in os.listdir(save_dir) if n.startswith(TMP_PREFIX)]:
            shutil.rmtree(debris) if os.path.isdir(debris) else os.remove(debris)
    _barrier()


def unlock_save_dir(save_dir: str) -> None:
    handle = _held_locks.pop(os.path.realpath(save_dir), None)
    if handle is not None:
        handle.close()


def read_meta(path: str) -> dict:
    """ratplus.json of the checkpoint at ``path``; CheckpointError if it is not a checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} is not a megatron-ratplus checkpoint (no {META_FILE} or '{LATEST}' marker)")
    try:
        with open(os.path.join(ckpt, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"unreadable checkpoint metadata in {ckpt}: {first_line(err)}") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or not isinstance(meta.get(key), (dict, str))]
    missing += [f"model.{key}" for key in SHAPE_KEYS if not missing and key not in meta["model"]]
    if missing:
        raise CheckpointError(f"checkpoint metadata {os.path.join(ckpt, META_FILE)} lacks {', '.join(missing)}")
    check_model_shape(meta["model"], os.path.join(ckpt, META_FILE))
    iteration = meta.get("iteration", 0)
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise CheckpointError(f"{os.path.join(ckpt, META_FILE)}: iteration must be an integer >= 0, got {iteration!r}")
    meta["path"] = ckpt
    return meta


def check_model_shape(shape: dict, where: str, tokenizer=None, names: Optional[dict] = None) -> None:
    """A recorded model shape (ratplus.json's "model", a Hugging Face config.json's) as a model
    can be built from it: positive integers (a bool is none), recurrence true or false, no more
    real tokens than embedding rows and, given the ``tokenizer``, exactly its tokens. A hand-edited
    or foreign file ends in one line naming it, not in a traceback while the model is built or a
    model that samples ids its tokenizer cannot decode. ``names``: the file's names of the keys."""
    name = (names or {}).get
    for key in SHAPE_KEYS:
        value, flag = shape.get(key), key == "recurrence"
        if key == "real_vocab_size" and value is None:
            continue  # ModelConfig's default: every embedding row is a real token
        if not (isinstance(value, bool) if flag else
                isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise CheckpointError(f"{where}: {name(key, key)} must be {'true or false' if flag else 'an integer >= 1'}, "
                                  f"got {value!r}")
    if shape["real_vocab_size"] is None:
        return
    if shape["real_vocab_size"] > shape["vocab_size"]:
        raise CheckpointError(f"{where}: {name('real_vocab_size', 'real_vocab_size')} {shape['real_vocab_size']} is "
                              f"above {name('vocab_size', 'vocab_size')} {shape['vocab_size']} (the embedding rows)")
    if tokenizer is not None and shape["real_vocab_size"] != tokenizer.vocab_size:
        raise CheckpointError(f"{where}: real_vocab_size {shape['real_vocab_size']} is not the "
                              f"{tokenizer.vocab_size} tokens of its tokenizer ({tokenizer.spec})")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _sharded_rng_state() -> ShardedObject:
    """This rank's RNG states as its own shard of a world-sized object (as Megatron-LM saves them):
    ranks differ, so they belong in no common (rank-0) state."""
    rank, world = _world()
    return ShardedObject(RNG_KEY, rng_state(), (world,), (rank,), replica_id=0)


def _unwrapped(chunk):
    """The GPTModel inside megatron's DDP / Float16Module (or CPUDataParallel) wrappers: its keys are
    the checkpoint's on every path (megatron's DDP would prefix them with ``module.``), as
    Megatron-LM unwraps before saving."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def sharded_training_state(model_chunks, optimizer, is_loading: bool = False) -> dict:
    """The sharded tensors of a training state in megatron's key layout: ``model`` (or ``model0``,
    ``model1``, ... per virtual pipeline stage, whose local key names coincide) and ``optimizer``,
    which finds its parameters' shards in the whole nested model state.

    ``is_loading``: the template of a load; megatron's distributed optimizer then asks for its
    Adam moments too (before its first step it has none to describe), as Megatron-LM does."""
    models = [_unwrapped(chunk) for chunk in model_chunks]
    if len(models) == 1:
        state = {"model": models[0].sharded_state_dict()}
    else:
        state = {f"model{i}": model.sharded_state_dict() for i, model in enumerate(models)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=dict(SHARDED_METADATA))
    return state


def save(save_dir: str, iteration: int, model_chunks, optimizer, common: dict, meta: dict) -> str:
    """Write checkpoint ``iteration`` atomically; returns its directory."""
    final = iteration_dir(save_dir, iteration)
    tmp = os.path.join(save_dir, TMP_PREFIX + os.path.basename(final))
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists; refusing to overwrite a checkpoint")
    marker_tmp = os.path.join(save_dir, TMP_PREFIX + LATEST)
    if _is_rank0():
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
        os.makedirs(tmp)
    _barrier()
    try:
        state = sharded_training_state(model_chunks, optimizer)
        state.update(common, rng_world_size=_world()[1])
        state[RNG_KEY] = _sharded_rng_state()
        writer = ThreadedSaveStrategy("torch_dist", 1, thread_count=WRITER_THREADS)
        dist_checkpointing.save(state, tmp, sharded_strategy=writer, content_metadata=dict(SHARDED_METADATA))
        _barrier()
        if _is_rank0():
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump({**meta, "iteration": iteration}, f, indent=2)
            os.rename(tmp, final)
            with open(marker_tmp, "w", encoding="utf-8") as f:
                f.write(os.path.basename(final))
            os.replace(marker_tmp, os.path.join(save_dir, LATEST))
    except BaseException as err:
        # Ctrl-C, SIGTERM (run_cli's Terminated) or a full disk inside the save: the previous
        # checkpoint is untouched; remove this save's unfinished directory so no .tmp.iter_*
        # outlives the run (a SIGKILL's debris is cleared by the next lock_save_dir). _Writer
        # has stopped its threads before this point.
        cause = _failure(err)
        disk = full_disk(cause, final)  # before the cleanup frees the space
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(marker_tmp)
        if disk is not None and not getattr(cause, "filename", None):  # name the checkpoint being written
            raise disk from None
        if isinstance(cause, OSError) and cause.errno in (errno.EDQUOT, errno.EROFS) and not cause.filename:
            raise OSError(cause.errno, cause.strerror, final) from None
        raise
    _barrier()
    return final


def _first_failure(err: BaseException) -> str:
    """One line naming what went wrong (a CheckpointException's first rank failure, unwrapped)."""
    err = _failure(err)
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _failure(err: BaseException) -> BaseException:
    """The first rank's failure inside a CheckpointException, else ``err``."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is (a CheckpointException wrapping) a signal rather than a bad file."""
    return not isinstance(_failure(err), Exception)


def load(path: str, model_chunks, optimizer=None) -> dict:
    """Load model (and optimizer) state in place; returns the common (non-tensor) state.

    With the optimizer (a resume), this rank's RNG states are restored too when the checkpoint
    was written by as many ranks; on another world size the run keeps its seeded RNG.
    """
    ckpt = read_meta(path)["path"]
    if optimizer is not None:
        optimizer.init_state()
    template = sharded_training_state(model_chunks, optimizer, is_loading=True)
    try:
        same_world = dist_checkpointing.load_common_state_dict(ckpt).get("rng_world_size") == _world()[1]
        if optimizer is not None and same_world:
            template[RNG_KEY] = _sharded_rng_state()
        # megatron calls keys this model asks for and the checkpoint lacks "unexpected"
        state, _, absent = dist_checkpointing.load(template, ckpt, strict=StrictHandling.RETURN_UNEXPECTED)
    # Truncated or mismatched files surface as many error types; torch's CheckpointException
    # (wrapping every rank's failure) derives from BaseException, not Exception.
    except (Exception, CheckpointException) as err:
        if _interrupted(err):  # Ctrl-C or SIGTERM while loading: run_cli's one line and 130/143
            raise
        raise CheckpointError(f"cannot load {ckpt}: {_first_failure(err)}") from None
    # Saved with the other --transformer-impl, a checkpoint may lack only Transformer Engine's
    # FP8 metadata (``_extra_state``), which then starts fresh (docs/DESIGN.md §7).
    absent = sorted(key for key in absent if not key.endswith("._extra_state"))
    if absent:
        raise CheckpointError(f"cannot load {ckpt}: it has no {absent[0]} ({len(absent)} keys missing)")
    if RNG_KEY in template:
        set_rng_state(state.pop(RNG_KEY))
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for name, chunk in zip(names, model_chunks):
        result = _unwrapped(chunk).load_state_dict(state.pop(name), strict=False)  # Float16Module's returns None
        wrong = [k for k in result.missing_keys if not k.endswith("._extra_state")] + result.unexpected_keys
        if wrong:
            raise CheckpointError(f"cannot load {ckpt}: {wrong[0]} does not match this model")
    if optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    return state


def model_meta(config) -> dict:
    """The model-shape fields a checkpoint records (enough to rebuild the model)."""
    return {key: getattr(config, key) for key in SHAPE_KEYS}


def _read_hf_export(path: str):
    """(meta, full state dict) of a Hugging Face export: its weights go straight into the built
    model, one rank holding them all (tensor parallelism needs our format: ratplus-convert)."""
    from megatron.core import parallel_state

    from megatron_ratplus.convert import local
    from megatron_ratplus.convert.hf import read_hf

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise CheckpointError(f"{path} is a Hugging Face export, which loads on one rank; for tensor "
                              f"parallelism convert it first: ratplus-convert --input {path} --output CKPT")
    state, shape, tokenizer_file = read_hf(path)
    pattern = shape.pop("attention_pattern")
    meta = {"model": model_meta(local.model_config(shape)), "attention_pattern": pattern,
            "tokenizer": f"json:{tokenizer_file}" if tokenizer_file else "byte"}
    return meta, state


def load_model(path: str, pattern=None, dtype: str = "fp32", **config_overrides):
    """(model, config, tokenizer) from a checkpoint or a Hugging Face export (ratplus-convert
    --to hf), for evaluation, generation and serving.

    Initialises a one-rank process group if none exists; ``pattern`` switches every layer's
    attention pattern (any string of the pattern grammar); by default the model attends with the
    pattern the checkpoint records (an adapted model keeps its own; dense otherwise). ``dtype``
    (a key of ``EVAL_DTYPES``): the parameters' (and so the activations' and decode caches')
    type after loading; bf16 halves memory and is the GPU's fast path (docs/DESIGN.md §8).
    """
    from megatron.core import parallel_state

    from megatron_ratplus import distributed
    from megatron_ratplus.config import model_config
    from megatron_ratplus.data.tokenizer import build_tokenizer
    from megatron_ratplus.model import build_model, set_attention_pattern

    if dtype not in EVAL_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(EVAL_DTYPES)}, not '{dtype}'")
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize()
    exported = os.path.isfile(os.path.join(path, "config.json"))  # ratplus-convert --to hf's directory
    meta, state = _read_hf_export(path) if exported else (read_meta(path), None)
    tokenizer = build_tokenizer(meta["tokenizer"])
    if not exported:  # read_hf checked an export against its tokenizer
        check_model_shape(meta["model"], os.path.join(meta["path"], META_FILE), tokenizer)
    recorded = {"attention_pattern": meta["attention_pattern"]} if "attention_pattern" in meta else {}
    config = model_config(**{**meta["model"], **recorded, **config_overrides})
    model = build_model(config)
    if state is None:
        load(meta["path"], [model])
    else:
        from megatron_ratplus.convert.local import load_full_state

        load_full_state(model, state)
    model.to(EVAL_DTYPES[dtype])  # loaded at the built dtype, then cast: the checkpoint's own dtype does not matter
    config.params_dtype, config.bf16 = EVAL_DTYPES[dtype], dtype == "bf16"
    model.eval()
    if pattern is not None:
        set_attention_pattern(model, pattern)
    return model, config, tokenizer
