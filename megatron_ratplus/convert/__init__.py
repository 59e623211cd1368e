"""Checkpoint conversion: every format maps onto our full (unsharded) state dict and back.

    authors.py   the RAT+ authors' torch files (current and older layouts) <-> ours
    hf.py        a Hugging Face directory (safetensors + a self-contained modeling file) <-> ours
    te_names.py  local-spec <-> Transformer Engine-spec state-dict key names
    reshard.py   our checkpoint at another TP/PP layout, or as one consolidated file
    local.py     our checkpoints read into / written from full state dicts

Every converter checks the tensors it is given against the tensors it expects (unused,
missing and misshaped ones are each one error naming them) and writes its output into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from typing import Dict, Iterator, Mapping, Tuple

import torch

from megatron_ratplus.errors import UserError
from megatron_ratplus.userfiles import full_disk_named, make_parents, remove_folders, remove_stale_temps


class ConversionError(UserError):
    """A source that cannot be converted (not a checkpoint, wrong tensors, bad output path)."""


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]], source: str) -> None:
    """Unused, missing or misshaped tensors of ``state`` (against name -> shape) are a ConversionError."""
    unused = set(state) - set(expected)
    if unused:
        raise ConversionError(f"{source}: unused tensors {_names(unused)} (not part of a RAT+ model of this shape)")
    missing = set(expected) - set(state)
    if missing:
        raise ConversionError(f"{source}: missing tensors {_names(missing)}")
    integral = sorted(k for k in expected if not state[k].is_floating_point())
    if integral:  # weights are floats: an integer tensor would be cast silently, not converted
        raise ConversionError(f"{source}: tensors {_names(integral)} are {state[integral[0]].dtype}, "
                              "not floating point")
    bad = {k for k in expected if tuple(state[k].shape) != tuple(expected[k])}
    if bad:
        first = sorted(bad)[0]
        raise ConversionError(f"{source}: misshaped tensors {_names(bad)}; {first} is {tuple(state[first].shape)}, "
                              f"expected {tuple(expected[first])}")


def rename(state: Mapping[str, torch.Tensor], names: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """``state`` under new names (``names``: old -> new, covering every key)."""
    return {names[k]: v for k, v in state.items()}


@contextlib.contextmanager
def fresh_output(path: str) -> Iterator[str]:
    """A temporary directory next to ``path``, renamed to ``path`` when the block succeeds.

    ``path`` must not exist: conversions never write into or over existing files.
    """
    if os.path.lexists(path):
        raise ConversionError(f"output {path} already exists; refusing to write into or over it")
    parent = os.path.dirname(os.path.abspath(path))
    created = make_parents(parent)  # removed again unless the output is published
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}")
    published = False
    try:
        remove_stale_temps(glob.escape(tmp.rsplit(".tmp-", 1)[0]) + ".tmp-*")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with full_disk_named(path):
            yield tmp
        try:
            os.rename(tmp, path)  # fails, never merges, if another run created path meanwhile
            published = True
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            raise ConversionError(f"output {path} was created by another process during this conversion; "
                                  "this run's output is discarded") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not published:  # a failed or signalled conversion leaves no new empty folders either
            remove_folders(created)
