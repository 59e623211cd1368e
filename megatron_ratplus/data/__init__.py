"""Data: tokenizers, the embedded default corpus, and megatron indexed datasets."""

from megatron_ratplus.data.datasets import validation_windows

__all__ = ["validation_windows"]
