"""ratplus-serve: an OpenAI-compatible server for a RAT+ checkpoint, one model at several patterns.

    ratplus-serve --load checkpoints/ratplus-tiny --patterns dense,dilated:16 --port 8000

Each offered pattern gets an equal share of ``--cache-memory-gb``, allocated once as decode-cache
rows of ``--max-model-len`` positions; requests beyond the rows wait, beyond ``--max-waiting``
they get 429. SIGTERM (or Ctrl-C) stops admitting (503), lets running requests finish for up to
``--drain-timeout`` seconds, cuts off the rest and exits 0. Under ``torchrun --nproc-per-node N``
the model is split tensor-parallel over the N ranks; rank 0 serves HTTP (serving/replica.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from typing import List, Optional

from megatron_ratplus.cli import run_cli
from megatron_ratplus.cli.types import non_negative_float, non_negative_int, positive_float, positive_int
from megatron_ratplus.errors import ArgumentParser, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ratplus-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (from ratplus-pretrain)")
    parser.add_argument("--patterns", default=None,
                        help="comma-separated patterns or compositions offered, the first is the default "
                             "(default: the checkpoint's recorded pattern)")
    parser.add_argument("--served-model-name", default=None, help="model id in the API (default: --load's name)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="prompt plus generated tokens per sequence (default: the model's seq_length)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences decoding at once, all patterns")
    parser.add_argument("--cache-memory-gb", type=positive_float, default=1.0, help="decode-cache pool, all patterns")
    parser.add_argument("--max-waiting", type=positive_int, default=256, help="queued sequences before 429")
    parser.add_argument("--max-prefill-tokens", type=positive_int, default=8192,
                        help="prompt tokens prefilled per engine step (a longer prompt is prefilled in "
                             "chunks of at most this many, the running sequences decoding between them)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=non_negative_int, default=8000)
    parser.add_argument("--dtype", default=None,
                        help="parameters, activations and decode cache: fp32 or bf16 (ratplus-generate's "
                             "and lm-eval's types; default fp32)")
    parser.add_argument("--bf16", action="store_true", help="same as --dtype bf16 (as ratplus-generate --bf16)")
    parser.add_argument("--drain-timeout", type=non_negative_float, default=30.0,
                        help="seconds running requests get to finish after SIGTERM")
    return parser


def check_arguments(args) -> None:
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.port >= 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if not os.path.isdir(args.load):
        raise UserError(f"--load '{args.load}' is not a directory")
    if args.bf16 and args.dtype not in (None, "bf16"):
        raise UserError(f"--bf16 contradicts --dtype {args.dtype}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name must not be empty")


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a host that does not resolve or a port
    in use is one line at once, not a uvicorn log line after the load."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def offered_patterns(text: Optional[str], recorded: str) -> List[str]:
    """The patterns of ``--patterns`` (each checked against the grammar), or the recorded one."""
    from megatron_ratplus.patterns import parse_composition, split_pattern_list

    patterns = split_pattern_list(text) if text else [recorded]
    for pattern in patterns:
        parse_composition(pattern)
    if len(set(patterns)) != len(patterns):
        raise UserError(f"--patterns lists a pattern twice: {text}")
    return patterns


def build_engine(model, patterns: List[str], max_model_len: int, args, dtype, announce=None):
    """One pool per pattern, each an equal share of the cache budget (at most ``--max-num-seqs`` rows)."""
    from megatron_ratplus.serving.engine import Engine
    from megatron_ratplus.serving.pool import PatternPool, row_bytes

    share = args.cache_memory_gb * 2**30 / len(patterns)
    pools = {}
    for pattern in patterns:
        size = row_bytes(model, pattern, max_model_len, dtype)
        rows = min(args.max_num_seqs, int(share // size))
        if rows < 1:
            raise UserError(f"--cache-memory-gb {args.cache_memory_gb} leaves {share / 2**30:.3g} GiB for "
                            f"'{pattern}', less than one sequence of {max_model_len} positions "
                            f"({size / 2**30:.3g} GiB)")
        pools[pattern] = PatternPool(model, pattern, rows, max_model_len, dtype, announce)
    return Engine(pools, args.max_num_seqs, args.max_waiting, args.max_prefill_tokens)


def run(args) -> int:
    import torch
    import uvicorn

    from megatron_ratplus import distributed
    from megatron_ratplus.checkpoint import EVAL_DTYPES, load_model
    from megatron_ratplus.serving import replica
    from megatron_ratplus.serving.api import ServedModel, build_app
    from megatron_ratplus.serving.server import DrainingServer

    check_arguments(args)
    dtype_name = "bf16" if args.bf16 else args.dtype or "fp32"
    if dtype_name not in EVAL_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got '{args.dtype}'")
    dtype = EVAL_DTYPES[dtype_name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sock = listening_socket(args.host, args.port) if int(os.environ.get("RANK", "0")) == 0 else None
    distributed.initialize(tensor_parallel=world)  # torchrun: the model split over all ranks
    leader = torch.distributed.get_rank() == 0
    model, config, tokenizer = load_model(args.load, dtype=dtype_name)  # cast there, evaluation's path
    patterns = offered_patterns(args.patterns, str(config.attention_pattern))
    max_model_len = args.max_model_len or config.seq_length
    if max_model_len > config.seq_length:  # as ratplus-generate: positions past training were never seen
        raise UserError(f"--max-model-len {max_model_len} exceeds the model's trained length {config.seq_length}")
    announce = replica.announce if world > 1 and leader else None
    engine = build_engine(model, patterns, max_model_len, args, dtype, announce)
    if not leader:
        replica.follow(engine.pools)
        return 0
    served = ServedModel(args.served_model_name or os.path.basename(os.path.normpath(args.load)), patterns,
                         tokenizer, config.real_vocab_size or config.vocab_size, max_model_len)
    app = build_app(engine, served)
    rows = ", ".join(f"{p}: {pool.rows} sequences" for p, pool in engine.pools.items())
    port = sock.getsockname()[1]
    print(f"ratplus-serve: {served.name} on http://{args.host}:{port} ({rows})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = DrainingServer(config, engine, args.drain_timeout)
    engine.on_failure = server.start_drain
    http = HTTPThread(server, sock)
    # uvicorn listens for signals only on the main thread, which runs the engine here
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        # The model's forwards run on the thread that loaded it: torch's OpenMP pool on another
        # thread would be a second one, and libgomp then throttles its workers' spin-waits
        # (CPU steps about 20% slower, docs/PERFORMANCE.md "Serving").
        engine.run()
        http.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        engine.stop()
        if world > 1:
            replica.stop_followers()
    if http.failure is not None:
        raise http.failure
    if engine.failure is not None:  # a bug in a step: its traceback, exit 1, for a supervisor to restart
        raise engine.failure
    return 0


class HTTPThread(threading.Thread):
    """uvicorn serving ``sock`` beside the engine; when it ends, so does the engine (what made it
    end, if anything raised, is re-raised on the main thread)."""

    def __init__(self, server, sock: socket.socket):
        super().__init__(name="ratplus-http", daemon=True)
        self.server, self.sock = server, sock
        self.failure: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as err:  # noqa: BLE001  (re-raised by the main thread)
            self.failure = err
        finally:
            self.server.engine.stop()


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("ratplus-serve", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
