"""Sparse-cache generation for RAT+ models (prefill, step decode, sampling).

Python API::

    from megatron_ratplus.inference import SamplingConfig, generate
    out = generate(model, [[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=16), pattern="dilated:16")
    out.tokens  # new tokens per prompt
"""

from megatron_ratplus.inference.cache import CacheFullError, LayerCache, PatternKV, cache_bytes
from megatron_ratplus.inference.generate import Generation, GenerationError, SamplingConfig, generate, sample
from megatron_ratplus.inference.session import DecodeSession

__all__ = ["CacheFullError", "DecodeSession", "Generation", "GenerationError", "LayerCache", "PatternKV",
           "SamplingConfig", "cache_bytes", "generate", "sample"]
