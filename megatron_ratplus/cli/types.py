"""The typed values of every command line: one vocabulary, one wording (docs/DESIGN.md §10).

argparse's ``int`` and ``float`` take what no user means: ``1_6`` (16), `` 5``, ``nan``, ``inf``,
``1e999``. Each type here takes plain decimal text only, refuses a non-finite number and checks
its range, so every parser (ratplus-*, tools/*.py, YAML configs read through them, lm-eval
model arguments) refuses the same bad value in the same words.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, List

from megatron_ratplus.errors import UserError

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(text, integer: bool):
    word = str(text)
    if isinstance(text, bool) or not (_INT if integer else _FLOAT).fullmatch(word):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a finite number'}, got '{word}'")
    value = int(word) if integer else float(word)
    if not integer and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{word}'")
    return value


class Typed:
    """A checked number type: ``Typed(int, '>= 1', lambda v: v >= 1)('3') == 3``."""

    def __init__(self, kind: type, rule: str, ok: Callable[[float], bool]):
        self.kind, self.rule, self.ok = kind, rule, ok
        self.__name__ = f"{kind.__name__} {rule}"

    def __call__(self, text):
        value = _number(text, self.kind is int)
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if self.kind is int else 'a number'} "
                                             f"{self.rule}, got '{text}'")
        return value

    def check(self, text, where: str):
        """The value of ``text`` for non-argparse callers; a UserError naming ``where`` when bad."""
        try:
            return self(text)
        except argparse.ArgumentTypeError as err:
            raise UserError(f"{where}: {err}") from None


positive_int = Typed(int, ">= 1", lambda v: v >= 1)
non_negative_int = Typed(int, ">= 0", lambda v: v >= 0)
positive_float = Typed(float, "> 0", lambda v: v > 0)
non_negative_float = Typed(float, ">= 0", lambda v: v >= 0)
probability = Typed(float, "in (0, 1]", lambda v: 0 < v <= 1)
fraction = Typed(float, "in [0, 1)", lambda v: 0 <= v < 1)
# A random seed: torch takes 64 bits, numpy's RandomState (megatron's dataset shuffles) 32, and
# megatron adds offsets per rank; a larger seed would fail with a traceback mid-start-up.
seed = Typed(int, f"in [0, {2 ** 31 - 1}]", lambda v: 0 <= v < 2 ** 31)
sampling_seed = Typed(int, "in [0, 2**64)", lambda v: 0 <= v < 2**64)  # torch.Generator's range


def utf8_text(text: str) -> str:
    """Text from the command line (a prompt, a stop string): Python hands undecodable argv bytes
    over as lone surrogates (\\udcff for byte 0xff), which no tokenizer can encode."""
    try:
        str(text).encode("utf-8")
    except UnicodeEncodeError as err:
        char = err.object[err.start]
        byte = f" (byte {ord(char) - 0xdc00:#04x})" if 0xdc80 <= ord(char) <= 0xdcff else ""
        raise argparse.ArgumentTypeError(f"is not UTF-8 text{byte}") from None
    return text


def byte_size(text: str) -> int:
    """'5GB', '500MB', '64KB', '1000' -> bytes, at least one."""
    match = re.fullmatch(r"([0-9]+)\s*([KMG]?)B?", str(text).strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (e.g. 5GB, 500MB)")
    size = int(match.group(1)) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[match.group(2)]
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be a size of at least 1 byte, got '{text}'")
    return size


def int_list(text: str) -> List[int]:
    """'4000,8000' -> [4000, 8000]: comma-separated integers >= 1."""
    return [positive_int(word) for word in str(text).split(",")]
