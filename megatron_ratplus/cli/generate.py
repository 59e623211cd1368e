"""ratplus-generate: continue prompts with a trained RAT+ checkpoint under any attention pattern.

    ratplus-generate --load CKPT --pattern "dilated:16,w=256,p=4" --prompt "Once upon a time"

The checkpoint may have been trained densely; the pattern (or per-layer / per-head
composition, grammar in megatron_ratplus.patterns) is applied at load time.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import non_negative_float, positive_int, probability, sampling_seed, utf8_text
from megatron_ratplus.errors import ArgumentParser, UserError
from megatron_ratplus.userfiles import read_text_lines


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ratplus-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (from ratplus-pretrain)")
    parser.add_argument("--pattern", default=None,
                        help="attention pattern or composition, e.g. dense, dilated:16,w=256,p=4, "
                             "'cycle(dense;dilated:64)', 'dense|dilated:16' (default: the checkpoint's)")
    parser.add_argument("--prompt", action="append", default=[], type=utf8_text, help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--stop", action="append", default=[], type=utf8_text,
                        help="a stop string that is one token (repeatable); end-of-document always stops")
    parser.add_argument("--seed", type=sampling_seed, default=None, help="sampling seed")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="longest prompt + new tokens allowed (default: the model's seq_length)")
    parser.add_argument("--show-cache", action="store_true", help="print the decode cache size")
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters, activations and decode cache "
                                                            "(as ratplus-pretrain's --bf16; default fp32)")
    return parser


def _prompts(args) -> List[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line for line in read_text_lines(args.prompt_file, "--prompt-file") if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file")
    return prompts


def _stop_tokens(tokenizer, stops) -> List[int]:
    ids = [tokenizer.eod] if getattr(tokenizer, "eod", None) is not None else []
    for text in stops:
        try:  # backslash escapes (\\n, \\x00, \\u2028) decoded, any other character kept as it is
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # '\\q': an unknown escape
                encoded = tokenizer.encode(text.encode("latin-1", "backslashreplace").decode("unicode_escape"))
        except (UnicodeDecodeError, DeprecationWarning) as err:
            reason = err.reason if isinstance(err, UnicodeDecodeError) else "unknown backslash escape"
            raise UserError(f"--stop '{text}': {reason}") from None
        if len(encoded) != 1:
            raise UserError(f"--stop '{text}' is {len(encoded)} tokens; a stop string must be one token")
        ids.append(encoded[0])
    return ids


def run(args) -> int:
    from megatron_ratplus import distributed
    from megatron_ratplus.checkpoint import load_model
    from megatron_ratplus.inference import SamplingConfig, generate

    prompts = _prompts(args)
    distributed.initialize()
    model, _config, tokenizer = load_model(args.load, pattern=args.pattern, dtype="bf16" if args.bf16 else "fp32")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              stop_tokens=_stop_tokens(tokenizer, args.stop), seed=args.seed)
    result = generate(model, [tokenizer.encode(p) for p in prompts], sampling, max_length=args.max_length)
    for prompt, tokens, reason in zip(prompts, result.tokens, result.finish_reasons):
        print(prompt + tokenizer.decode(tokens))
        if len(prompts) > 1:
            print(f"--- ({len(tokens)} tokens, {reason})")
    if args.show_cache:
        print(f"decode cache: {result.cache_bytes} bytes for {len(prompts)} sequence(s)", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("ratplus-generate", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
