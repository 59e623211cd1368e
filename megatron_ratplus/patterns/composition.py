"""Compositions: several attention patterns in one model, per layer and per head group.

Parsed by :func:`parse_composition` (docs/DESIGN.md §2)::

    composition := item (';' item)*              one item per layer, in layer order
                 | 'cycle(' item (';' item)* ')' the items repeated to fill the layers
    item        := [N '*'] layer                 N consecutive layers (default 1)
    layer       := heads | '(' heads ')'
    heads       := group ('|' group)*            head groups, in head order
    group       := [N '*'] pattern               N heads; without counts the heads split equally

- A single item (``dilated:16``, ``dense|dilated:16``) applies to every layer.
- ``dense;dilated:64;dense;dilated:64`` names each of 4 layers; a list must have exactly as many
  layers as the model, a cycle (``cycle(dense;dilated:64)``) must divide the layer count.
- ``12*dense;12*dilated:64,w=256``: 12 dense layers, then 12 dilated ones.
- ``dense|dilated:16``: in every layer the first half of the heads is dense, the second half
  dilated (the groups must divide the heads); ``2*dense|6*dilated:16`` counts heads explicitly
  (the counts must add up to the heads, and either every group has a count or none).
- ``|`` binds tighter than a layer count, so ``4*(dense|dilated:64);4*dilated:64`` repeats a
  mixed-head layer 4 times (``4*dense|dilated:64`` would mean 4 dense heads).
- Under tensor parallelism, rank r holds heads [r * H/tp, (r + 1) * H/tp) and uses their patterns.
- A comma-separated list of patterns (``--patterns dense,dilated:16,w=256,p=4``) is split by
  :func:`split_pattern_list`: a piece starting with ``name=`` continues the previous pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

from megatron_ratplus.patterns.pattern import AttentionPattern, PatternError, parse_pattern

_COUNT = re.compile(r"^\s*([0-9]+)\s*\*(.*)$")  # ASCII digits
# A count repeats a layer or a head group: more than any model's layers or heads (parsing must
# not allocate what a typo asks for; the model's own sizes are checked at resolve time).
MAX_COUNT = 65536


def _split_count(text: str, source: str):
    """'N*rest' -> (N, rest); 'rest' -> (None, rest)."""
    match = _COUNT.match(text)
    if not match:
        return None, text
    count = int(match.group(1))
    if not 1 <= count <= MAX_COUNT:
        raise PatternError(f"pattern '{source}': a count must be in [1, {MAX_COUNT}], got {count}")
    return count, match.group(2)


@dataclass(frozen=True)
class LayerPatterns:
    """The patterns of one layer: (pattern, head count or None for an equal share) per head group."""

    groups: Tuple[Tuple[AttentionPattern, Optional[int]], ...]

    @property
    def uniform(self) -> Optional[AttentionPattern]:
        """The layer's single pattern, or None when its head groups differ."""
        patterns = {p for p, _ in self.groups}
        return next(iter(patterns)) if len(patterns) == 1 else None

    def per_head(self, num_heads: int) -> Tuple[AttentionPattern, ...]:
        """One pattern per head of the whole (unsharded) layer."""
        counts = [n for _, n in self.groups]
        if all(n is None for n in counts):
            if num_heads % len(self.groups):
                raise PatternError(f"pattern '{self}': {len(self.groups)} head groups do not divide "
                                   f"the {num_heads} attention heads")
            counts = [num_heads // len(self.groups)] * len(self.groups)
        elif any(n is None for n in counts):
            raise PatternError(f"pattern '{self}': give a head count to every group or to none")
        elif sum(counts) != num_heads:
            raise PatternError(f"pattern '{self}': head counts add up to {sum(counts)}, "
                               f"but the layer has {num_heads} attention heads")
        return tuple(p for (p, _), n in zip(self.groups, counts) for _ in range(n))

    def __str__(self) -> str:
        return "|".join(f"{n}*{p}" if n else str(p) for p, n in self.groups)


def _parse_layer(text: str, source: str) -> LayerPatterns:
    groups = []
    for part in text.split("|"):
        count, body = _split_count(part, source) if "|" in text else (None, part)
        groups.append((parse_pattern(body), count))
    return LayerPatterns(tuple(groups))


@dataclass(frozen=True)
class PatternComposition:
    """Patterns for a whole model: one LayerPatterns per layer, or a cycle of them."""

    layers: Tuple[LayerPatterns, ...]
    cycle: bool = False

    def per_layer(self, num_layers: int) -> Tuple[LayerPatterns, ...]:
        """One LayerPatterns per layer of a model with ``num_layers`` layers."""
        n = len(self.layers)
        if self.cycle:
            if num_layers % n:
                raise PatternError(f"pattern '{self}': a cycle of {n} layer patterns does not divide "
                                   f"the {num_layers} layers")
            return self.layers * (num_layers // n)
        if n == 1:
            return self.layers * num_layers
        if n != num_layers:
            raise PatternError(f"pattern '{self}' names {n} layers, but the model has {num_layers}")
        return self.layers

    def validate(self, num_layers: int, num_heads: int) -> None:
        """resolve()'s checks without building its per-layer tuple (a config with absurd sizes
        is refused by the memory check, not by materialising it)."""
        n = len(self.layers)
        if self.cycle and num_layers % n:
            raise PatternError(f"pattern '{self}': a cycle of {n} layer patterns does not divide "
                               f"the {num_layers} layers")
        if not self.cycle and n not in (1, num_layers):
            raise PatternError(f"pattern '{self}' names {n} layers, but the model has {num_layers}")
        for layer in set(self.layers):
            layer.per_head(num_heads)

    def resolve(self, num_layers: int, num_heads: int) -> Tuple[Tuple[AttentionPattern, ...], ...]:
        """[layer][head] -> AttentionPattern, validating layer and head counts."""
        return tuple(layer.per_head(num_heads) for layer in self.per_layer(num_layers))

    def __str__(self) -> str:
        items, i = [], 0
        while i < len(self.layers):  # run-length encode equal neighbours
            j = i
            while j < len(self.layers) and self.layers[j] == self.layers[i]:
                j += 1
            body = str(self.layers[i])
            if "|" in body and (j - i > 1 or len(self.layers) > 1):
                body = f"({body})"
            items.append(f"{j - i}*{body}" if j - i > 1 else body)
            i = j
        text = ";".join(items)
        return f"cycle({text})" if self.cycle else text


CompositionLike = Union[str, AttentionPattern, LayerPatterns, "PatternComposition", Sequence]


def parse_composition(text: CompositionLike) -> PatternComposition:
    """Parse a composition string (grammar in the module docstring) or a per-layer list.

    A list or tuple gives one item per layer (strings, AttentionPatterns or LayerPatterns).
    """
    if isinstance(text, PatternComposition):
        return text
    if isinstance(text, AttentionPattern):
        return PatternComposition((LayerPatterns(((text, None),)),))
    if isinstance(text, LayerPatterns):
        return PatternComposition((text,))
    if isinstance(text, (list, tuple)):
        if not text:
            raise PatternError("an empty list of layer patterns")
        layers = []
        for item in text:
            layers.extend(parse_composition(item).layers if not isinstance(item, LayerPatterns) else [item])
        return PatternComposition(tuple(layers))
    if not isinstance(text, str):
        raise PatternError(f"a pattern must be a string, got {type(text).__name__}")
    source, body = text, text.strip()
    cycle = body.lower().startswith("cycle(")
    if cycle:
        if not body.endswith(")"):
            raise PatternError(f"pattern '{source}': 'cycle(' needs a closing ')'")
        body = body[len("cycle("):-1]
    layers = []
    for item in body.split(";"):
        if not item.strip():
            raise PatternError(f"pattern '{source}': empty layer pattern")
        count, layer = (None, item) if "|" in item and "(" not in item else _split_count(item, source)
        layer = layer.strip()
        if layer.startswith("(") and layer.endswith(")"):
            layer = layer[1:-1]
        if "(" in layer or ")" in layer:
            raise PatternError(f"pattern '{source}': unbalanced or misplaced parentheses in '{item.strip()}'")
        layers.extend([_parse_layer(layer, source)] * (count or 1))
        if len(layers) > MAX_COUNT:
            raise PatternError(f"pattern '{source}' names more than {MAX_COUNT} layers")
    return PatternComposition(tuple(layers), cycle=cycle)


_PARAMETER = re.compile(r"^\s*[a-z]+\s*=", re.IGNORECASE)


def split_pattern_list(text: str):
    """Split a comma-separated list of patterns/compositions, where commas also separate a
    pattern's own parameters: a piece that starts with ``name=`` continues the previous one.

    ``dense,dilated:16,w=256,p=4,dilated:64`` -> [dense, dilated:16,w=256,p=4, dilated:64]
    """
    items = []
    for piece in text.split(","):
        if items and _PARAMETER.match(piece):
            items[-1] += "," + piece.strip()
        elif piece.strip():
            items.append(piece.strip())
        else:
            raise PatternError(f"pattern list '{text}': empty entry")
    for item in items:
        parse_composition(item)  # one clear error for a bad entry
    return items


def head_runs(patterns: Sequence[AttentionPattern]):
    """Contiguous runs of equal patterns over heads: [(pattern, first head, end head)]."""
    runs = []
    for i, pattern in enumerate(patterns):
        if runs and runs[-1][0] == pattern:
            runs[-1] = (pattern, runs[-1][1], i + 1)
        else:
            runs.append((pattern, i, i + 1))
    return runs




__all__ = ["LayerPatterns", "PatternComposition", "parse_composition", "head_runs", "split_pattern_list"]
