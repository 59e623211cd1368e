"""ratplus-convert: move RAT+ checkpoints between the authors' files, ours, Hugging Face and layouts.

    ratplus-convert --input rat_1.5b.pt --output ckpt/ratplus-1.5b --tokenizer-file tokenizer.json
    ratplus-convert --input ckpt/ratplus-1.5b --output hf/ratplus-1.5b --to hf
    ratplus-convert --input hf/ratplus-1.5b --output ckpt/from-hf              (--from hf is detected)
    ratplus-convert --input ckpt/ratplus-1.5b --output rat_1.5b_back.pt --to authors
    ratplus-convert --input ckpt/ratplus-1.5b --output ckpt/tp4 --target-tensor-parallel-size 4
    ratplus-convert --input ckpt/ratplus-1.5b --output ratplus-1.5b.pt --to torch   (one consolidated file)

The source format is detected (a file: the authors'; a directory with config.json: Hugging
Face; else ours) unless --from says it. Our checkpoints written here hold model weights only:
they load with ratplus-eval / ratplus-generate and continue with ratplus-pretrain
--adapt-pattern ... --load OUTPUT. Nothing is written unless the whole conversion succeeds.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import byte_size, positive_float, positive_int
from megatron_ratplus.errors import ArgumentParser, UserError
from megatron_ratplus.userfiles import check_output_path

FORMATS = ("authors", "ours", "hf")
TARGETS = ("ours", "authors", "hf", "torch")


def build_parser():
    p = ArgumentParser(prog="ratplus-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="authors' file, our checkpoint directory, or an HF directory")
    p.add_argument("--output", required=True, help="new path (must not exist)")
    p.add_argument("--from", dest="source", choices=FORMATS, help="source format (default: detected)")
    p.add_argument("--to", dest="target", choices=TARGETS, default="ours",
                   help="ours (default), authors (their torch file), hf (Hugging Face directory), "
                        "torch (our weights consolidated in one file)")
    p.add_argument("--target-tensor-parallel-size", type=positive_int, default=1, help="ours -> ours: reshard to this TP")
    p.add_argument("--target-pipeline-parallel-size", type=positive_int, default=1, help="ours -> ours: reshard to this PP")
    a = p.add_argument_group("authors' files")
    a.add_argument("--num-attention-heads", type=positive_int,
                   help="default: the file's config (num_heads), else hidden size / 128 (head size 128)")
    a.add_argument("--seq-length", type=positive_int, help="default: the file's config (seq_len), else 4096")
    a.add_argument("--tokenizer-file", help="HF tokenizer.json of the model (default: byte-level)")
    a.add_argument("--pretrain-lr", type=positive_float, default=8e-4, help="recorded so --adapt-pattern uses 0.1x of it")
    a.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling (runs code from the file: only for files you trust)")
    h = p.add_argument_group("Hugging Face export")
    h.add_argument("--attention-pattern", help="the exported model's default pattern (default: the checkpoint's "
                   "adaptation pattern, else dense); any pattern can still be chosen at load time")
    h.add_argument("--max-shard-size", type=byte_size, default=5 * 1024 ** 3, help="split model.safetensors above "
                   "this size (default 5GB)")
    return p


# Flags that serve some conversions only (source format, target): given to another they would be
# ignored without a word, and the user would believe the output holds what they asked for.
SCOPES = {
    "target_tensor_parallel_size": ("resharding (--from ours --to ours)", lambda s, t: (s, t) == ("ours", "ours")),
    "target_pipeline_parallel_size": ("resharding (--from ours --to ours)", lambda s, t: (s, t) == ("ours", "ours")),
    "num_attention_heads": ("reading an authors' file", lambda s, t: s == "authors"),
    "seq_length": ("reading an authors' file", lambda s, t: s == "authors"),
    "tokenizer_file": ("reading an authors' file (other sources carry their tokenizer)", lambda s, t: s == "authors"),
    "trust_pickle": ("reading an authors' file", lambda s, t: s == "authors"),
    "pretrain_lr": ("writing our checkpoint from another format", lambda s, t: t == "ours" and s != "ours"),
    "attention_pattern": ("a Hugging Face export (--to hf)", lambda s, t: t == "hf"),
    "max_shard_size": ("a Hugging Face export (--to hf)", lambda s, t: t == "hf"),
}


def check_scopes(args, source_format: str) -> None:
    """Refuse a flag given (other than its default) to a conversion it does not apply to."""
    parser = build_parser()
    flags = {a.dest: a.option_strings[0] for a in parser._actions}
    for dest, (where, applies) in SCOPES.items():
        if getattr(args, dest) != parser.get_default(dest) and not applies(source_format, args.target):
            raise UserError(f"{flags[dest]} applies only to {where}; this conversion is "
                            f"{source_format} -> {args.target}")


def detect_format(path: str) -> str:
    if os.path.isfile(path):
        return "authors"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if os.path.isdir(path):
        return "ours"
    raise UserError(f"input not found: {path}")


def _from_authors(args):
    from megatron_ratplus.convert.authors import (authors_shape, authors_to_local, config_heads, config_seq_length,
                                                  load_authors)
    from megatron_ratplus.data.tokenizer import build_tokenizer, padded_vocab_size

    state, config = load_authors(args.input, args.trust_pickle)
    shape = authors_shape(state, config)
    tokenizer = build_tokenizer(args.tokenizer_file or "byte")
    if not args.tokenizer_file and shape["vocab"] > tokenizer.vocab_size:
        raise UserError(f"the checkpoint has {shape['vocab']} embeddings but the default byte tokenizer "
                        f"{tokenizer.vocab_size} tokens: pass the model's --tokenizer-file (the rest would be masked)")
    if tokenizer.vocab_size > shape["vocab"]:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint only "
                                f"{shape['vocab']} embeddings (pass the model's --tokenizer-file)")
    heads = args.num_attention_heads or config_heads(config) or max(1, shape["hidden_size"] // 128)
    padded = padded_vocab_size(shape["vocab"])
    weights = authors_to_local(state, shape, heads, padded, args.input)
    model = {"num_layers": shape["num_layers"], "hidden_size": shape["hidden_size"], "num_attention_heads": heads,
             "ffn_hidden_size": shape["ffn_hidden_size"], "vocab_size": padded,
             "seq_length": args.seq_length or config_seq_length(config) or 4096,
             "real_vocab_size": tokenizer.vocab_size, "recurrence": shape["recurrence"]}
    source = {"format": "authors", "path": os.path.abspath(args.input), "vocab_size": shape["vocab"]}
    return weights, model, tokenizer.spec, source, None


def _from_ours(args):
    from megatron_ratplus import checkpoint
    from megatron_ratplus.convert.local import read_local

    state, config, tokenizer, meta = read_local(args.input)
    model = checkpoint.model_meta(config)
    source = {"format": "ours", "path": meta["path"], "vocab_size": meta.get("source", {}).get("vocab_size")}
    return state, model, tokenizer.spec, source, meta.get("args", {}).get("adapt_pattern")


def _from_hf(args):
    from megatron_ratplus.convert.hf import read_hf

    state, model, tokenizer_file = read_hf(args.input)
    pattern = model.pop("attention_pattern")
    source = {"format": "hf", "path": os.path.abspath(args.input)}
    return state, model, f"json:{tokenizer_file}" if tokenizer_file else "byte", source, pattern


def convert(args) -> str:
    from megatron_ratplus.convert import ConversionError

    source_format = args.source or detect_format(args.input)
    check_scopes(args, source_format)
    if os.path.lexists(args.output):
        raise ConversionError(f"output {args.output} already exists; refusing to write into or over it")
    check_output_path("--output", args.output, directory=args.target in ("ours", "hf"))
    source, output = os.path.realpath(args.input), os.path.realpath(args.output)
    if os.path.isdir(source) and os.path.commonpath([source, output]) == source:
        raise ConversionError(f"--output {args.output} is inside the input {args.input}; write it elsewhere")
    if source_format == args.target == "ours":
        from megatron_ratplus.convert.reshard import reshard

        return reshard(args.input, args.output, args.target_tensor_parallel_size, args.target_pipeline_parallel_size)
    read = {"authors": _from_authors, "ours": _from_ours, "hf": _from_hf}[source_format]
    state, model, tokenizer_spec, source, pattern = read(args)
    return write(args, state, model, tokenizer_spec, source, args.attention_pattern or pattern or "dense")


def write(args, state, model, tokenizer_spec, source, pattern) -> str:
    from megatron_ratplus.convert.local import model_config, write_local
    from megatron_ratplus.data.tokenizer import build_tokenizer

    if args.target == "ours":  # an HF directory's tokenizer file moves into the new checkpoint
        carried = tokenizer_spec[len("json:"):] if source["format"] == "hf" and tokenizer_spec != "byte" else None
        return write_local(state, model, tokenizer_spec, args.output, source, args.pretrain_lr, carried)
    config = model_config({**model, "attention_pattern": pattern})
    if args.target == "hf":
        from megatron_ratplus.convert.hf import export_hf

        return export_hf(state, config, build_tokenizer(tokenizer_spec), args.output, args.max_shard_size)
    if args.target == "authors":
        from megatron_ratplus.convert.authors import local_to_authors

        blob = local_to_authors(state, config, source.get("vocab_size") or config.real_vocab_size)
    else:
        blob = {"model": state, "meta": {"model": model, "tokenizer": tokenizer_spec, "source": source}}
    from megatron_ratplus.convert.reshard import save_file

    return save_file(blob, args.output)


def main(argv=None) -> int:
    def run():
        path = convert(build_parser().parse_args(argv if argv is not None else sys.argv[1:]))
        print(f"wrote {path}")

    return run_cli("ratplus-convert", run)


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes that re-import this module
    sys.exit(main())
