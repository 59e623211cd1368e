"""The embedded default corpus: text that ships with every CPython, so training needs no download.

Documents are the interactive-help topics of ``pydoc_data`` (English prose about Python) and the
top-level modules of the standard library (Python source), in a fixed order. Every 50th
document goes to validation, so both splits mix prose and code.
"""

from __future__ import annotations

import os
import sysconfig
from typing import List, Tuple

import numpy as np

VALID_EVERY = 50


def documents() -> List[str]:
    """The corpus documents, deterministic on a given Python version."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                docs.append(f.read())
    return docs


def tokenize_documents(docs: List[str], tokenizer) -> np.ndarray:
    """One token stream: each document followed by the end-of-document token."""
    dtype = np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.int32
    parts = []
    for doc in docs:
        parts.append(np.asarray(tokenizer.encode(doc), dtype=dtype))
        parts.append(np.asarray([tokenizer.eod], dtype=dtype))
    return np.concatenate(parts)


def embedded_splits(tokenizer) -> Tuple[np.ndarray, np.ndarray]:
    """(train tokens, validation tokens) of the embedded corpus."""
    docs = documents()
    train = [d for i, d in enumerate(docs) if i % VALID_EVERY != VALID_EVERY - 1]
    valid = [d for i, d in enumerate(docs) if i % VALID_EVERY == VALID_EVERY - 1]
    return tokenize_documents(train, tokenizer), tokenize_documents(valid, tokenizer)
