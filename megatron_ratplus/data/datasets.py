"""Training and validation datasets with one sample format and a deterministic order.

A sample is megatron's GPT sample dict: ``tokens`` and ``labels`` ([seq], labels shifted by
one), ``loss_mask`` and ``position_ids``. Two sources produce it:

- the embedded corpus (an in-memory token stream cut into windows), and
- megatron indexed datasets (``.bin``/``.idx``) through megatron-core's ``GPTDataset``, one
  prefix or a weighted blend (``BlendedMegatronDatasetBuilder``), validated up front because
  GPTDataset loops forever on an empty split and reads corrupt files silently; the costly part
  of the check (a scan of every token id) runs once per version of the files.

``SampleOrder`` maps the count of consumed samples to a dataset index, so the data position is
one integer in the checkpoint and resuming reproduces the exact batches; ``BatchSource`` cuts
a global batch into one data-parallel rank's micro-batches (``collate``d) by that count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_ratplus.data.corpus import embedded_splits
from megatron_ratplus.data.tokenizer import DataError
from megatron_ratplus.errors import first_line

# The data of a run that names none: the shuffling seed (also the run's seed) and megatron's
# train/validation/test split of indexed data.
DEFAULT_SEED, DEFAULT_SPLIT = 1234, "98,2,0"


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_length + 1`` tokens over one token stream."""

    def __init__(self, tokens: np.ndarray, seq_length: int):
        if len(tokens) < seq_length + 1:
            raise DataError(f"the data has {len(tokens)} tokens, fewer than one sample of "
                            f"--seq-length {seq_length} + 1")
        self.tokens, self.seq_length = tokens, seq_length

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        start = index * self.seq_length
        window = torch.from_numpy(self.tokens[start:start + self.seq_length + 1].astype(np.int64))
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


