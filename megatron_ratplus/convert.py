"""Conversion of the RAT+ authors' checkpoints (DESIGN §1 layout) into megatron-ratplus ones.

The authors' in_proj stacks row blocks [o; q; k; v; g] with heads contiguous inside each block;
our W_in groups rows per head ([o q k v g] of head 0, then head 1, ...) so that tensor-parallel
ranks hold whole heads. Older checkpoints keep the gate rows in a separate fgate_proj.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from megatron_ratplus.checkpoint import CheckpointError

_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


def load_authors_state(path: str, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The 'task' state dict of an authors' checkpoint, '_orig_mod.' prefixes removed.

    Loads with ``weights_only`` unless ``trust_pickle``: a pickle can run code, so full
    unpickling needs the user's explicit consent.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as err:
        if not trust_pickle and "weights_only" in str(err):
            raise CheckpointError(f"{path} holds more than tensors; refusing to unpickle it "
                                  f"(pass --trust-pickle only for files you trust)") from None
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    state = blob.get("task", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or "embedding.wte.weight" not in {k.replace("_orig_mod.", "") for k in state}:
        raise CheckpointError(f"{path} is not an authors' RAT+ checkpoint (no 'task' state dict with embedding.wte.weight)")
    return {k.replace("_orig_mod.", ""): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def interleave_heads(weight: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """[parts*d, d] in block layout (part-major) -> per-head layout (head-major)."""
    d_in = weight.shape[1]
    head_dim = weight.shape[0] // (parts * heads)
    return weight.view(parts, heads, head_dim, d_in).transpose(0, 1).reshape(parts * heads * head_dim, d_in)


def authors_shape(state: Dict[str, torch.Tensor]) -> Tuple[int, int, int, bool]:
    """(num_layers, hidden_size, vocab_size, recurrence) read off the tensors."""
    vocab, hidden = state["embedding.wte.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state for m in [_LAYER.match(k)] if m)
    in_rows = state["backbone.layers.0.seq_layer.in_proj.weight"].shape[0]
    recurrence = in_rows == 5 * hidden or "backbone.layers.0.seq_layer.fgate_proj.weight" in state
    return layers, hidden, vocab, recurrence


def to_megatron(state: Dict[str, torch.Tensor], heads: int, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """Our GPTModel state dict (TP = 1) from the authors' tensors; every source tensor must be used
    (a tensor left over means a layout this converter does not know, so it refuses)."""
    layers, hidden, vocab, recurrence = authors_shape(state)
    if hidden % heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by --num-attention-heads {heads}")
    used = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"the checkpoint has no {key}")
        used.add(key)
        return state[key]

    parts = 5 if recurrence else 4
    wte = take("embedding.wte.weight")
    if "head.lm_head.weight" in state and not torch.equal(take("head.lm_head.weight"), wte):
        raise CheckpointError("head.lm_head.weight differs from embedding.wte.weight; only tied heads convert")
    out = {"embedding.word_embeddings.weight": torch.cat([wte, wte.new_zeros(padded_vocab - vocab, hidden)]),
           "decoder.final_layernorm.weight": take("backbone.ln.weight")}
    for i in range(layers):
        src, dst = f"backbone.layers.{i}.", f"decoder.layers.{i}."
        w_in = take(src + "seq_layer.in_proj.weight")
        if src + "seq_layer.fgate_proj.weight" in state:
            w_in = torch.cat([w_in, take(src + "seq_layer.fgate_proj.weight")])
        if w_in.shape != (parts * hidden, hidden):
            raise CheckpointError(f"layer {i}: in_proj has shape {tuple(w_in.shape)}, expected {(parts * hidden, hidden)}")
        out[dst + "input_layernorm.weight"] = take(src + "seq_layer.input_norm.weight")
        out[dst + "self_attention.linear_in.weight"] = interleave_heads(w_in, parts, heads)
        out[dst + "self_attention.linear_out.weight"] = take(src + "seq_layer.out_proj.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "hidden_layer.ln.weight")
        out[dst + "mlp.linear_fc1.weight"] = take(src + "hidden_layer.fc1.weight")
        out[dst + "mlp.linear_fc2.weight"] = take(src + "hidden_layer.fc2.weight")
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointError(f"the checkpoint has tensors this converter does not map: {unused[0]} "
                              f"({len(unused)} in all)")
    return out
