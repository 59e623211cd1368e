"""Checkpoints under faults: SIGKILL at random points of a save loop, one run per save directory,
corrupt files, per-rank RNG restore.

Training runs are children of a forkserver that has imported the stack once, so a trial costs
the run's start-up and a few iterations, not the imports (~10 s per fresh interpreter here).
"""

import multiprocessing
import os
import random
import shutil
import time

import numpy as np
import pytest
import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.cli import pretrain as pretrain_cli

TINY = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-iters", "1", "--eval-interval", "0",
        "--no-progress-bar", "--lr", "1e-2", "--save-interval", "1"]
TRIALS, SEED = 20, 20261129
TRAIN_ITERS = 30


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["megatron_ratplus.cli.pretrain", "megatron_ratplus.training.loop"])
    warm_up = ctx.Process(target=os.getpid)  # the server imports the stack now, not in a timed run
    warm_up.start()
    warm_up.join()
    return ctx


def start_run(ctx, save_dir, iters=TRAIN_ITERS):
    process = ctx.Process(target=pretrain_cli.main,
                          args=(TINY + ["--train-iters", str(iters), "--save", save_dir, "--load", save_dir],))
    process.start()
    return process


def descendants(pid):
    """Every live process below ``pid`` (from /proc: parent links)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def saving_since(save_dir, start):
    """Whether a save begun after ``start`` is unfinished (its .tmp.* directory is there)."""
    try:
        return any(name.startswith(checkpoint.TMP_PREFIX + "iter")
                   and os.path.getmtime(os.path.join(save_dir, name)) > start for name in os.listdir(save_dir))
    except OSError:  # no save directory yet, or the directory was renamed while we looked
        return False


def checkpoint_iteration(save_dir):
    latest = checkpoint.latest_checkpoint(save_dir)
    return None if latest is None else checkpoint.read_meta(latest)["iteration"]


def model_tensors(path):
    state = checkpoint.load_model(path)[0].state_dict()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_sigkill_during_saves_never_costs_a_checkpoint(tmp_path, forkserver, megatron_single):
    reference_dir, save_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
    started = time.time()
    reference = start_run(forkserver, reference_dir)
    reference.join(timeout=300)
    assert reference.exitcode == 0 and checkpoint_iteration(reference_dir) == TRAIN_ITERS
    # the reference's own timing: start-up until its first save, then the time per iteration
    first = os.path.getmtime(os.path.join(reference_dir, "iter_0000001")) - started
    last = os.path.getmtime(os.path.join(reference_dir, f"iter_{TRAIN_ITERS:07d}"))
    per_iter = (last - started - first) / TRAIN_ITERS

    rng = random.Random(SEED)
    progress, mid_save, children_seen = [], 0, set()
    for trial in range(TRIALS):  # odd trials aim inside a save: SIGKILL within 50 ms of its start
        before, begun = checkpoint_iteration(save_dir) or 0, time.time()
        run = start_run(forkserver, save_dir)
        deadline = begun + rng.uniform(0.5 * first, first + 2 * per_iter) * (1 + trial % 2)
        while time.time() < deadline and run.is_alive():
            children_seen |= descendants(run.pid)
            if trial % 2 and saving_since(save_dir, begun):
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.005)
        run.kill()  # SIGKILL
        run.join()
        mid_save += saving_since(save_dir, begun)
        time.sleep(0.2)
        assert not [pid for pid in children_seen if alive(pid)], "processes outlived the killed run"
        after = checkpoint_iteration(save_dir) or 0
        assert after >= before  # a kill never costs a checkpoint
        if after:
            assert model_tensors(save_dir)  # the newest complete checkpoint loads
        progress.append(after)
    assert progress[-1] > 0 and mid_save >= TRIALS // 4, (progress, mid_save)
    print(f"{TRIALS} SIGKILLs, {mid_save} inside a save; checkpointed iteration after each: {progress}")

    final = start_run(forkserver, save_dir)
    final.join(timeout=300)
    assert final.exitcode == 0 and checkpoint_iteration(save_dir) == TRAIN_ITERS
    assert not [n for n in os.listdir(save_dir) if n.startswith(checkpoint.TMP_PREFIX)]  # debris cleared
    want, got = model_tensors(reference_dir), model_tensors(save_dir)
    assert len(want) > 5
    for name, value in want.items():  # resumed TRIALS times, the run ends where the uninterrupted one does
        assert torch.equal(got[name], value), name


def test_second_run_on_a_save_dir_is_refused_until_the_first_dies(tmp_path, forkserver, megatron_single, capsys):
    save_dir = str(tmp_path / "shared")
    first = start_run(forkserver, save_dir, iters=100000)
    try:
        lock_file = os.path.join(save_dir, checkpoint.LOCK_FILE)
        deadline = time.time() + 120
        while not (os.path.isdir(os.path.join(save_dir, "iter_0000001"))
                   and f"pid {first.pid} " in open(lock_file).read()):
            assert time.time() < deadline and first.is_alive()
            time.sleep(0.05)
        events_before = sorted(os.listdir(os.path.join(save_dir, "tensorboard")))
        rc = pretrain_cli.main(TINY + ["--train-iters", "100000", "--save", save_dir, "--load", save_dir])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "in use by another run" in err[0] and str(first.pid) in err[0], err
        assert sorted(os.listdir(os.path.join(save_dir, "tensorboard"))) == events_before  # wrote nothing there
        assert first.is_alive()
    finally:
        first.kill()  # SIGKILL, as a crash would: the kernel drops its lock
        first.join()
    done_before = checkpoint_iteration(save_dir) or 0
    rc = pretrain_cli.main(TINY + ["--train-iters", str(done_before + 1), "--save", save_dir, "--load", save_dir,
                                   "--override-opt_param-scheduler"])
    assert rc == 0 and checkpoint_iteration(save_dir) == done_before + 1


def test_newest_complete_checkpoint_wins_over_a_lagging_marker(tmp_path, megatron_single):
    save_dir = str(tmp_path / "ck")
    assert pretrain_cli.main(TINY + ["--train-iters", "2", "--save", save_dir]) == 0
    # died after renaming iter_2 into place but before moving the marker; debris of a later save
    (tmp_path / "ck" / "latest").write_text("iter_0000001")
    os.makedirs(tmp_path / "ck" / ".tmp.iter_0000003")
    (tmp_path / "ck" / ".tmp.latest").write_text("iter_0000003")
    assert checkpoint.latest_checkpoint(save_dir).endswith("iter_0000002")
    assert pretrain_cli.main(TINY + ["--train-iters", "3", "--save", save_dir, "--load", save_dir,
                                     "--override-opt_param-scheduler"]) == 0
    assert checkpoint.latest_checkpoint(save_dir).endswith("iter_0000003")
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000003"
    assert not [n for n in os.listdir(save_dir) if n.startswith(checkpoint.TMP_PREFIX)]


def test_resume_restores_this_ranks_rng_state(tmp_path, megatron_single):
    from megatron_ratplus.config import preset
    from megatron_ratplus.model import build_model
    from megatron_ratplus.training.optimizer import TorchOptimizer

    model = build_model(preset("tiny", num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=32,
                               vocab_size=256))
    optimizer = TorchOptimizer([model], 1e-3, 0.0, (0.9, 0.95), 1e-8, 1.0)
    optimizer.init_state()
    torch.rand(3), np.random.rand(3), random.random()  # states that no seed reproduces
    meta = {"model": checkpoint.model_meta(model.config), "tokenizer": "byte", "args": {}}
    path = checkpoint.save(str(tmp_path / "ck"), 1, [model], optimizer, {"iteration": 1}, meta)
    want = (torch.rand(4), np.random.rand(4), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    common = checkpoint.load(path, [model], optimizer)
    assert common["rng_world_size"] == 1 and "rng" not in common
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


@pytest.mark.parametrize("own_writer", [True, False])
def test_save_writes_every_tensor_with_either_writer(tmp_path, megatron_single, monkeypatch, own_writer):
    """Our writer threads (torch 2.13's private per-file writer) and, on a torch whose private API
    differs, torch's own: both write every tensor, and a load gives them back exactly."""
    from megatron_ratplus.config import preset
    from megatron_ratplus.model import build_model

    if not own_writer:
        monkeypatch.setattr(checkpoint, "_WRITER_API", False)
    assert checkpoint._WRITER_API == own_writer
    torch.manual_seed(3)
    model = build_model(preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=32,
                               vocab_size=256))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    meta = {"model": checkpoint.model_meta(model.config), "tokenizer": "byte", "args": {}}
    path = checkpoint.save(str(tmp_path / "ck"), 1, [model], None, {"iteration": 1}, meta)
    with torch.no_grad():
        for value in model.parameters():
            value.normal_()
    checkpoint.load(path, [model], None)
    for key, value in model.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key


