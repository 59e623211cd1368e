"""Checkpoints: megatron-core dist_checkpointing directories, written so a crash never costs one.

Layout of a save directory::

    SAVE/latest                 name of the newest complete checkpoint (replaced atomically)
    SAVE/iter_0000100/          dist_checkpointing files + ratplus.json (model shape, tokenizer, progress)

A save writes ``SAVE/.tmp.iter_0000100`` first, renames it into place when every rank is done,
and only then moves the ``latest`` marker; an existing checkpoint directory is never written
into. Sharded tensors reshard on load, so a TP=2 checkpoint loads at TP=1 and back (the padded
vocabulary does not depend on the TP size, see data.tokenizer.padded_vocab_size).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ratplus.config import SHAPE_KEYS
from megatron_ratplus.errors import UserError

META_FILE = "ratplus.json"
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint path that cannot be used; the message is one line for the user."""


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_checkpoint(path: str) -> Optional[str]:
    """The checkpoint a path names: a checkpoint directory itself, or a save dir's ``latest``."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    marker = os.path.join(path, LATEST)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            target = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(target, META_FILE)):
            return target
    return None


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
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"unreadable checkpoint metadata in {ckpt}: {err}") from None
    meta["path"] = ckpt
    return meta


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def sharded_training_state(model_chunks, optimizer, is_loading: bool = False) -> dict:
    """The sharded tensors of a training state (model chunks and optimizer), megatron's key layout.

    ``is_loading``: the template of a load; megatron's distributed optimizer then asks for its
    Adam moments too (before its first step it has none to describe), as Megatron-LM does."""
    if len(model_chunks) == 1:
        model_state = {"model": model_chunks[0].sharded_state_dict()}
    else:
        model_state = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}
    flat_model = {}
    for chunk_state in model_state.values():
        flat_model.update(chunk_state)
    state = dict(model_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(flat_model, is_loading=is_loading)
    return state


def save(save_dir: str, iteration: int, model_chunks, optimizer, common: dict, meta: dict) -> str:
    """Write checkpoint ``iteration`` atomically; returns its directory."""
    final = iteration_dir(save_dir, iteration)
    tmp = os.path.join(save_dir, f".tmp.{os.path.basename(final)}")
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists; refusing to overwrite a checkpoint")
    if _is_rank0():
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
        os.makedirs(tmp)
    _barrier()
    state = sharded_training_state(model_chunks, optimizer)
    state.update(common)
    dist_checkpointing.save(state, tmp)
    _barrier()
    if _is_rank0():
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump({**meta, "iteration": iteration}, f, indent=2)
        os.rename(tmp, final)
        marker_tmp = os.path.join(save_dir, f".{LATEST}.tmp")
        with open(marker_tmp, "w", encoding="utf-8") as f:
            f.write(os.path.basename(final))
        os.replace(marker_tmp, os.path.join(save_dir, LATEST))
    _barrier()
    return final


def load(path: str, model_chunks, optimizer=None) -> dict:
    """Load model (and optimizer) state in place; returns the common (non-tensor) state."""
    ckpt = read_meta(path)["path"]
    if optimizer is not None:
        optimizer.init_state()
    template = sharded_training_state(model_chunks, optimizer, is_loading=True)
    try:  # megatron calls keys this model asks for and the checkpoint lacks "unexpected"
        state, _, absent = dist_checkpointing.load(template, ckpt, strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointException as err:  # torch's, a BaseException: its last line holds the reason
        raise CheckpointError(f"cannot load {ckpt}: {str(err).strip().splitlines()[-1].strip()}") from None
    except Exception as err:  # dist_checkpointing reports shape/key mismatches as many error types
        raise CheckpointError(f"cannot load {ckpt}: {str(err).splitlines()[0]}") from None
    # Saved with the other --transformer-impl, a checkpoint may lack only Transformer Engine's
    # FP8 metadata (``_extra_state``), which then starts fresh (docs/DESIGN.md §7).
    absent = sorted(key for key in absent if not key.endswith("._extra_state"))
    if absent:
        raise CheckpointError(f"cannot load {ckpt}: it has no {absent[0]} ({len(absent)} keys missing)")
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for name, chunk in zip(names, model_chunks):
        while hasattr(chunk, "module"):  # DDP / Float16Module wrappers: the latter's load_state_dict returns None
            chunk = chunk.module
        result = chunk.load_state_dict(state.pop(name), strict=False)
        wrong = [k for k in result.missing_keys if not k.endswith("._extra_state")] + result.unexpected_keys
        if wrong:
            raise CheckpointError(f"cannot load {ckpt}: {wrong[0]} does not match this model")
    if optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    return state


def model_meta(config) -> dict:
    """The model-shape fields a checkpoint records (enough to rebuild the model)."""
    return {key: getattr(config, key) for key in SHAPE_KEYS}


def load_model(path: str, pattern=None, **config_overrides):
    """(model, config, tokenizer) from a checkpoint, for evaluation and generation.

    Initialises a one-rank process group if none exists; ``pattern`` switches every layer's
    attention pattern (any string of the pattern grammar).
    """
    from megatron.core import parallel_state

    from megatron_ratplus import distributed
    from megatron_ratplus.config import model_config
    from megatron_ratplus.data.tokenizer import build_tokenizer
    from megatron_ratplus.model import build_model, set_attention_pattern

    meta = read_meta(path)
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize()
    tokenizer = build_tokenizer(meta["tokenizer"])
    # checkpoints written before real_vocab_size was recorded: the tokenizer's vocabulary is the real one
    config = model_config(**{"real_vocab_size": tokenizer.vocab_size, **meta["model"], **config_overrides})
    model = build_model(config)
    load(meta["path"], [model])
    model.eval()
    if pattern is not None:
        set_attention_pattern(model, pattern)
    return model, config, tokenizer
