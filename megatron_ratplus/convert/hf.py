"""Our checkpoints <-> Hugging Face directories (``transformers`` with ``trust_remote_code=True``).

An exported directory holds config.json, model.safetensors (or shards plus
model.safetensors.index.json above ``max_shard_bytes``), tokenizer.json + tokenizer_config.json
(the checkpoint's tokenizer file, or our byte tokenizer written in `tokenizers`' format), and modeling_ratplus.py + configuration_ratplus.py copied from
megatron_ratplus/hf/ (pure torch: the directory needs no megatron to run). Tensors keep their
values and layout (W_in per head, the padded embedding rows); only names change.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Tuple

import torch

from megatron_ratplus.convert import ConversionError, check_tensors, fresh_output, rename
from megatron_ratplus.errors import first_line
from megatron_ratplus.userfiles import read_json, typed_fields

MODELING_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
CODE_FILES = ("configuration_ratplus.py", "modeling_ratplus.py")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
BYTE_EOD = "<|endoftext|>"
_GLOBAL_NAMES = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
                 "decoder.final_layernorm.weight": "model.norm.weight"}
_LAYER_NAMES = {"input_layernorm.weight": "input_norm.weight",
                "self_attention.linear_in.weight": "mixer.in_proj.weight",
                "self_attention.linear_out.weight": "mixer.out_proj.weight",
                "pre_mlp_layernorm.weight": "mlp_norm.weight",
                "mlp.linear_fc1.weight": "mlp.fc1.weight",
                "mlp.linear_fc2.weight": "mlp.fc2.weight"}
# our shape keys (checkpoint.MODEL_KEYS) -> config.json keys
_CONFIG_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size",
                "seq_length": "max_position_embeddings", "vocab_size": "vocab_size",
                "real_vocab_size": "real_vocab_size", "recurrence": "recurrence"}


def local_to_hf_names(num_layers: int) -> Dict[str, str]:
    names = dict(_GLOBAL_NAMES)
    for i in range(num_layers):
        names.update({f"decoder.layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _LAYER_NAMES.items()})
    return names


def hf_config(config, tokenizer, pattern: str) -> dict:
    return {"model_type": "ratplus", "architectures": ["RATPlusForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_ratplus.RATPlusConfig",
                         "AutoModel": "modeling_ratplus.RATPlusModel",
                         "AutoModelForCausalLM": "modeling_ratplus.RATPlusForCausalLM"},
            **{hf: getattr(config, ours) for ours, hf in _CONFIG_KEYS.items()},
            "attention_pattern": pattern, "rope_theta": float(config.rotary_base),
            "rms_norm_eps": config.layernorm_epsilon, "initializer_range": config.init_method_std,
            "tie_word_embeddings": True, "eos_token_id": tokenizer.eod, "dtype": "float32",
            "byte_tokenizer": tokenizer.spec == "byte"}  # read back by read_hf


def _shards(state: Dict[str, torch.Tensor], max_bytes: int):
    """Greedy split of ``state`` (in name order) into groups of at most ``max_bytes`` (one tensor at least)."""
    groups, size = [[]], 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_safetensors(state: Dict[str, torch.Tensor], directory: str, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
    groups = _shards(state, max_shard_bytes)
    if len(groups) == 1:
        save_file(state, os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in names}, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def read_safetensors(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(directory, INDEX_FILE)):
        path = os.path.join(directory, INDEX_FILE)
        weight_map = read_json(path, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and os.path.basename(v) == v
                                                       for v in weight_map.values()):
            raise ConversionError(f"shard index {path}: weight_map must map tensor names to file names in {directory}")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise ConversionError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")
    state = {}
    for file in files:
        try:
            state.update(load_file(os.path.join(directory, file)))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ConversionError(f"cannot read {os.path.join(directory, file)}: {first_line(err)}") from None
    return state


def _byte_tokenizer(path: str) -> None:
    """tokenizer.json of our byte tokenizer (id b = byte b, 256 = <|endoftext|>) in `tokenizers`'
    byte-level format, which spells byte b as GPT-2's printable character for it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(others)): b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOD, special=True)])
    tok.save(path)


