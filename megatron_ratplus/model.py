"""Model builder: megatron-core's GPTModel with the RAT+ layer spec.

The model knows nothing about launch, parallel set-up or logging: megatron's parallel_state
must already be initialised (see megatron_ratplus.distributed) when build_model is called.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_ratplus.config import RATPlusConfig
from megatron_ratplus.estimate import Layout, check_weights_fit
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
    layout = Layout(parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size())
    check_weights_fit(config, layout, torch.cuda.current_device() if torch.cuda.is_available() else None)
    if config.fp8:
        if impl != "transformer_engine":
            raise TransformerImplError("FP8 needs --transformer-impl transformer_engine")
        check_fp8_shapes(config)
    model = GPTModel(
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
    if post_process and config.real_vocab_size is not None and config.real_vocab_size < config.vocab_size:
        model.output_layer.register_forward_hook(_mask_padded_vocab(config.real_vocab_size))
    return model


def _mask_padded_vocab(real_vocab_size: int):
    """Output-layer hook: logits of padded vocabulary ids become -inf, so no loss, evaluation or
    sampler ever scores or picks them. GPTModel has no hook of its own between the output layer
    and the loss; the logits are [s, b, vocab / tp] (this rank's columns) or gathered [s, b, vocab]."""
    def hook(layer, inputs, output):
        logits, bias = output
        first = 0 if logits.shape[-1] == layer.output_size else layer.tp_group.rank() * logits.shape[-1]
        ids = torch.arange(first, first + logits.shape[-1], device=logits.device)
        return logits.masked_fill(ids >= real_vocab_size, float("-inf")), bias

    return hook


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
