"""Tokenize a corpus into megatron indexed datasets, in worker processes, in input order.

The library behind tools/preprocess_data.py (formats, tokenizers and the bad-input policy are
described there). Workers get batches of raw records (JSON lines are parsed in the workers, so
the reading process only moves bytes) and at most 2 x workers batches are in flight, so memory
stays bounded on a 100B-token corpus.
"""


from __future__ import annotations

import collections
import contextlib
import errno
import glob
import gzip
import json
import multiprocessing
import os
import resource
import signal
import sys
import threading
import zlib
from typing import Dict, Iterator, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from megatron_ratplus.data.tokenizer import DataError, build_tokenizer
from megatron_ratplus.errors import first_line
from megatron_ratplus.userfiles import check_output_path, make_parents, publish, remove_folders, remove_stale_temps

BATCH = 512  # records per task sent to a worker
JSON_SUFFIXES = (".jsonl", ".json")


def _kind(path: str) -> str:
    for compression in (".gz", ".zst"):
        if path.endswith(tuple(s + compression for s in JSON_SUFFIXES)):
            return "jsonl" + compression
    if path.endswith(JSON_SUFFIXES):
        return "jsonl"
    return "parquet" if path.endswith(".parquet") else "text"


def _zstd_lines(path: str) -> Iterator[bytes]:
    """Lines of a zstandard file (one or more frames). zstandard's stream reader ends quietly at a
    truncated frame, so frames are decoded here and a frame left unfinished raises EOFError."""
    try:
        import zstandard
    except ImportError:
        raise DataError(f"{path}: reading .zst needs the 'zstandard' package: pip install zstandard") from None
    with open(path, "rb") as raw:
        decoder, tail, started = zstandard.ZstdDecompressor().decompressobj(), b"", False
        while True:
            chunk = raw.read(1 << 20)
            if not chunk:
                break
            while chunk:
                if decoder.eof:  # the next frame
                    decoder = zstandard.ZstdDecompressor().decompressobj()
                started = True
                text = tail + decoder.decompress(chunk)
                chunk = decoder.unused_data if decoder.eof else b""
                lines = text.split(b"\n")
                tail = lines.pop()
                yield from (line + b"\n" for line in lines)
        if started and not decoder.eof:
            raise EOFError("the last zstandard frame is incomplete")
        if tail:
            yield tail


def _raw_lines(path: str, kind: str):
    if kind == "jsonl.zst":
        yield from _zstd_lines(path)
        return
    with (gzip.open(path, "rb") if kind == "jsonl.gz" else open(path, "rb")) as f:
        yield from f


def _open_lines(path: str, kind: str):
    """An iterator over the file's (decompressed) lines, as bytes; a UTF-8 byte order mark before
    the first record is dropped (it would make that record "not JSON")."""
    lines = _raw_lines(path, kind)
    first = next(lines, None)
    if first is not None:
        yield first[3:] if first.startswith(b"\xef\xbb\xbf") else first
        yield from lines


def _corrupt_errors():
    errors = [OSError, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_batches(path: str, keys: Sequence[str]) -> Iterator[Tuple[str, int, str, list]]:
    """(path, first line or row number, kind, items): raw lines for JSON, value tuples for parquet,
    the file's bytes for text. Raises DataError for a file that cannot be read as a whole."""
    kind = _kind(path)
    if kind == "parquet":
        yield from _parquet_batches(path, keys)
        return
    if kind == "text":
        with open(path, "rb") as f:
            yield path, 1, "text", [f.read()]
        return
    batch, first, line_no = [], 1, 0
    try:
        for line_no, line in enumerate(_open_lines(path, kind), 1):
            if not batch:
                first = line_no
            batch.append(line)
            if len(batch) == BATCH:
                yield path, first, "jsonl", batch
                batch = []
    except _corrupt_errors() as err:
        raise DataError(f"{path}: corrupt or truncated {kind[6:] or 'file'} data after line {line_no} "
                        f"({first_line(err)})") from None
    if batch:
        yield path, first, "jsonl", batch


def _parquet_batches(path: str, keys: Sequence[str]):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the 'pyarrow' package: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise DataError(f"{path}: not a readable parquet file ({first_line(err)})") from None
    columns = table.schema_arrow.names
    missing = [k for k in keys if k not in columns]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(columns)})")
    row = 1
    try:
        for record_batch in table.iter_batches(batch_size=BATCH, columns=list(keys)):
            values = list(zip(*(record_batch.column(k).to_pylist() for k in keys)))
            yield path, row, "parquet", values
            row += len(values)
    except Exception as err:
        raise DataError(f"{path}: corrupt parquet data after row {row} ({first_line(err)})") from None


# ---- worker side: one tokenizer per process, set by _init_worker ------------------------------

_worker = {}


def _init_worker(spec: str, keys: Sequence[str], append_eod: bool) -> None:
    tokenizer = build_tokenizer(spec)
    dtype = np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.int32
    _worker.update(tokenizer=tokenizer, keys=tuple(keys), eod=[tokenizer.eod] if append_eod else [], dtype=dtype)


