"""Model builder: megatron-core's GPTModel with the RAT+ layer spec.

The model knows nothing about launch, parallel set-up or logging: megatron's parallel_state
must already be initialised (see megatron_ratplus.distributed) when build_model is called.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from megatron.core.models.gpt import GPTModel

from megatron_ratplus.config import RATPlusConfig
from megatron_ratplus.layers.mixer import set_attention_pattern
from megatron_ratplus.layers.specs import TransformerImplError, get_ratplus_block_spec, resolve_transformer_impl
from megatron_ratplus.precision import check_fp8_shapes

__all__ = ["build_model", "set_attention_pattern", "evaluating", "count_parameters"]


def build_model(config: RATPlusConfig, transformer_impl: Optional[str] = None, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None) -> GPTModel:
    """A GPTModel whose self-attention slots hold RAT+ mixers (tied embeddings, RoPE).

    ``transformer_impl``: ``local``, ``transformer_engine``, or None for the default
    (layers.specs.resolve_transformer_impl). FP8 (``config.fp8``) needs Transformer Engine.
    """
    impl = resolve_transformer_impl(transformer_impl)
    if config.fp8:
        if impl != "transformer_engine":
            raise TransformerImplError("FP8 needs --transformer-impl transformer_engine")
        check_fp8_shapes(config)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_ratplus_block_spec(config, impl, vp_stage),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
    )


@contextlib.contextmanager
def evaluating(model_chunks, pattern=None):
    """The model (or its pipeline chunks) in eval mode, at ``pattern`` when one is given, inside
    the block; each chunk's train/eval mode is restored after it (the pattern stays)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        if pattern is not None:
            set_attention_pattern(chunk, pattern)
        chunk.eval()
    try:
        yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def count_parameters(config: RATPlusConfig) -> int:
    """Parameters of the full (unsharded) model with tied embeddings, from the shapes alone."""
    d, layers = config.hidden_size, config.num_layers
    mixer = config.mixer_parts * d * d + d * d
    mlp = 2 * d * config.ffn_hidden_size
    return config.vocab_size * d + layers * (mixer + mlp + 2 * d) + d
