"""Reading the files a user names: an explicit encoding, a checked structure, one-line errors.

Every JSON/JSONL/text file a user points a tool at (prompt files, LongBench data, Hugging Face
config.json and shard indexes, results files) is read here, so a Latin-1 file, a UTF-8 byte
order mark, a list where an object belongs or a value of the wrong type all end the same way:
a UserError naming the file and what is wrong (docs/DESIGN.md §10).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
from typing import Iterator, List, Optional, Tuple, Type

from megatron_ratplus.errors import UserError

ENCODING = "utf-8-sig"  # UTF-8, with a leading byte order mark dropped rather than read as text


def _decode_error(path: str, err: UnicodeDecodeError) -> UserError:
    return UserError(f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
                     "re-encode it as UTF-8")


def open_text(path: str, what: str):
    """``path`` opened as UTF-8 text; a device (``/dev/zero``, directly or by a link) is refused,
    since it reads without end. A pipe stays allowed: ``--prompt-file <(...)`` ends."""
    with contextlib.suppress(OSError):  # a missing or unreadable file: open's own error, below
        mode = os.stat(path).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise UserError(f"{what} {path} is a device, not a file")
    return open(path, encoding=ENCODING, newline=None)


def read_text_lines(path: str, what: str) -> List[str]:
    """The lines of a UTF-8 text file, newline removed."""
    try:
        with open_text(path, what) as f:
            return [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as err:
        raise _decode_error(path, err) from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None


def read_json(path: str, what: str, kind: Type = dict):
    """A UTF-8 JSON file whose top level must be a ``kind`` (dict or list)."""
    try:
        with open_text(path, what) as f:
            value = json.load(f)
    except UnicodeDecodeError as err:
        raise _decode_error(path, err) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    if not isinstance(value, kind):
        raise UserError(f"{what} {path} must hold a JSON {'object' if kind is dict else kind.__name__}, "
                        f"got {type(value).__name__}")
    return value


def json_objects(path: str) -> Iterator[Tuple[int, dict]]:
    """(line number, object) per non-blank line of a UTF-8 JSONL file; a line that is not a JSON
    object is an error naming the line."""
    try:
        with open_text(path, "JSONL file") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path} line {number} is not JSON ({err.msg})") from None
                if not isinstance(value, dict):
                    raise UserError(f"{path} line {number} must be a JSON object, got {type(value).__name__}")
                yield number, value
    except UnicodeDecodeError as err:
        raise _decode_error(path, err) from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def typed_fields(values: dict, types: dict, where: str) -> None:
    """Each key of ``types`` present in ``values`` must have that type (bool is not an int)."""
    for key, kind in types.items():
        if key in values:
            value = values[key]
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise UserError(f"{where}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def check_output_path(flag: str, path: str, directory: bool = False) -> None:
    """Before any work: ``path`` can be created where it is named. Its nearest existing ancestor
    must be a writable directory (not a regular file, not read-only), and a file output must not
    name an existing directory."""
    full = os.path.abspath(path)
    if not directory and os.path.isdir(full):
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if directory and os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{flag} {path} is a file, not a directory")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise UserError(f"{flag} {path}: {full if os.path.exists(full) else parent} is not writable")
    try:  # access() says yes to root, and on file systems like /proc that create nothing: try it
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create anything in {parent} "
                        f"({os.strerror(err.errno).lower()})") from None


def publish(tmp: str, path: str) -> None:
    """Move a finished temporary file to ``path`` unless ``path`` appeared meanwhile (another run
    writing the same output): a hard link never replaces an existing file, os.replace would."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} was created by another process while this run wrote it; "
                        "this run's output is discarded") from None
    finally:
        os.remove(tmp)


def remove_stale_temps(pattern: str) -> None:
    """Remove temporary outputs matching ``pattern`` (a glob ending in ``.tmp-*``, the suffix being
    the writer's PID) whose writer no longer runs: debris of a run killed by SIGKILL."""
    for path in glob.glob(pattern):
        pid = path.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def full_disk(err: BaseException, path: str) -> Optional[OSError]:
    """The full disk behind ``err``, a failure while writing ``path``, as an ENOSPC OSError naming
    ``path`` (run_cli's one line); None when it is something else. torch.save's zip writer and
    safetensors report a short write as RuntimeError or SafetensorError, so a failure with
    (almost) no space left where ``path`` lives counts as the full disk it is. Call it before
    the failed write's temporaries are removed, which frees the space again."""
    if not isinstance(err, Exception) or (isinstance(err, OSError) and err.errno != errno.ENOSPC):
        return None  # signals, and OSErrors with their own cause
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if isinstance(err, OSError) or shutil.disk_usage(folder).free < 2 ** 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return None


@contextlib.contextmanager
def full_disk_named(path: str):
    """A failure inside the block that is a full disk (:func:`full_disk`) is raised as the ENOSPC
    naming ``path``; anything else as it is. Enter it inside the block that removes the
    temporaries, so the space is still used up when it looks."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  (re-raised, as the full disk it may be)
        disk = full_disk(err, path)
        if disk is None:
            raise
        raise disk from None


def make_parents(folder: str) -> list:
    """Create ``folder`` and its missing parents; the ones created, outermost first (for
    :func:`remove_folders` when the run fails or is signalled)."""
    missing = []
    while not os.path.exists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    for path in missing:
        os.mkdir(path)
    return missing


def remove_folders(created: list) -> None:
    """Remove the (empty) folders :func:`make_parents` created, innermost first."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
