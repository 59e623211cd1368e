"""One attention pattern: the visibility rule, its helpers, and the grammar that names it.

A trained RAT+ model can switch pattern at load time; the pattern is therefore plain data
(a frozen dataclass), parsed from a short string so that it can travel through CLI flags,
YAML configs and checkpoints (docs/DESIGN.md §2).

Grammar of one pattern::

    dense
    dilated:D[,w=W][,p=P]
    local:w=W[,p=P]
    topk:k=K[,block=B][,pool=mean|max][,d=D][,w=W][,p=P]

':' may stand for any ',' (``dilated:16:w=256:p=4``): argument lists that split at commas, such
as lm-eval's ``--model_args``, pass that spelling through whole.

The rule: query t may attend key j <= t iff (j + 1) % D == 0 (a dilated state), or t - j <= W
(window, which always holds for j = t), or j < P (sinks). Top-k additionally keeps only the K
best earlier key blocks plus the query's own block. This module is the rule's one PyTorch home
(:func:`visible`, :func:`may_be_seen`): the reference ops, context parallelism and the decode
cache call it, and ``kernels/ratplus_kernels/_common.py`` holds its Triton twin.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_ratplus.errors import UserError


class PatternError(UserError):
    """A pattern string or value is invalid; the message names the bad part."""


KINDS = ("dense", "dilated", "local", "topk")
_POOLS = ("mean", "max")
# Past any sequence a model runs, and well inside int32/int64 arithmetic: index math on a
# larger D, W, P, K or block wraps (negative strides) or overflows in the kernels and caches.
MAX_VALUE = 2**31 - 1


@dataclass(frozen=True)
class AttentionPattern:
    """One attention pattern.

    ``dilation`` is None for patterns without a dilated term (local); ``dilation == 1`` is
    dense causal attention. ``window`` counts past tokens besides the query itself.
    """

    kind: str = "dense"
    dilation: Optional[int] = 1
    window: int = 0
    sinks: int = 0
    topk: int = 0
    block: int = 64
    pool: str = "mean"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PatternError(f"unknown pattern kind '{self.kind}' (expected one of {', '.join(KINDS)})")
        if self.dilation is not None and (not isinstance(self.dilation, int) or self.dilation < 1):
            raise PatternError(f"dilation D must be an integer >= 1, got {self.dilation!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise PatternError(f"window W must be an integer >= 0, got {self.window!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise PatternError(f"sinks P must be an integer >= 0, got {self.sinks!r}")
        if self.kind == "topk":
            if not isinstance(self.topk, int) or self.topk < 0:
                raise PatternError(f"top-k k must be an integer >= 0, got {self.topk!r}")
            if not isinstance(self.block, int) or self.block < 1:
                raise PatternError(f"top-k block must be an integer >= 1, got {self.block!r}")
            if self.pool not in _POOLS:
                raise PatternError(f"top-k pool must be one of {', '.join(_POOLS)}, got {self.pool!r}")
        for name, value in (("dilation D", self.dilation), ("window W", self.window), ("sinks P", self.sinks),
                            ("top-k k", self.topk), ("top-k block", self.block)):
            if value is not None and value > MAX_VALUE:
                raise PatternError(f"{name} must be at most {MAX_VALUE}, got {value}")

    @property
    def is_dense(self) -> bool:
        """True when every causal key is visible (no sparsity at all)."""
        return self.kind in ("dense", "dilated") and self.dilation == 1

    def cache_slots(self, seq_len: int) -> int:
        """Key/value slots a decode cache needs after ``seq_len`` tokens: P + W + 1 + T/D (capped at T)."""
        if self.is_dense or self.kind == "topk":
            return seq_len
        dilated = seq_len // self.dilation if self.dilation else 0
        return min(seq_len, self.sinks + self.window + 1 + dilated)

    def __str__(self) -> str:
        if self.is_dense and self.window == 0 and self.sinks == 0:
            return "dense"
        extra = "".join(f",{n}={v}" for n, v in (("w", self.window), ("p", self.sinks)) if v)
        if self.kind == "local":
            return f"local:w={self.window}" + (f",p={self.sinks}" if self.sinks else "")
        if self.kind == "topk":
            d = f",d={self.dilation}" if self.dilation and self.dilation > 1 else ""
            return f"topk:k={self.topk},block={self.block},pool={self.pool}{d}{extra}"
        return f"dilated:{self.dilation}{extra}"


def _int_value(text: str, name: str, source: str) -> int:
    """Plain decimal digits only: int() would also take '1_6' (16) and ' 16'."""
    if not re.fullmatch(r"-?[0-9]+", text):  # ASCII: \d also matches other scripts' digits
        raise PatternError(f"pattern '{source}': {name} must be an integer, got '{text}'")
    return int(text)


def parse_pattern(text) -> AttentionPattern:
    """Parse one pattern string (or pass an AttentionPattern through)."""
    if isinstance(text, AttentionPattern):
        return text
    if not isinstance(text, str):
        raise PatternError(f"a pattern must be a string, got {type(text).__name__}")
    source = text
    text = text.strip().lower()
    if not text:
        raise PatternError("empty pattern string")
    kind, colon, rest = text.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise PatternError(f"pattern '{source}': unknown kind '{kind}' (expected one of {', '.join(KINDS)})")
    if kind == "dense":
        if colon:
            raise PatternError(f"pattern '{source}': 'dense' takes no parameters")
        return AttentionPattern("dense", dilation=1)

    fields = {}
    for i, part in enumerate(p.strip() for p in re.split("[,:]", rest)):  # ':' survives lm-eval's comma split
        if not part:
            raise PatternError(f"pattern '{source}': empty parameter")
        if "=" not in part:
            if kind == "dilated" and i == 0:
                fields["d"] = part
                continue
            raise PatternError(f"pattern '{source}': parameter '{part}' must look like name=value")
        name, value = (s.strip() for s in part.split("=", 1))
        if name in fields:
            raise PatternError(f"pattern '{source}': parameter '{name}' given twice")
        fields[name] = value

    allowed = {"dilated": {"d", "w", "p"}, "local": {"w", "p"}, "topk": {"k", "block", "pool", "d", "w", "p"}}[kind]
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise PatternError(f"pattern '{source}': unknown parameter '{unknown[0]}' for '{kind}' "
                           f"(allowed: {', '.join(sorted(allowed))})")
    required = {"dilated": ("d",), "local": ("w",), "topk": ("k",)}[kind]
    for name in required:
        if name not in fields:
            raise PatternError(f"pattern '{source}': '{kind}' needs {name}=...")

    ints = {n: _int_value(v, n, source) for n, v in fields.items() if n != "pool"}
    try:
        return AttentionPattern(
            kind=kind,
            dilation=None if kind == "local" else ints.get("d", None if kind == "topk" else 1),
            window=ints.get("w", 0),
            sinks=ints.get("p", 0),
            topk=ints.get("k", 0),
            block=ints.get("block", 64),
            pool=fields.get("pool", "mean"),
        )
    except PatternError as err:
        raise PatternError(f"pattern '{source}': {err}") from None


def may_be_seen(pattern: AttentionPattern, j, start, states: bool = True):
    """May key position j be seen by some query at or after position ``start`` (broadcast tensors)?

    True for sinks, dilated states and keys within the window of ``start``; causality (j <= t)
    is the caller's. ``states=False`` leaves the dilated states out: under top-k they are
    candidates chosen by block, not always visible.
    """
    keep = (j < pattern.sinks) | (j >= start - pattern.window)
    if states and pattern.dilation is not None:
        keep = keep | ((j + 1) % pattern.dilation == 0)
    return keep


def visible(pattern: AttentionPattern, t, j, states: bool = True):
    """The rule, elementwise: may a query at position t attend the key at position j (broadcast tensors)?"""
    return may_be_seen(pattern, j, t, states) & (j <= t)


def allowed_mask(pattern: AttentionPattern, seq_len: int, device=None):
    """Dense [T, T] boolean mask of the rule (ignoring top-k selection).

    Only for references and tests: O(T^2) memory, never on a hot path.
    """
    import torch

    t = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    return visible(pattern, t, j)


__all__ = ["AttentionPattern", "PatternError", "KINDS", "parse_pattern", "visible", "may_be_seen", "allowed_mask"]
