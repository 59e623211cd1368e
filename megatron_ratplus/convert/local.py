"""Our checkpoints as full (unsharded, TP = PP = 1) state dicts in the local spec's key names."""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.convert import check_tensors, fresh_output
from megatron_ratplus.data.datasets import DEFAULT_SEED, DEFAULT_SPLIT

LAYER = "decoder.layers.{}."


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor of the full model (tied output layer: the embedding only)."""
    d, ffn = config.hidden_size, config.ffn_hidden_size
    width = config.kv_channels * config.num_attention_heads
    shapes = {"embedding.word_embeddings.weight": (config.vocab_size, d), "decoder.final_layernorm.weight": (d,)}
    for i in range(config.num_layers):
        p = LAYER.format(i)
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "self_attention.linear_in.weight": (config.mixer_parts * width, d),
                       p + "self_attention.linear_out.weight": (d, width),
                       p + "pre_mlp_layernorm.weight": (d,),
                       p + "mlp.linear_fc1.weight": (ffn, d),
                       p + "mlp.linear_fc2.weight": (d, ffn)})
    return shapes


def read_local(path: str):
    """(full state dict, config, tokenizer, meta) of our checkpoint at ``path``."""
    meta = checkpoint.read_meta(path)
    model, config, tokenizer = checkpoint.load_model(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not k.endswith("_extra_state") and v is not None}
    return state, config, tokenizer, meta


def model_config(shape: dict):
    """A RATPlusConfig from the recorded model shape (checkpoint.MODEL_KEYS)."""
    from megatron_ratplus.config import model_config

    return model_config(**shape)


def load_full_state(model, state: Dict[str, torch.Tensor]) -> None:
    """Put a full (one-rank, local names) state dict into a built model, every tensor accounted for."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:  # expected_shapes and the model disagree: a bug, not a user error
        raise RuntimeError(f"model and converter disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")


def write_local(state: Dict[str, torch.Tensor], shape: dict, tokenizer_spec: str, output: str, source: dict,
                lr: float = 8e-4, tokenizer_file: Optional[str] = None) -> str:
    """Write ``state`` (full, local names) as a new checkpoint directory ``output``; returns it.

    The result loads with ratplus-eval / ratplus-generate and continues with ratplus-pretrain
    --adapt-pattern (model weights only, no optimizer state; ``lr``: the pretraining LR it records).
    ``tokenizer_file`` is copied into ``output`` and becomes the checkpoint's tokenizer.
    """
    from megatron_ratplus import distributed
    from megatron_ratplus.model import build_model

    config = model_config(shape)
    check_tensors(state, expected_shapes(config), source.get("path", "source"))
    distributed.initialize()
    model = build_model(config)
    load_full_state(model, state)
    meta = {"model": checkpoint.model_meta(config), "tokenizer": tokenizer_spec, "source": source,
            "args": {"lr": lr, "seed": DEFAULT_SEED, "split": DEFAULT_SPLIT, "data_path": None}}
    common = {"iteration": 0, "consumed_samples": 0, "nan_skipped": 0}
    if tokenizer_file:
        meta["tokenizer"] = f"json:{os.path.join(os.path.abspath(output), 'tokenizer.json')}"
    with fresh_output(output) as tmp:
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        checkpoint.save(tmp, 0, [model], None, common, meta)
    return checkpoint.latest_checkpoint(output)
