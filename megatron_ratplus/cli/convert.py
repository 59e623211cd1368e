"""ratplus-convert: an authors' RAT+ checkpoint (torch pickle) -> a megatron-ratplus checkpoint.

    ratplus-convert --input rat_1.5b.pt --output checkpoints/ratplus-1.5b --tokenizer-file tokenizer.json

The result loads with ratplus-eval / ratplus-generate and continues with
ratplus-pretrain --adapt-pattern ... --load OUTPUT (model weights only; no optimizer state).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ratplus.checkpoint import CheckpointError
from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.datasets import DEFAULT_SEED, DEFAULT_SPLIT
from megatron_ratplus.errors import ArgumentParser, UserError


def build_parser():
    p = ArgumentParser(prog="ratplus-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the authors' checkpoint file")
    p.add_argument("--output", required=True, help="new save directory (must not hold a checkpoint)")
    p.add_argument("--num-attention-heads", type=int, help="default: hidden size / 128 (every paper model)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--tokenizer-file", help="HF tokenizer.json of the model (default: byte-level)")
    p.add_argument("--pretrain-lr", type=float, default=8e-4, help="recorded so --adapt-pattern uses 0.1x of it")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling (runs code from the file: only for files you trust)")
    return p


def convert(args) -> str:
    from megatron_ratplus import checkpoint, distributed
    from megatron_ratplus.config import model_config
    from megatron_ratplus.convert import authors_shape, load_authors_state, to_megatron
    from megatron_ratplus.data.tokenizer import build_tokenizer, padded_vocab_size
    from megatron_ratplus.model import build_model

    if os.path.isdir(args.output) and checkpoint.latest_checkpoint(args.output):
        raise UserError(f"{args.output} already holds a checkpoint; refusing to overwrite it")
    state = load_authors_state(args.input, args.trust_pickle)
    layers, hidden, vocab, recurrence = authors_shape(state)
    tokenizer = build_tokenizer(args.tokenizer_file or "byte")
    if tokenizer.vocab_size > vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint only {vocab} "
                        f"embeddings (pass the model's --tokenizer-file)")
    heads = args.num_attention_heads or max(1, hidden // 128)
    padded = padded_vocab_size(vocab)
    weights = to_megatron(state, heads, padded)
    distributed.initialize()
    config = model_config(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          ffn_hidden_size=state["backbone.layers.0.hidden_layer.fc1.weight"].shape[0],
                          seq_length=args.seq_length, vocab_size=padded, recurrence=recurrence)
    model = build_model(config)
    needed = model.state_dict()
    for key, value in weights.items():
        if key in needed and needed[key].shape != value.shape:
            raise CheckpointError(f"{key} would get shape {tuple(value.shape)}, the model needs {tuple(needed[key].shape)}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta = {"model": checkpoint.model_meta(config), "tokenizer": tokenizer.spec,
            "args": {"lr": args.pretrain_lr, "seed": DEFAULT_SEED, "split": DEFAULT_SPLIT, "data_path": None,
                     "converted_from": os.path.abspath(args.input)}}
    common = {"iteration": 0, "consumed_samples": 0, "nan_skipped": 0}
    return checkpoint.save(args.output, 0, [model], None, common, meta)


def main(argv=None) -> int:
    def run():
        path = convert(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))
        print(f"wrote {path}")

    return run_cli("ratplus-convert", run)


if __name__ == "__main__":
    sys.exit(main())