def _texts(kind: str, item) -> Tuple:
    """The record's texts (one per key), or a string: why it is skipped."""
    keys = _worker["keys"]
    if kind == "parquet":
        values = item
    elif kind == "text":
        try:
            return (item.decode("utf-8"),)
        except UnicodeDecodeError:
            return "not UTF-8"
    else:
        try:
            line = item.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8"
        if not line.strip():
            return ()
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return "not JSON"
        if not isinstance(record, dict):
            return "not a JSON object"
        for key in keys:
            if key not in record:
                return f"no '{key}' field"
        values = tuple(record[k] for k in keys)
    for key, value in zip(keys, values):
        if not isinstance(value, str):
            return f"null or non-string '{key}'"
        if not value:
            return f"empty '{key}'"
    return tuple(values)


def encode_batch(task) -> Tuple[list, int]:
    """Tokenize one batch: per record a tuple of arrays (one per key), None (blank line) or a
    skip reason; plus the batch's token count."""
    _, _, kind, items = task
    tokenizer, eod, dtype = _worker["tokenizer"], _worker["eod"], _worker["dtype"]
    out, tokens = [], 0
    for item in items:
        texts = _texts(kind, item)
        if isinstance(texts, str) or not texts:
            out.append(texts or None)
            continue
        try:
            docs = tuple(np.asarray(tokenizer.encode(t) + eod, dtype=dtype) for t in texts)
        except UnicodeEncodeError:  # a lone surrogate (valid JSON "\ud800", invalid UTF-8)
            out.append("lone surrogate")
            continue
        tokens += sum(len(d) for d in docs)
        out.append(docs)
    return out, tokens


def _init_pool_worker(spec: str, keys, append_eod: bool) -> None:
    """A pool worker leaves Ctrl-C and SIGTERM (a terminal's or a scheduler's, sent to every
    process) to the parent, which closes the pool (``_ordered``): a worker killed mid-task would
    leave the parent waiting for its result forever. A killed parent ends it too: its task pipe
    reaches end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _init_worker(spec, keys, append_eod)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM only noted until ``release()`` (or the block's end), then handled as
    they would have been. Python runs a signal's handler in the main thread at the next bytecode,
    wherever that is: inside fork's at-fork hooks (logging's lock release) a KeyboardInterrupt is
    printed as "Exception ignored" and lost, and the run went on to the end; inside
    multiprocessing.Pool() it left the workers running, holding the caller's pipes open."""
    noted, previous, parent = [], {}, os.getpid()

    def note(signum, frame):
        if os.getpid() == parent:  # a worker forked meanwhile ignores it, as _init_pool_worker will
            noted.append(signum)

    if threading.current_thread() is threading.main_thread():  # elsewhere signals are not ours to handle
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, note)

    def release():
        while previous:
            sig, handler = previous.popitem()
            signal.signal(sig, handler)
        if noted:
            sig = noted[0]
            noted.clear()
            handler = signal.getsignal(sig)
            if callable(handler):
                handler(sig, None)  # KeyboardInterrupt, run_cli's Terminated
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)

    try:
        yield release
    finally:
        release()


def _ordered(tasks: Iterator, workers: int, spec: str, keys, append_eod: bool):
    """(task, result) in input order; at most 2 x workers tasks in flight (bounded memory)."""
    _init_worker(spec, keys, append_eod)
    if workers == 1:
        for task in tasks:
            yield task, encode_batch(task)
        return
    # The pool is made with signals deferred (one that came meanwhile is raised once it exists).
    # However the run ends (done, a full disk, bad data, Ctrl-C, SIGTERM), the workers, which
    # ignore signals, finish their at most 2 x workers queued batches and exit; a further signal
    # waits for that. Pool.terminate is never called: it waits for the task queue's lock, which an
    # idle worker holds while it waits for a task, and hung about 1 run in 10 after a Ctrl-C.
    with _signals_deferred() as release:
        pool = multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(spec, keys, append_eod))
        try:
            release()
            yield from _in_order(pool, tasks, workers)
        finally:
            with _signals_deferred():
                pool.close()
                pool.join()


def _in_order(pool, tasks: Iterator, workers: int):
    pending = collections.deque()
    for task in tasks:
        pending.append((task, pool.apply_async(encode_batch, (task,))))
        if len(pending) >= 2 * workers:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def output_prefixes(prefix: str, keys: Sequence[str], partitions: int) -> Dict[Tuple[str, int], str]:
    """(key, shard) -> output prefix: PREFIX, PREFIX_KEY with several keys, then _SHARD with partitions."""
    out = {}
    for key in keys:
        base = f"{prefix}_{key}" if len(keys) > 1 else prefix
        for shard in range(partitions):
            out[key, shard] = f"{base}_{shard}" if partitions > 1 else base
    return out


