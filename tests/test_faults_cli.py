"""Signals, full disks and bad LongBench files through the real console scripts and tools, each
run its own process as a user runs it (docs/DESIGN.md §10, README "Reliability").

Every case asserts one line on stderr naming the cause (no traceback, no "Exception ignored"),
the exit status, no temporary debris, the previous good checkpoint intact, and that the next
run works. A signal is sent when the save it aims at is provably under way: the process runs
with tests/slow_write on PYTHONPATH (a test-only sitecustomize that pauses each checkpoint write
after its files are written and drops a marker file), so the signal lands inside the save, not
in a race with it.
"""

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import TESTS, repo_env
from megatron_ratplus import checkpoint
from test_bad_input_cli import COMMANDS, QUICK

SLOW_WRITE = os.path.join(TESTS, "slow_write")
TRAIN = QUICK[2:] + ["--lr", "1e-2"]  # the tiny model; --train-iters comes per case
TRAINING_LOG = re.compile(r"iteration \d+(/\d+ \| |: valid/)")
SIGNALS = [pytest.param(signal.SIGINT, 130, "interrupted", id="SIGINT"),
           pytest.param(signal.SIGTERM, 143, "terminated (SIGTERM)", id="SIGTERM")]


def slow_env(skip: int) -> dict:
    """repo_env with every checkpoint write after the first ``skip`` paused for a minute."""
    env = repo_env()
    env["PYTHONPATH"] = os.pathsep.join([SLOW_WRITE, env["PYTHONPATH"]])
    env["RATPLUS_TEST_SLOW_WRITE"] = f"{skip}:60"
    return env


def run(argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env or repo_env(), capture_output=True, text=True, timeout=timeout)


def one_line(result_or_err, status, *words):
    """Exit ``status`` with exactly one stderr line holding every word, and no traceback; besides
    ratplus-pretrain's training log ("iteration N/M | ...", "iteration N: valid/..."), which a
    run prints on stderr before it is stopped."""
    rc, err = result_or_err if isinstance(result_or_err, tuple) else (result_or_err.returncode, result_or_err.stderr)
    lines = [line for line in err.strip().splitlines() if not TRAINING_LOG.match(line)]
    assert rc == status and len(lines) == 1, (rc, err[-3000:])
    assert all(word in lines[0] for word in words), lines[0]
    assert "Traceback" not in err and "Exception ignored" not in err
    return lines[0]