def corrupt_checkpoint(tmp_path, how):
    """A copy of a good one-iteration checkpoint with one file damaged."""
    source = str(tmp_path.parent / "good")
    if not os.path.isdir(source):
        assert pretrain_cli.main(TINY + ["--train-iters", "1", "--save", source]) == 0
    target = str(tmp_path / "bad")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(checkpoint.LOCK_FILE, "tensorboard"))
    ckpt = os.path.join(target, "iter_0000001")
    if how == "distcp":
        with open(os.path.join(ckpt, "__0_0.distcp"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    elif how == "metadata":
        with open(os.path.join(ckpt, ".metadata"), "r+b") as f:
            f.truncate(100)
    elif how == "meta_keys":
        with open(os.path.join(ckpt, checkpoint.META_FILE), "w") as f:
            f.write('{"iteration": 1}')
    return target


@pytest.mark.parametrize("how", ["distcp", "metadata", "meta_keys"])
@pytest.mark.parametrize("cli", ["pretrain", "eval"])
def test_corrupt_checkpoint_is_one_line_and_exit_2(tmp_path, how, cli, capsys, megatron_single):
    from megatron_ratplus.cli import eval as eval_cli

    bad = corrupt_checkpoint(tmp_path, how)
    before = {name: os.path.getmtime(os.path.join(bad, name)) for name in os.listdir(bad)}
    capsys.readouterr()
    if cli == "pretrain":
        rc = pretrain_cli.main(TINY + ["--train-iters", "2", "--save", bad, "--load", bad,
                                       "--override-opt_param-scheduler"])
    else:
        rc = eval_cli.main(["--load", bad, "--patterns", "dense", "--eval-samples", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"ratplus-{cli}: error: "), err
    assert "iter_0000001" in err[0] or checkpoint.META_FILE in err[0], err
    assert not os.path.exists(os.path.join(bad, "iter_0000002"))
    assert {name: os.path.getmtime(os.path.join(bad, name)) for name in os.listdir(bad) if name in before} == before