def build(paths: Sequence[str], output_prefix: str, tokenizer_spec: str = "byte", json_keys=("text",),
          append_eod: bool = True, workers: int = 1, partitions: int = 1, progress: bool = False) -> dict:
    """Tokenize ``paths`` into indexed datasets; returns counts (documents, tokens, skipped by reason)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if workers < 1 or partitions < 1:
        raise DataError("--workers and --partitions must be >= 1")
    cores = len(os.sched_getaffinity(0))
    if workers > cores:  # each worker is a process holding a tokenizer: more only cost memory
        raise DataError(f"--workers {workers} is more than the {cores} CPU cores this process may use")
    keys = tuple(json_keys)
    if len(set(keys)) != len(keys) or not keys:
        raise DataError("--json-keys must name distinct fields")
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if len(keys) * partitions > files // 2:  # every shard's .bin stays open while documents are dealt
        raise DataError(f"--partitions {partitions} x {len(keys)} --json-keys would hold {len(keys) * partitions} "
                        f"files open; this process may open {files} (ulimit -n)")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input {path} is a directory; name its files" if os.path.isdir(path)
                            else f"input {path} is not a regular file" if os.path.exists(path)
                            else f"input file not found: {path}")
    named = [os.path.realpath(path) for path in paths]
    twice = next((path for i, path in enumerate(paths) if named[i] in named[:i]), None)
    if twice is not None:
        raise DataError(f"input {twice} is named twice; its documents would be in the dataset twice")
    prefixes = output_prefixes(output_prefix, keys, partitions)
    for prefix in prefixes.values():
        for ext in (".bin", ".idx"):
            if os.path.exists(prefix + ext):
                raise DataError(f"{prefix + ext} exists; refusing to overwrite it")
    tokenizer = build_tokenizer(tokenizer_spec)  # fail before any work
    dtype = np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.int32
    check_output_path("--output-prefix", output_prefix)
    for prefix in prefixes.values():
        remove_stale_temps(glob.escape(prefix) + ".[bi][id][nx].tmp-*")
    tmp = f".tmp-{os.getpid()}"  # two runs into one prefix never share a temporary file
    skipped, first_skip = collections.Counter(), {}
    records = tokens = 0
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, file=sys.stderr,
               disable=None if progress else True)  # None: only on a terminal, never in a log or pipe
    created, builders = [], {}
    try:  # from the first folder made: a signal at any point leaves nothing behind
        created += make_parents(os.path.dirname(os.path.abspath(output_prefix)))
        for k, p in prefixes.items():
            builders[k] = IndexedDatasetBuilder(p + ".bin" + tmp, dtype=dtype)
        tasks = (task for path in paths for task in read_batches(path, keys))
        # closed here on any failure: its pool is closed and joined now, not when the suspended
        # generator is collected at interpreter exit, where multiprocessing terminates pools
        with contextlib.closing(_ordered(tasks, workers, tokenizer.spec, keys, append_eod)) as ordered:
            for (path, first, kind, _), (results, batch_tokens) in ordered:
                for offset, result in enumerate(results):
                    if result is None:
                        continue
                    if isinstance(result, str):
                        skipped[result] += 1
                        where = "row" if kind == "parquet" else "line"
                        first_skip.setdefault(result, f"{path}:{where} {first + offset}" if kind != "text" else path)
                        continue
                    shard = records % partitions
                    for key, doc in zip(keys, result):
                        builders[key, shard].add_document(doc, [len(doc)])
                    records += 1
                tokens += batch_tokens
                bar.update(batch_tokens)
                bar.set_postfix(docs=records, skipped=sum(skipped.values()), refresh=False)
        if records < partitions:
            raise DataError(f"the input holds {records} usable documents, fewer than --partitions {partitions}"
                            if records else "the input holds no usable documents")
        for key, prefix in prefixes.items():
            builders[key].finalize(prefix + ".idx" + tmp)
        for prefix in prefixes.values():
            publish(prefix + ".bin" + tmp, prefix + ".bin")
            publish(prefix + ".idx" + tmp, prefix + ".idx")
    except BaseException as err:
        for key, prefix in prefixes.items():
            if key in builders:
                with contextlib.suppress(OSError):  # on a full disk, closing flushes and fails again
                    builders[key].data_file.close()
            for path in (prefix + ".bin" + tmp, prefix + ".idx" + tmp):
                if os.path.exists(path):
                    os.remove(path)
        remove_folders(created)  # a refused or signalled run leaves no folders behind either
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not err.filename:
            # a failed buffered write names no file: name the output, for run_cli's one line
            raise OSError(err.errno, err.strerror, f"{output_prefix}.bin/.idx") from None
        raise
    finally:
        bar.close()
    return {"documents": records, "tokens": tokens, "vocab_size": tokenizer.vocab_size,
            "outputs": sorted(set(prefixes.values())), "skipped": dict(skipped), "first_skipped": first_skip}


__all__ = ["build", "output_prefixes", "read_batches", "encode_batch"]