def signal_when(pattern: str, argv, env, sig, timeout=120):
    """Start ``argv`` in its own session, send ``sig`` once a file matching ``pattern`` exists (to
    the process group for SIGINT, as a terminal's Ctrl-C; to the process for SIGTERM, as kill
    does), and return (exit status, stderr); never hangs past ``timeout``."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not glob.glob(pattern):
            assert proc.poll() is None, f"exited {proc.returncode} before the signal: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("hung after the signal")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, err


def no_temps(folder) -> list:
    """Temporary debris under ``folder``: save dirs' .tmp.* and writers' *.tmp-PID files or folders."""
    return [os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
            for n in dirs + files if n.startswith(checkpoint.TMP_PREFIX) or ".tmp-" in n or n.endswith(".tmp")]


# ---- a signal inside a checkpoint save, and while ratplus-convert writes -----------------------

@pytest.mark.parametrize("sig,status,word", SIGNALS)
def test_signal_inside_a_checkpoint_save(tmp_path, sig, status, word):
    """Iteration 1's save completes; the signal lands inside iteration 2's. The run ends with one
    line and the signal's status, iteration 1 stays the newest checkpoint, no .tmp.iter_* is
    left, and a resume from it finishes the run."""
    save = str(tmp_path / "ck")
    argv = COMMANDS["pretrain"] + TRAIN + ["--train-iters", "2", "--save-interval", "1", "--save", save, "--load", save]
    one_line(signal_when(os.path.join(save, ".tmp.iter_0000002", "slow-write-paused"), argv, slow_env(1), sig),
             status, word)
    assert checkpoint.latest_checkpoint(save) == os.path.join(save, "iter_0000001")
    assert open(os.path.join(save, "latest")).read() == "iter_0000001"
    assert no_temps(save) == []
    resumed = run(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint.latest_checkpoint(save) == os.path.join(save, "iter_0000002") and no_temps(save) == []


def test_sigterm_inside_a_two_rank_save(tmp_path):
    """Two data-parallel ranks started as srun starts them (env:// variables, one process each)
    and both sent SIGTERM, as scancel does, inside iteration 2's save: each rank ends with one
    line and 143, iteration 1 stays the newest checkpoint, no temporary is left, and the two
    ranks then resume and finish the run."""
    import socket

    save = str(tmp_path / "ck")
    argv = COMMANDS["pretrain"] + TRAIN + ["--train-iters", "2", "--save-interval", "1", "--save", save, "--load", save,
                                           "--micro-batch-size", "1"]

    def ranks(env):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        return [subprocess.Popen(argv, env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                            "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
                for rank in (0, 1)]

    def finish(procs):
        try:
            errs = [proc.communicate(timeout=120)[1] for proc in procs]
            return [(proc.returncode, err) for proc, err in zip(procs, errs)]
        except subprocess.TimeoutExpired:
            pytest.fail("a rank hung")
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    procs = ranks(slow_env(1))
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(save, ".tmp.iter_0000002", "slow-write-paused")):
        assert all(proc.poll() is None for proc in procs) and time.monotonic() < deadline, "the save never started"
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for result in finish(procs):
        one_line(result, 143, "terminated (SIGTERM)")
    assert checkpoint.latest_checkpoint(save) == os.path.join(save, "iter_0000001") and no_temps(save) == []
    resumed = finish(ranks(repo_env()))
    assert [rc for rc, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    assert checkpoint.latest_checkpoint(save) == os.path.join(save, "iter_0000002") and no_temps(save) == []


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    import torch

    from test_convert import authors_state

    path = tmp_path_factory.mktemp("authors") / "authors.pt"
    torch.save({"task": authors_state()}, path)
    return str(path)


@pytest.mark.parametrize("sig,status,word", SIGNALS)
def test_signal_while_convert_writes(tmp_path, authors_file, sig, status, word):
    """The signal lands while ratplus-convert writes its checkpoint: one line, the signal's
    status, no output, no temporary directory and no folder the run made; then the same
    conversion succeeds."""
    output = str(tmp_path / "made" / "conv")
    argv = COMMANDS["convert"] + ["--input", authors_file, "--output", output]
    paused = os.path.join(tmp_path, "made", ".conv.tmp-*", ".tmp.iter_0000000", "slow-write-paused")
    one_line(signal_when(paused, argv, slow_env(0), sig), status, word)
    assert os.listdir(tmp_path) == []  # not even the folder "made"
    again = run(argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.listdir(tmp_path / "made") == ["conv"] and checkpoint.read_meta(output)["iteration"] == 0


# ---- a full disk (a small tmpfs) during a checkpoint save and during preprocessing -------------

@pytest.fixture
def small_disk(tmp_path):
    """mount(SIZE) -> a fresh tmpfs of SIZE under tmp_path, unmounted at the end."""
    mounted = []

    def mount(size: str) -> str:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill: {done.stderr.strip() or done.returncode}")
        mounted.append(str(folder))
        return str(folder)

    try:
        yield mount
    finally:
        for folder in mounted:
            subprocess.run(["umount", "-l", folder], capture_output=True)


def test_full_disk_during_a_checkpoint_save(tmp_path, small_disk, megatron_single):
    """600 KiB hold iteration 1's checkpoint (~400 KiB) but not iteration 2's as well: one line
    naming the checkpoint, exit 1, iteration 1 the newest and loadable, no .tmp.iter_*."""
    save = os.path.join(small_disk("600k"), "ck")
    argv = COMMANDS["pretrain"] + TRAIN + ["--train-iters", "2", "--save-interval", "1", "--save", save]
    one_line(run(argv), 1, "ratplus-pretrain: error: no space left on device writing", "iter_0000002")
    assert checkpoint.latest_checkpoint(save) == os.path.join(save, "iter_0000001") and no_temps(save) == []
    assert not os.path.exists(os.path.join(save, "iter_0000002"))
    model, _, _ = checkpoint.load_model(save)
    assert len(model.state_dict()) > 5


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_during_preprocess(tmp_path, small_disk, workers):
    """The output does not fit: one line naming it, exit 1, no .bin/.idx published, no temporary
    file and no folder the run made."""
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"lorem ipsum dolor sit amet {i} " * 10}) + "\n")
    disk = small_disk("64k")
    argv = COMMANDS["preprocess"] + ["--input", str(corpus), "--output-prefix", os.path.join(disk, "out", "pre"),
                                     "--workers", str(workers)]
    one_line(run(argv), 1, "preprocess_data.py: error: no space left on device writing", "pre.bin")
    assert os.listdir(disk) == []


@pytest.mark.parametrize("target", ["ours", "hf", "torch", "authors"])
def test_full_disk_during_convert(tmp_path, small_disk, authors_file, target):
    """The converted model does not fit: one line naming what was being written, exit 1, no
    output and no temporary file or folder left on the disk."""
    disk = small_disk("48k")
    output = os.path.join(disk, "out", "model.pt" if target in ("torch", "authors") else "conv")
    source = authors_file
    if target == "authors":  # ours -> authors: the source is our checkpoint, off the small disk
        source = str(tmp_path / "ours")
        assert run(COMMANDS["convert"] + ["--input", authors_file, "--output", source]).returncode == 0
    argv = COMMANDS["convert"] + ["--input", source, "--output", output, "--to", target]
    one_line(run(argv), 1, "ratplus-convert: error: no space left on device")
    assert os.listdir(disk) == []


# ---- LongBench files through ratplus-eval --longbench --------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("tiny") / "ck")
    done = run(COMMANDS["pretrain"] + TRAIN + ["--train-iters", "1", "--save", save])
    assert done.returncode == 0, done.stderr[-3000:]
    return save


GOOD_SAMPLE = {"context": "some text", "input": "a question", "answers": ["an answer"], "length": 3,
               "all_classes": None}
LONGBENCH_FILES = [  # (id, the file's bytes, words of the one line besides the file name)
    ("latin1", json.dumps({**GOOD_SAMPLE, "context": "caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n",
     ("is not UTF-8",)),
    ("line_is_a_number", (json.dumps(GOOD_SAMPLE) + "\n5\n").encode(), ("line 2", "must be a JSON object, got int")),
    ("answers_a_string", (json.dumps(GOOD_SAMPLE) + "\n" + json.dumps({**GOOD_SAMPLE, "answers": "an answer"})
                          + "\n").encode(), ("line 2", "answers must be list")),
    ("context_a_number", json.dumps({**GOOD_SAMPLE, "context": 5}).encode() + b"\n", ("line 1", "context must be str")),
]


@pytest.mark.parametrize("content,words", [case[1:] for case in LONGBENCH_FILES],
                         ids=[case[0] for case in LONGBENCH_FILES])
def test_bad_longbench_file_is_one_line_naming_it(tmp_path, tiny_checkpoint, content, words):
    (tmp_path / "hotpotqa.jsonl").write_bytes(content)
    before = sorted(os.listdir(tmp_path))
    result = run(COMMANDS["eval"] + ["--load", tiny_checkpoint, "--patterns", "dense", "--longbench", "hotpotqa",
                                     "--longbench-dir", str(tmp_path), "--longbench-samples", "2"])
    line = one_line(result, 2, "ratplus-eval: error: ", str(tmp_path / "hotpotqa.jsonl"), *words)
    assert result.stdout == "" and sorted(os.listdir(tmp_path)) == before, line
