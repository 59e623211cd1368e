"""Data: tokenizers, the embedded default corpus, and megatron indexed datasets."""