def _write_tokenizer(tokenizer, directory: str, max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    path = os.path.join(directory, "tokenizer.json")
    if getattr(tokenizer, "path", None):
        shutil.copyfile(tokenizer.path, path)
        eos = tokenizer._tok.id_to_token(tokenizer.eod)
    else:
        _byte_tokenizer(path)
        eos = BYTE_EOD
    # The model takes no token_type_ids: without this list transformers 4.x's tokenizer returns
    # them and generate(**tokenizer(text, return_tensors="pt")) fails on the unknown argument.
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                "model_input_names": ["input_ids", "attention_mask"]}
    if eos is not None:
        settings["eos_token"] = settings["pad_token"] = eos  # batched generation pads with end-of-document
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    if eos is not None:
        with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.eod}, f, indent=2)


def export_hf(state, config, tokenizer, output: str, max_shard_bytes: int = 5 * 2 ** 30) -> str:
    """Write the HF directory ``output`` from our full state dict; returns ``output``."""
    from megatron_ratplus.patterns import parse_composition

    composition = parse_composition(config.attention_pattern)
    heads = composition.resolve(config.num_layers, config.num_attention_heads)
    if any(p.kind == "topk" for layer in heads for p in layer):  # modeling_ratplus.py implements the others
        raise ConversionError(f"pattern '{composition}': the exported model does not implement top-k patterns")
    pattern = str(composition)
    with fresh_output(output) as tmp:
        write_safetensors(rename(state, local_to_hf_names(config.num_layers)), tmp, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config(config, tokenizer, pattern), f, indent=2)
        for name in CODE_FILES:
            shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(tmp, name))
        _write_tokenizer(tokenizer, tmp, config.seq_length)
    return output


def read_hf(directory: str) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """(our full state dict, our model shape, tokenizer file or None for the byte tokenizer) from an
    HF directory we exported."""
    from megatron_ratplus.checkpoint import check_model_shape
    from megatron_ratplus.convert.local import expected_shapes, model_config
    from megatron_ratplus.data.tokenizer import build_tokenizer
    from megatron_ratplus.estimate import check_weights_fit

    if not os.path.isdir(directory):
        raise ConversionError(f"{directory} is not a directory (an HF export holds config.json and safetensors)")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory} has no config.json; not a Hugging Face model directory")
    hf = read_json(path, "Hugging Face config")
    if hf.get("model_type") != "ratplus":
        raise ConversionError(f"{path}: model_type is {hf.get('model_type')!r}, not 'ratplus' (only RAT+ exports convert)")
    missing = [k for k in _CONFIG_KEYS.values() if k not in hf]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)}")
    typed_fields(hf, {"attention_pattern": str}, path)
    shape = {ours: hf[key] for ours, key in _CONFIG_KEYS.items()}
    check_model_shape(shape, path, names=_CONFIG_KEYS)
    shape["attention_pattern"] = hf.get("attention_pattern", "dense")
    try:
        config = model_config(shape)
    except ValueError as err:
        raise ConversionError(f"{path}: {first_line(err)}") from None
    check_weights_fit(config)  # before naming and reading every layer's tensors
    hf_names = local_to_hf_names(config.num_layers)
    tensors = read_safetensors(directory)
    check_tensors(tensors, {hf_names[k]: s for k, s in expected_shapes(config).items()}, directory)
    tokenizer = os.path.join(directory, "tokenizer.json")
    tokenizer = tokenizer if os.path.isfile(tokenizer) and not hf.get("byte_tokenizer") else None
    # a tokenizer file that does not load is refused, not carried along
    check_model_shape(shape, path, build_tokenizer(f"json:{tokenizer}" if tokenizer else "byte"),
                      names=_CONFIG_KEYS)
    return rename(tensors, {v: k for k, v in hf_names.items()}), shape, tokenizer
