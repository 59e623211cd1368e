"""The RAT+ authors' checkpoints (torch files) <-> our full state dict (docs/DESIGN.md §1 layout).

Their file is ``{"task": state_dict, "config": EasyDict(...), ...}``. Their in_proj stacks row
blocks [o; q; k; v; g] with heads contiguous inside each block; our W_in groups rows per head
([o q k v g] of head 0, then head 1, ...) so that tensor-parallel ranks hold whole heads.
Older files differ in three ways, all read here: the gate rows in a separate ``fgate_proj``,
``_orig_mod.`` prefixes (torch.compile), and the attention-only baseline (``apply_re=False``,
in_proj without gate rows). Any other tensor (e.g. the RAT layer's, or biases) is refused by name.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from megatron_ratplus.convert import ConversionError, check_tensors, rename
from megatron_ratplus.errors import first_line

_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")
_HEAD_KEYS = ("num_heads", "n_heads", "n_head", "num_attention_heads", "nhead")
_LENGTH_KEYS = ("seq_len", "seq_length", "max_seq_len", "block_size", "context_length")
# their name -> ours, per layer (in_proj is permuted, not just renamed)
_LAYER_NAMES = {"seq_layer.input_norm.weight": "input_layernorm.weight",
                "seq_layer.in_proj.weight": "self_attention.linear_in.weight",
                "seq_layer.out_proj.weight": "self_attention.linear_out.weight",
                "hidden_layer.ln.weight": "pre_mlp_layernorm.weight",
                "hidden_layer.fc1.weight": "mlp.linear_fc1.weight",
                "hidden_layer.fc2.weight": "mlp.linear_fc2.weight"}


class EasyDict:
    """Stand-in for ``easydict.EasyDict``, the dict subclass the authors' trainer pickles its config as.

    Registered with torch's weights-only unpickler under that name (see :func:`load_authors`), so
    their files load without unpickling arbitrary code and without the easydict package. That
    unpickler fills only plain dicts and OrderedDicts (their items, and an OrderedDict's attributes,
    which EasyDict mirrors), so creating one makes an OrderedDict.
    """

    def __new__(cls, *args, **kwargs):
        return OrderedDict(*args, **kwargs)


def load_authors(path: str, trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors of the 'task' state dict with '_orig_mod.' removed, config dict or {}).

    Loads with ``weights_only`` plus exactly the authors' config class; ``trust_pickle`` allows
    full unpickling (it can run code from the file: only with the user's explicit consent).
    """
    try:
        with torch.serialization.safe_globals([(EasyDict, "easydict.EasyDict")]):
            blob = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise ConversionError(f"checkpoint file not found: {path}") from None
    except IsADirectoryError:
        raise ConversionError(f"{path} is a directory, not an authors' checkpoint file (use --from ours or hf)") from None
    except Exception as err:  # torch reports unpickling problems as many error types
        if not trust_pickle and "weights_only" in str(err):
            raise ConversionError(f"{path} holds more than tensors and the authors' config; refusing to unpickle "
                                  f"it (pass --trust-pickle only for files you trust)") from None
        raise ConversionError(f"cannot read {path} as a torch checkpoint: {first_line(err)}") from None
    state = blob.get("task", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not any(str(k).replace("_orig_mod.", "") == "embedding.wte.weight"
                                              and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConversionError(f"{path} is not an authors' RAT+ checkpoint (no 'task' state dict with embedding.wte.weight)")
    tensors = {k.replace("_orig_mod.", ""): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    config = blob.get("config") if isinstance(blob.get("config"), dict) else {}
    return tensors, config


def _find(config: dict, names) -> Optional[object]:
    """The first value under one of ``names`` in a nested config dict (their configs nest sections)."""
    for key, value in config.items():
        if key in names:
            return value
    for value in config.values():
        if isinstance(value, dict):
            found = _find(value, names)
            if found is not None:
                return found
    return None


def _count(value) -> Optional[int]:
    """A positive integer of their config, else None (``num_heads: true`` is no head count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def config_heads(config: dict) -> Optional[int]:
    return _count(_find(config, _HEAD_KEYS))


def config_seq_length(config: dict) -> Optional[int]:
    return _count(_find(config, _LENGTH_KEYS))


def interleave_heads(weight: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """[parts*d, d] in block layout (part-major) -> per-head layout (head-major)."""
    d_in = weight.shape[1]
    head_dim = weight.shape[0] // (parts * heads)
    return weight.view(parts, heads, head_dim, d_in).transpose(0, 1).reshape(parts * heads * head_dim, d_in)


def block_heads(weight: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """The inverse of :func:`interleave_heads`: per-head layout -> block layout."""
    d_in = weight.shape[1]
    head_dim = weight.shape[0] // (parts * heads)
    return weight.view(heads, parts, head_dim, d_in).transpose(0, 1).reshape(parts * heads * head_dim, d_in)


def authors_shape(state: Dict[str, torch.Tensor], config: dict) -> dict:
    """Our model shape (checkpoint.MODEL_KEYS but vocabulary and sequence length) from their tensors."""
    layers = [int(m.group(1)) for k in state for m in [_LAYER.match(k)] if m]
    if not layers:
        raise ConversionError("the authors' checkpoint has no backbone.layers.* tensors")
    first = "backbone.layers.0.seq_layer."
    if first + "in_proj.weight" not in state or "backbone.layers.0.hidden_layer.fc1.weight" not in state:
        raise ConversionError(f"missing tensors {first}in_proj.weight or backbone.layers.0.hidden_layer.fc1.weight "
                              f"(not a RAT+ layer)")
    # the shape is read off these tensors, so they are checked here; check_tensors checks the rest against it
    for name in ("embedding.wte.weight", first + "in_proj.weight", first + "fgate_proj.weight",
                 "backbone.layers.0.hidden_layer.fc1.weight"):
        if name in state and (state[name].dim() != 2 or 0 in state[name].shape):
            raise ConversionError(f"{name} has shape {tuple(state[name].shape)}; a weight matrix of a RAT+ model "
                                  "is 2-D and not empty")
    vocab, hidden = state["embedding.wte.weight"].shape
    rows = state[first + "in_proj.weight"].shape[0] + (
        state[first + "fgate_proj.weight"].shape[0] if first + "fgate_proj.weight" in state else 0)
    apply_re = _find(config, ("apply_re",))
    recurrence = bool(apply_re) if apply_re is not None else rows == 5 * hidden
    return {"num_layers": 1 + max(layers), "hidden_size": hidden, "vocab": vocab, "recurrence": recurrence,
            "ffn_hidden_size": state["backbone.layers.0.hidden_layer.fc1.weight"].shape[0]}


def _expected(shape: dict, old_gate: bool) -> Dict[str, Tuple[int, ...]]:
    d, ffn, parts = shape["hidden_size"], shape["ffn_hidden_size"], 5 if shape["recurrence"] else 4
    expected = {"embedding.wte.weight": (shape["vocab"], d), "backbone.ln.weight": (d,),
                "head.lm_head.weight": (shape["vocab"], d)}
    for i in range(shape["num_layers"]):
        p = f"backbone.layers.{i}."
        expected.update({p + "seq_layer.input_norm.weight": (d,),
                         p + "seq_layer.in_proj.weight": ((parts - old_gate) * d, d),
                         p + "seq_layer.out_proj.weight": (d, d), p + "hidden_layer.ln.weight": (d,),
                         p + "hidden_layer.fc1.weight": (ffn, d), p + "hidden_layer.fc2.weight": (d, ffn)})
        if old_gate:
            expected[p + "seq_layer.fgate_proj.weight"] = (d, d)
    return expected


def authors_to_local(state: Dict[str, torch.Tensor], shape: dict, heads: int, padded_vocab: int,
                     source: str) -> Dict[str, torch.Tensor]:
    """Our full state dict from their tensors; every tensor must be used and shaped as expected."""
    d, parts = shape["hidden_size"], 5 if shape["recurrence"] else 4
    if d % heads:
        raise ConversionError(f"hidden size {d} is not divisible by {heads} attention heads")
    state = dict(state)
    state.setdefault("head.lm_head.weight", state["embedding.wte.weight"])  # older files store it once
    old_gate = shape["recurrence"] and "backbone.layers.0.seq_layer.fgate_proj.weight" in state
    check_tensors(state, _expected(shape, old_gate), source)
    wte = state["embedding.wte.weight"]
    if not torch.equal(state["head.lm_head.weight"], wte):
        raise ConversionError(f"{source}: head.lm_head.weight differs from embedding.wte.weight; only tied heads convert")
    out = {"embedding.word_embeddings.weight": torch.cat([wte, wte.new_zeros(padded_vocab - len(wte), d)]),
           "decoder.final_layernorm.weight": state["backbone.ln.weight"]}
    for i in range(shape["num_layers"]):
        src, dst = f"backbone.layers.{i}.", f"decoder.layers.{i}."
        layer = {k[len(src):]: v for k, v in state.items() if k.startswith(src)}
        if old_gate:
            layer["seq_layer.in_proj.weight"] = torch.cat([layer["seq_layer.in_proj.weight"],
                                                           layer.pop("seq_layer.fgate_proj.weight")])
        layer["seq_layer.in_proj.weight"] = interleave_heads(layer["seq_layer.in_proj.weight"], parts, heads)
        out.update({dst + k: v for k, v in rename(layer, _LAYER_NAMES).items()})
    return out


def local_to_authors(state: Dict[str, torch.Tensor], config, vocab: int) -> dict:
    """Their file contents from our full state dict (current layout: gate rows inside in_proj).

    ``vocab``: rows of their embedding (our padding beyond it is dropt).
    """
    ours = {v: k for k, v in _LAYER_NAMES.items()}
    wte = state["embedding.word_embeddings.weight"][:vocab].clone()
    task = {"embedding.wte.weight": wte, "backbone.ln.weight": state["decoder.final_layernorm.weight"]}
    for i in range(config.num_layers):
        src, dst = f"decoder.layers.{i}.", f"backbone.layers.{i}."
        layer = {k[len(src):]: v for k, v in state.items() if k.startswith(src)}
        layer["self_attention.linear_in.weight"] = block_heads(
            layer["self_attention.linear_in.weight"], config.mixer_parts, config.num_attention_heads)
        task.update({dst + k: v for k, v in rename(layer, ours).items()})
    task["head.lm_head.weight"] = wte
    # seq_len (a key their configs use) makes ours -> authors -> ours keep the trained length
    meta = {"num_heads": config.num_attention_heads, "apply_re": config.recurrence, "vocab_size": vocab,
            "seq_len": config.seq_length}
    return {"task": task, "config": meta}
