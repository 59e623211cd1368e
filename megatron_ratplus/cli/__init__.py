"""Console scripts. Each parses with megatron_ratplus.errors.ArgumentParser and runs under
:func:`run_cli`, which turns a UserError into one line on stderr and exit status 2."""

import errno
import os
import signal
import sys
import threading
from typing import Callable

from megatron_ratplus.errors import UserError, first_line


def _root_cause(err: BaseException) -> BaseException:
    """The exception at the bottom of a chain: megatron's checkpointing wraps a Ctrl-C or a full
    disk in its own CheckpointException, and torch's distributed checkpoint in a
    CheckpointException that holds each failed rank's exception in ``failures`` (rank ->
    (exception, traceback)) rather than as a cause."""
    seen = {id(err)}
    while True:
        failures = getattr(err, "failures", None)
        wrapped = [f[0] for f in failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)] \
            if isinstance(failures, dict) else []
        # "raise ... from None" replaced its context on purpose (checkpoint.save naming the file)
        inner = wrapped[0] if wrapped else err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None or id(inner) in seen:
            return err
        err = inner
        seen.add(id(err))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the stack unwinds and every finally removes its
    temporary files (the default action would end the process where it stands)."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(prog: str, main: Callable[[], object]) -> int:
    """Call ``main``; its exit status is what it returns if that is an int (a tool's verdict:
    estimate.py's "does not fit" is 1), else 0. A UserError becomes ``prog: error: message`` and exit status 2; Ctrl-C one
    line and 130; a full disk or a read-only file system one line and 1 (docs/DESIGN.md §10).
    SIGTERM unwinds like Ctrl-C (exit 143) so no temporary file outlives it."""
    unwind = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if unwind:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        status = main()
    except UserError as err:
        print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except BaseException as err:  # noqa: BLE001  (re-raised unless its root cause is one of the below)
        # BaseException, not Exception: torch's CheckpointException (a signal or a full disk
        # inside a checkpoint write) derives from BaseException; SystemExit passes through.
        if isinstance(err, (SystemExit, GeneratorExit)):
            raise
        cause = _root_cause(err)
        if isinstance(cause, (KeyboardInterrupt, Terminated)):
            print(f"{prog}: {'interrupted' if isinstance(cause, KeyboardInterrupt) else 'terminated (SIGTERM)'}",
                  file=sys.stderr)
            return 130 if isinstance(cause, KeyboardInterrupt) else 143
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            where = f" writing {cause.filename}" if cause.filename else ""
            print(f"{prog}: error: {os.strerror(cause.errno).lower()}{where}", file=sys.stderr)
            return 1
        raise
    finally:
        if unwind:  # a console script called in-process (tests, notebooks) leaves no handler behind
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
