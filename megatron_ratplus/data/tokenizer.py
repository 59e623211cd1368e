"""Tokenizers: byte-level (the default, needs no files), a local HF `tokenizers` JSON file and a
SentencePiece model (LLaMA-2's tokenizer.model is one).

All expose what megatron-core's GPTDataset reads (``vocab_size``, ``eod``) plus
``encode``/``decode`` and a ``spec`` string that a checkpoint stores to rebuild them.
"""

from __future__ import annotations

import os
from typing import List

from megatron_ratplus.errors import UserError, first_line


class DataError(UserError):
    """Bad data or tokenizer input; the message is one line meant for the user."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-document 256."""

    vocab_size = 257
    eod = 256
    spec = "byte"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A local HF `tokenizers` file (tokenizer.json); end-of-document is its EOS-like token."""

    _EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("a tokenizer file needs the 'tokenizers' package: pip install tokenizers") from None
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file not found: {path}")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise DataError(f"cannot read tokenizer file {path}: {first_line(err)}") from None
        self.path = os.path.abspath(path)
        vocab = self._tok.get_vocab()
        eod = next((vocab[n] for n in self._EOD_NAMES if n in vocab), None)
        self.vocab_size = self._tok.get_vocab_size() + (1 if eod is None else 0)
        self.eod = eod if eod is not None else self.vocab_size - 1
        self.spec = f"json:{self.path}"

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eod])


class SentencePieceTokenizer:
    """A local SentencePiece model; end-of-document is its EOS piece (or one id past the vocabulary)."""

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError:
            raise DataError("a SentencePiece model needs the 'sentencepiece' package: pip install sentencepiece") from None
        if not os.path.isfile(path):
            raise DataError(f"tokenizer model not found: {path}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as err:  # RuntimeError/OSError with the C++ message
            raise DataError(f"cannot read SentencePiece model {path}: {first_line(err)}") from None
        self.path = os.path.abspath(path)
        eos = self._sp.eos_id()
        self.vocab_size = self._sp.get_piece_size() + (1 if eos < 0 else 0)
        self.eod = eos if eos >= 0 else self.vocab_size - 1
        self.spec = f"sentencepiece:{self.path}"

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.eod])


def build_tokenizer(spec: str = "byte"):
    """``byte``, ``json:PATH``, ``sentencepiece:PATH``, or a bare path (``*.model``: SentencePiece,
    otherwise a tokenizer.json)."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    if spec.startswith("sentencepiece:"):
        return SentencePieceTokenizer(spec[len("sentencepiece:"):])
    if spec.startswith("json:"):
        return JsonTokenizer(spec[len("json:"):])
    return SentencePieceTokenizer(spec) if spec.endswith(".model") else JsonTokenizer(spec)


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1, multiple: int = 128) -> int:
    """Megatron's ``--make-vocab-size-divisible-by`` padding, but independent of the TP size.

    Megatron pads to a multiple of 128 x TP, so a TP=2 checkpoint would have another vocabulary
    than a TP=1 one and not load across sizes; a multiple of 128 already splits evenly for every
    power-of-two TP size. Only a TP size that does not divide it grows it further.
    """
    size = -(-vocab_size // multiple) * multiple
    while size % tensor_parallel:
        size += multiple
    return size