class SampleOrder:
    """Consumed-sample counter -> dataset index: a fresh seeded permutation every epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = None, None

    def __call__(self, consumed: int) -> int:
        epoch, offset = divmod(consumed, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.size)
            self._epoch = epoch
        return int(self._perm[offset])


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


class BatchSource:
    """This data-parallel rank's micro-batches of a global batch, from the consumed-sample count alone."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool):
        self.dataset, self.order = dataset, SampleOrder(len(dataset), seed, shuffle)
        self.micro, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def microbatches(self, consumed: int, global_batch: int) -> List[Dict[str, torch.Tensor]]:
        out = []
        for m in range(global_batch // (self.micro * self.dp_size)):
            start = consumed + (m * self.dp_size + self.dp_rank) * self.micro
            out.append(collate([self.dataset[self.order(start + i)] for i in range(self.micro)]))
        return out


CHECK_SUFFIX = ".ratplus-check.json"
_SCAN_CHUNK = 1 << 26  # tokens per read of the id scan


def _token_range(prefix: str, dtype) -> Tuple[int, int]:
    """(min, max) token id of ``prefix.bin``: one chunked pass over the file."""
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    low, high = None, None
    for start in range(0, len(data), _SCAN_CHUNK):
        chunk = data[start:start + _SCAN_CHUNK]
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
        high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
    return low, high


def _file_key(prefix: str) -> dict:
    """What identifies this version of the dataset files: size, mtime and a hash of the first and
    last MiB of .bin and .idx (a copy with other content but the same size and mtime differs)."""
    key = {}
    for ext in (".bin", ".idx"):
        st = os.stat(prefix + ext)
        digest = hashlib.sha256()
        with open(prefix + ext, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            digest.update(f.read(1 << 20))
        key[ext] = [st.st_size, st.st_mtime_ns, digest.hexdigest()]
    return key


_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version 1, dtype code, sequences, documents


def _check_index_header(prefix: str) -> None:
    """megatron's .idx header and table sizes, checked before megatron opens the files (its
    IndexedDataset half-built on a bad file prints an "Exception ignored" traceback when freed)."""
    path = prefix + ".idx"
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"index {path} is empty (0 bytes): the dataset was not written completely")
    with open(path, "rb") as f:
        head = f.read(_INDEX_HEADER.size)
    if len(head) < _INDEX_HEADER.size or head[:9] != _INDEX_MAGIC:
        raise DataError(f"{path} is not a megatron index (bad header)")
    _, version, _, sequences, documents = _INDEX_HEADER.unpack(head)
    if version != 1:
        raise DataError(f"{path} has index version {version}; only version 1 is read")
    if size < _INDEX_HEADER.size + 12 * sequences + 8 * documents:
        raise DataError(f"index {path} is truncated: {size} bytes for {sequences} sequences")
    if sequences == 0 or os.path.getsize(prefix + ".bin") == 0:
        raise DataError(f"dataset {prefix} is empty: it holds no documents")


def _recorded_range(prefix: str, key: dict) -> Optional[Tuple[int, int]]:
    try:
        with open(prefix + ".idx" + CHECK_SUFFIX, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("files") == key:
            return int(record["min"]), int(record["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, or a stale/garbled one: scan again
    return None


def _record_range(prefix: str, key: dict, low: int, high: int) -> None:
    """Write the scan's result beside the .idx (atomically); a read-only data directory just
    means the next start scans again."""
    path = prefix + ".idx" + CHECK_SUFFIX
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"files": key, "min": low, "max": high}, f)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_indexed_dataset(prefix: str, vocab_size: int, pending: Optional[list] = None) -> int:
    """Validate ``prefix.bin``/``prefix.idx``; returns the token count. One-line DataError otherwise.

    The token-id scan reads the whole .bin (hundreds of GB at FineWeb scale), so its result
    (min and max id) is recorded beside the .idx, keyed by _file_key of both files,
    and later starts reuse it; the ids are then checked against this run's vocabulary.
    ``pending``: the recording is appended here (a callable) for the caller to run once the
    rest of the run is accepted too, so a run refused for another reason writes nothing.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        path = prefix + ext
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        if not os.access(path, os.R_OK):
            raise DataError(f"data file not readable: {path}")
    _check_index_header(prefix)
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        sizes = dataset.sequence_lengths
        dtype = dataset.index.dtype
    except Exception as err:  # megatron raises assertions/ValueErrors of many kinds on bad indexes
        raise DataError(f"corrupt index {prefix}.idx: {first_line(err)}") from None
    n_tokens = int(np.sum(sizes, dtype=np.int64))
    expected = n_tokens * np.dtype(dtype).itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"{prefix}.bin has {actual} bytes but its index describes {expected}: truncated or corrupt")
    if n_tokens == 0:
        raise DataError(f"{prefix} holds no tokens")
    key = _file_key(prefix)
    recorded = _recorded_range(prefix, key)
    low, high = recorded if recorded else _token_range(prefix, dtype)
    if low < 0:  # refused before recording: a refused file leaves nothing behind
        raise DataError(f"{prefix}.bin holds negative token id {low}: corrupt or written with another dtype")
    if high >= vocab_size:
        raise DataError(f"{prefix}.bin holds token id {high}, beyond the vocabulary size {vocab_size}")
    if recorded is None:  # only for an accepted dataset: a refused one leaves nothing beside it
        record = functools.partial(_record_range, prefix, key, low, high)
        if pending is None:
            record()
        else:
            pending.append(record)
    return n_tokens


def parse_blend(data_path: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``--data-path`` as prefixes and weights: ``A B`` (equal shares by size) or ``0.7 A 0.3 B``
    (Megatron-LM's weighted form: a weight before every prefix)."""
    def weight(text):
        try:
            return float(text)
        except ValueError:
            return None

    weights = [weight(w) for w in data_path[0::2]]
    if len(data_path) % 2 or all(w is None for w in weights):
        numbers = [p for p in data_path if weight(p) is not None]
        if numbers:
            raise DataError(f"--data-path mixes weights and prefixes: give a weight before every prefix "
                            f"('0.7 A 0.3 B') or none (found '{numbers[0]}')")
        return list(data_path), None
    if any(w is None for w in weights) or any(weight(p) is not None for p in data_path[1::2]):
        raise DataError("--data-path mixes weights and prefixes: give a weight before every prefix "
                        "('0.7 A 0.3 B') or none")
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise DataError(f"--data-path weights must be positive, got {', '.join(data_path[0::2])}")
    return list(data_path[1::2]), weights


def check_split(split: str) -> str:
    """Megatron's split string: up to three non-negative train,valid,test shares (',' or '/')."""
    parts = re.split(r"[,/]", split.strip()) if split and split.strip() else []
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(not np.isfinite(x) or x < 0 for x in shares) or sum(shares) <= 0:
        raise DataError(f"--split '{split}' must be up to three non-negative shares like '98,2,0'")
    return split


def check_split_documents(prefix: str, split: str, seq_length: int, samples: Tuple[int, int]) -> None:
    """Train and validation must each get a document of ``prefix``: GPTDataset loops forever on an
    empty split. Document ranges are rounded as megatron's builder rounds them. And the sample
    index megatron builds in memory for ``samples`` (train, valid) must fit: it counts the epochs
    one by one and lays out every document of every epoch, so a typo'd --train-iters or
    --eval-iters would loop for hours or ask for terabytes instead of being refused."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ratplus.estimate import check_fits

    shares = [float(p) for p in re.split(r"[,/]", split.strip())]
    shares += [0.0] * (3 - len(shares))
    bounds = np.cumsum([0.0] + [x / sum(shares) for x in shares])
    dataset = IndexedDataset(prefix, mmap=True)
    documents = dataset.document_indices
    n_docs = len(documents) - 1
    for name, lo, hi, count in (("train", bounds[0], bounds[1], samples[0]),
                                ("validation", bounds[1], bounds[2], samples[1])):
        first, last = int(round(lo * n_docs)), int(round(hi * n_docs))
        if last - first < 1:
            raise DataError(f"--split {split} leaves the {name} split of {prefix} without a document "
                            f"({n_docs} documents): give more data or a larger {name} share")
        tokens = int(np.sum(dataset.sequence_lengths[documents[first]:documents[last]], dtype=np.int64))
        epochs = -(-(count * seq_length + 1) // max(1, tokens))
        # numpy.mgrid's int64 (2, epochs, documents) grid, its int32 document index, and the
        # sample and shuffle indexes (megatron's _build_document_sample_shuffle_indices)
        check_fits(f"megatron's sample index of the {name} split of {prefix} ({count} samples of "
                   f"{seq_length} tokens: {epochs} passes over its {tokens} tokens)",
                   20 * epochs * (last - first) + 24 * count)


class _TokenizerForMegatron:
    """The attributes GPTDataset reads from a tokenizer."""

    def __init__(self, tokenizer):
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod
        self.unique_identifiers = {"class": "ratplus", "spec": tokenizer.spec}


def _gpt_datasets(prefixes: List[str], weights: Optional[List[float]], tokenizer, seq_length: int, seed: int,
                  split: str, num_train: int, num_valid: int, cache_dir: Optional[str]):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        tokenizer=_TokenizerForMegatron(tokenizer), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache_dir, mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train, num_valid, 0], lambda: True, config).build()
    if train is None or valid is None or len(train) == 0 or len(valid) == 0:
        raise DataError(f"--split {split} leaves an empty train or validation split")
    return train, valid


def build_datasets(data_path: Optional[List[str]], tokenizer, seq_length: int, seed: int, split: str,
                   num_train: int, num_valid: int, cache_dir: Optional[str] = None) -> Tuple:
    """(train, valid) datasets: the embedded corpus when ``data_path`` is empty, else indexed data
    (a list of prefixes, or a weighted blend ``[w1, prefix1, w2, prefix2, ...]``)."""
    if not data_path:
        train_tokens, valid_tokens = embedded_splits(tokenizer)
        return TokenWindows(train_tokens, seq_length), TokenWindows(valid_tokens, seq_length)
    prefixes, weights = parse_blend(list(data_path))
    check_split(split)
    records = []
    for i, prefix in enumerate(prefixes):
        if check_indexed_dataset(prefix, tokenizer.vocab_size, records) < seq_length + 1:
            raise DataError(f"{prefix} has fewer tokens than one sample of --seq-length {seq_length} + 1")
        # the samples megatron asks of this prefix: all of them alone, one pass each in an
        # unweighted blend, a weight's share (plus megatron's 0.5% surplus) in a weighted one
        share = 1.0 if len(prefixes) == 1 else 0.0 if weights is None else 1.005 * weights[i] / sum(weights)
        check_split_documents(prefix, split, seq_length,
                              (math.ceil(share * num_train) + 1, math.ceil(share * num_valid) + 1))
    for record in records:
        record()
    return _gpt_datasets(prefixes, weights, tokenizer, seq_length, seed, split, num_train, num_valid, cache_dir)


def validation_windows(tokenizer, seq_length: int, count: int, data_path: Optional[List[str]] = None,
                       seed: int = DEFAULT_SEED, split: str = DEFAULT_SPLIT) -> torch.Tensor:
    """The first ``count`` validation samples as [n, seq_length + 1] token windows (inputs + last label)."""
    _, valid = build_datasets(data_path, tokenizer, seq_length, seed, split, 1, count)
    n = min(count, len(valid))
    if n == 0:
        raise DataError("the validation split holds no complete sample")
    samples = [valid[i] for i in range(n)]
    return torch.stack([torch.cat([s["tokens"], s["labels"][-1:]]) for s in samples])
