"""Training and validation datasets with one sample format and a deterministic order.

A sample is megatron's GPT sample dict: ``tokens`` and ``labels`` ([seq], labels shifted by
one), ``loss_mask`` and ``position_ids``. Two sources produce it:

- the embedded corpus (an in-memory token stream cut into windows), and
- megatron indexed datasets (``.bin``/``.idx``) through megatron-core's ``GPTDataset``,
  validated up front because GPTDataset loops forever on an empty split and reads corrupt
  files silently.

``SampleOrder`` maps the count of consumed samples to a dataset index, so the data position is
one integer in the checkpoint and resuming reproduces the exact batches; ``BatchSource`` cuts
a global batch into one data-parallel rank's micro-batches (``collate``d) by that count.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_ratplus.data.corpus import embedded_splits
from megatron_ratplus.data.tokenizer import DataError

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


def check_indexed_dataset(prefix: str, vocab_size: int) -> int:
    """Validate ``prefix.bin``/``prefix.idx``; returns the token count. One-line DataError otherwise."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        path = prefix + ext
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        if not os.access(path, os.R_OK):
            raise DataError(f"data file not readable: {path}")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        sizes = dataset.sequence_lengths
        dtype = dataset.index.dtype
    except Exception as err:  # megatron raises assertions/ValueErrors of many kinds on bad indexes
        raise DataError(f"corrupt index {prefix}.idx: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    n_tokens = int(np.sum(sizes, dtype=np.int64))
    expected = n_tokens * np.dtype(dtype).itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"{prefix}.bin has {actual} bytes but its index describes {expected}: truncated or corrupt")
    if n_tokens == 0:
        raise DataError(f"{prefix} holds no tokens")
    top = int(np.memmap(prefix + ".bin", dtype=dtype, mode="r").max())
    if top >= vocab_size:
        raise DataError(f"{prefix}.bin holds token id {top}, beyond the vocabulary size {vocab_size}")
    return n_tokens


class _TokenizerForMegatron:
    """The attributes GPTDataset reads from a tokenizer."""

    def __init__(self, tokenizer):
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod
        self.unique_identifiers = {"class": "ratplus", "spec": tokenizer.spec}


def _gpt_datasets(prefixes: List[str], tokenizer, seq_length: int, seed: int, split: str,
                  num_train: int, num_valid: int, cache_dir: Optional[str]):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, None), split=split,
        tokenizer=_TokenizerForMegatron(tokenizer), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache_dir, mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train, num_valid, 0], lambda: True, config).build()
    if train is None or valid is None or len(train) == 0 or len(valid) == 0:
        raise DataError(f"--split {split} leaves an empty train or validation split")
    return train, valid


def build_datasets(data_path: Optional[List[str]], tokenizer, seq_length: int, seed: int, split: str,
                   num_train: int, num_valid: int, cache_dir: Optional[str] = None) -> Tuple:
    """(train, valid) datasets: the embedded corpus when ``data_path`` is empty, else indexed data."""
    if not data_path:
        train_tokens, valid_tokens = embedded_splits(tokenizer)
        return TokenWindows(train_tokens, seq_length), TokenWindows(valid_tokens, seq_length)
    for prefix in data_path:
        if check_indexed_dataset(prefix, tokenizer.vocab_size) < seq_length + 1:
            raise DataError(f"{prefix} has fewer tokens than one sample of --seq-length {seq_length} + 1")
    return _gpt_datasets(list(data_path), tokenizer, seq_length, seed, split, num_train, num_valid, cache_dir)


def validation_windows(tokenizer, seq_length: int, count: int, data_path: Optional[List[str]] = None,
                       seed: int = DEFAULT_SEED, split: str = DEFAULT_SPLIT) -> torch.Tensor:
    """The first ``count`` validation samples as [n, seq_length + 1] token windows (inputs + last label)."""
    _, valid = build_datasets(data_path, tokenizer, seq_length, seed, split, 1, count)
    n = min(count, len(valid))
    if n == 0:
        raise DataError("the validation split holds no complete sample")
    samples = [valid[i] for i in range(n)]
    return torch.stack([torch.cat([s["tokens"], s["labels"][-1:]]) for s in samples])
