"""Build megatron indexed datasets (PREFIX.bin / PREFIX.idx) from a corpus, at FineWeb scale.

Inputs (by file name): ``.jsonl``/``.json`` (one JSON object per line), the same compressed
as ``.gz`` (gzip) or ``.zst`` (zstandard), ``.parquet`` (pyarrow; one row per document) and
any other file as one plain-text document. ``--json-keys`` names the text field(s); with more
than one key each key gets its own dataset PREFIX_KEY. ``--partitions N`` deals the documents
round-robin into N shards PREFIX[_KEY]_0 .. _N-1 (a blend of equal weights reads them back).

Tokenizers: byte-level (default), a local HF ``tokenizer.json`` (``--tokenizer-type
huggingface``) or a SentencePiece model (``--tokenizer-type sentencepiece --tokenizer-model
tokenizer.model``, e.g. LLaMA-2's). ``--workers N`` tokenizes in N processes; the output keeps
the input order whatever N is. Every document ends with the end-of-document token unless
``--no-append-eod``.

Bad input, decided once for a 100B-token job that should not die on one bad line:
- a bad record (not UTF-8, not JSON, not an object, a missing/null/non-string text field, a
  lone surrogate, an empty text) is skipped and counted; the counts and the first place of each
  kind are reported at the end;
- a bad file (missing, corrupt or truncated compressed stream, a parquet file without the
  text column, an unreadable parquet file) or a tokenizer that cannot be loaded stops the run:
  ``preprocess_data.py: error: ...``, exit status 2, and nothing is written (outputs go to
  temporary files renamed into place only when everything succeeded).

    python3 tools/preprocess_data.py --input shard-*.parquet --output-prefix data/fineweb \\
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model --workers 64
"""

from __future__ import annotations

import argparse
import errno
import sys

from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import positive_int
from megatron_ratplus.data.preprocess import build
from megatron_ratplus.data.tokenizer import DataError

PROG = "preprocess_data.py"


def tokenizer_spec(args) -> str:
    """The tokenizer spec (megatron_ratplus.data.tokenizer.build_tokenizer) the flags name."""
    if args.tokenizer_file:
        if args.tokenizer_type not in (None, "huggingface"):
            raise DataError("--tokenizer-file is a tokenizer.json: use --tokenizer-model with this --tokenizer-type")
        if args.tokenizer_model:
            raise DataError("give --tokenizer-file or --tokenizer-model, not both")
        return f"json:{args.tokenizer_file}"
    kind = args.tokenizer_type or "byte"
    if kind == "byte":
        if args.tokenizer_model:
            raise DataError("--tokenizer-model needs --tokenizer-type huggingface or sentencepiece")
        return "byte"
    if not args.tokenizer_model:
        raise DataError(f"--tokenizer-type {kind} needs --tokenizer-model PATH")
    return f"{'json' if kind == 'huggingface' else 'sentencepiece'}:{args.tokenizer_model}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise DataError(message)


def main(argv=None) -> int:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl[.gz|.zst], parquet or text files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", choices=["byte", "huggingface", "sentencepiece"])
    parser.add_argument("--tokenizer-model", help="tokenizer.json (huggingface) or tokenizer.model (sentencepiece)")
    parser.add_argument("--tokenizer-file", help="same as --tokenizer-type huggingface --tokenizer-model FILE")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="text field(s) / parquet column(s)")
    parser.add_argument("--append-eod", default=True, action=argparse.BooleanOptionalAction,
                        help="end every document with the end-of-document token (default: on)")
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument("--partitions", type=positive_int, default=1, help="output shards per key")
    parser.add_argument("--no-progress-bar", dest="progress", action="store_false")
    return run_cli(PROG, lambda: _run(parser.parse_args(argv)))


def _run(args) -> None:
    try:
        stats = build(args.input, args.output_prefix, tokenizer_spec(args), args.json_keys, args.append_eod,
                      args.workers, args.partitions, args.progress)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # run_cli names the cause in one line
        raise DataError(f"{err.strerror}: {err.filename}" if err.filename else str(err)) from None
    outputs = ", ".join(f"{p}.bin/.idx" for p in stats["outputs"])
    print(f"wrote {outputs}: {stats['documents']} documents, {stats['tokens']} tokens")
    for reason, count in sorted(stats["skipped"].items()):
        print(f"skipped {count} records: {reason} (first at {stats['first_skipped'][reason]})")


if __name__ == "__main__":
    sys.exit(main())
