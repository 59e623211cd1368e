"""Megatron's load-balanced context-parallel layout (docs/DESIGN.md §4): the sequence is cut into
2 x CP equal chunks and CP rank r holds chunks r and 2 CP - 1 - r (early and late tokens, so
causal work is even).

Everything that must follow *global* token order under CP (the recurrence composition, which
keys a query may see) derives it from :func:`chunk_ids` / :func:`chunk_owner`.
"""

from __future__ import annotations

from typing import Tuple

from megatron.core import parallel_state


def chunk_ids(rank: int, size: int) -> Tuple[int, int]:
    """Global chunk indices of the two slices CP rank ``rank`` holds, in local order."""
    return rank, 2 * size - 1 - rank


def chunk_owner(chunk: int, size: int) -> Tuple[int, int]:
    """(CP rank, local slice 0/1) holding global chunk ``chunk``."""
    return (chunk, 0) if chunk < size else (2 * size - 1 - chunk, 1)


def context_parallel_group(pg_collection=None):
    """The context-parallel process group, or None when CP is off (size 1 or not initialised)."""
    group = getattr(pg_collection, "cp", None)
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_context_parallel_group(check_initialized=False)
    return group if group is not None and group.size() > 1 else None
