"""ratplus-pretrain: joint training, resume, atomic saves, the CLI path and bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import repo_env, torchrun
from megatron_ratplus import checkpoint
from megatron_ratplus.cli import pretrain as pretrain_cli
from megatron_ratplus.training import schedule
from megatron_ratplus.training import loop
from megatron_ratplus.training import pretrain

MICRO = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "2", "--eval-interval", "0",
         "--no-progress-bar", "--lr", "1e-2"]


@pytest.fixture
def recorded_steps(monkeypatch):
    """Record every train_step: its pattern, the loss, and the optimizer's update count around it."""
    calls = []
    real = loop.train_step

    def spy(model_chunks, optimizer, microbatches, seq_length, pattern):
        before = optimizer.step_count()
        result = real(model_chunks, optimizer, microbatches, seq_length, pattern)
        calls.append({"pattern": str(pattern), "loss": result["loss"], "before": before,
                      "after": optimizer.step_count(), "tokens": microbatches[0]["tokens"].clone()})
        return result

    monkeypatch.setattr(loop, "train_step", spy)
    return calls


def test_joint_training_takes_sparse_then_dense_step(tmp_path, recorded_steps):
    pretrain(MICRO + ["--train-iters", "2", "--save", str(tmp_path / "ck")])
    assert [c["pattern"] for c in recorded_steps] == ["dilated:64", "dense"] * 2
    assert [c["after"] - c["before"] for c in recorded_steps] == [1, 1, 1, 1]
    assert recorded_steps[-1]["after"] == 4  # two optimizer updates per iteration
    # both steps of an iteration see the same micro-batches
    assert torch.equal(recorded_steps[0]["tokens"], recorded_steps[1]["tokens"])
    assert not torch.equal(recorded_steps[0]["tokens"], recorded_steps[2]["tokens"])


def test_no_joint_training_is_one_dense_step(tmp_path, recorded_steps):
    ck = str(tmp_path / "ck")  # --load SAVE --save SAVE starts fresh when SAVE holds no checkpoint yet
    pretrain(MICRO + ["--train-iters", "2", "--no-joint-training", "--save", ck, "--load", ck])
    assert [c["pattern"] for c in recorded_steps] == ["dense", "dense"]


def test_slurm_examples_use_known_flags():
    from megatron_ratplus.training.arguments import build_parser

    known = {s for action in build_parser()._actions for s in action.option_strings}
    launcher = {"--kill-on-bad-exit=1", "--chdir=REPO", "--container-image", "--container-mounts", "--container-workdir",
                "--*"}
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "slurm")
    # rank.sh only passes its arguments on (exec) and names no flag of its own
    scripts = [f for f in os.listdir(folder) if f.endswith((".sbatch", ".sh")) and f != "rank.sh"]
    assert len(scripts) >= 4
    for name in scripts:
        text = open(os.path.join(folder, name)).read()
        assert subprocess.run(["bash", "-n", os.path.join(folder, name)]).returncode == 0, name
        flags = {tok for line in text.splitlines() if not line.lstrip().startswith("#")
                 for tok in line.replace("(", " ").replace(")", " ").split() if tok.startswith("--")}
        assert flags and flags - launcher <= known, (name, flags - launcher - known)


def test_resume_equals_uninterrupted(tmp_path, recorded_steps):
    full = pretrain(MICRO + ["--train-iters", "4", "--save-interval", "2", "--save", str(tmp_path / "a")])
    uninterrupted = [c["loss"] for c in recorded_steps]
    recorded_steps.clear()
    # a run stopped after iteration 2: only the iteration-2 checkpoint exists
    resume_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "iter_0000002", resume_dir / "iter_0000002")
    (resume_dir / "latest").write_text("iter_0000002")
    resumed = pretrain(MICRO + ["--train-iters", "4", "--save", str(resume_dir), "--load", str(resume_dir)])
    assert [c["loss"] for c in recorded_steps] == uninterrupted[4:]  # exact on CPU
    state_a = checkpoint.load_model(full)[0].state_dict()
    state_b = checkpoint.load_model(resumed)[0].state_dict()
    tensors = {k: v for k, v in state_a.items() if isinstance(v, torch.Tensor)}
    assert len(tensors) > 5
    for name, value in tensors.items():
        assert torch.equal(value, state_b[name]), name


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_dir = tmp_path / "ck"
    pretrain(MICRO + ["--train-iters", "1", "--save", str(save_dir)])
    good = checkpoint.latest_checkpoint(str(save_dir))

    def crash(state, directory, *args, **kwargs):
        with open(os.path.join(directory, "__0_0.distcp"), "w") as f:
            f.write("partial")
        raise KeyboardInterrupt  # the process dies mid-save

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(MICRO + ["--train-iters", "2", "--save", str(save_dir), "--load", str(save_dir),
                          "--override-opt_param-scheduler"])
    assert checkpoint.latest_checkpoint(str(save_dir)) == good
    assert not os.path.exists(save_dir / "iter_0000002")
    model, config, _ = checkpoint.load_model(str(save_dir))
    assert config.hidden_size == 32


def test_single_nan_step_is_skipped_and_repeated_nans_stop(tmp_path, monkeypatch, capsys):
    real = schedule.forward_step
    poison = {"calls": 0, "bad": lambda n: False}

    def forward(data_iterator, model):
        output, loss_func = real(data_iterator, model)
        if model.training:
            poison["calls"] += 1
            if poison["bad"](poison["calls"]):
                output = output * float("nan")
        return output, loss_func

    monkeypatch.setattr(schedule, "forward_step", forward)
    save_dir = tmp_path / "ck"
    # 2 micro-batches per step, 2 steps per iteration: calls 7-8 are iteration 2's dense step
    poison["bad"] = lambda n: n in (7, 8)
    last = pretrain(MICRO + ["--train-iters", "3", "--save-interval", "2", "--save", str(save_dir)])
    common = torch.load(os.path.join(last, "common.pt"), weights_only=False)
    assert common["nan_skipped"] == 1 and last.endswith("iter_0000003")

    poison["calls"], poison["bad"] = 0, lambda n: True
    rc = pretrain_cli.main(MICRO + ["--train-iters", "9", "--save", str(save_dir), "--load", str(save_dir),
                                    "--override-opt_param-scheduler"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "non-finite" in err[-1] and "iter_0000003" in err[-1], err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"))
    events.Reload()
    stops = events.Scalars("train/nan_stop")
    assert [(e.step, e.value) for e in stops] == [(6, 3.0)]  # iterations 4-6 were non-finite: the stop is logged
    assert checkpoint.latest_checkpoint(str(save_dir)).endswith("iter_0000003")
    checkpoint.load_model(str(save_dir))  # still loadable


@pytest.mark.integration
def test_cli_end_to_end_validation_loss_falls(tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ratplus.cli.pretrain", "--num-layers", "2", "--hidden-size", "64",
           "--num-attention-heads", "2", "--seq-length", "64", "--micro-batch-size", "4",
           "--global-batch-size", "8", "--train-iters", "40", "--eval-interval", "20", "--eval-iters", "4",
           "--save", str(save), "--no-progress-bar", "--lr", "3e-3"]
    result = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if "valid/loss_dense" in l]
    losses = [float(l.split("valid/loss_dense ")[1].split()[0]) for l in lines]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    assert "done: 40 iterations" in result.stdout
    assert os.listdir(save / "tensorboard")
    table = subprocess.run([sys.executable, "-m", "megatron_ratplus.cli.eval", "--load", str(save),
                            "--eval-samples", "16", "--patterns", "dense,dilated:4,dilated:16,w=4,p=1"],
                           env=repo_env(), capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in table.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["dense", "dilated:4", "dilated:16,w=4,p=1"]
    assert abs(float(rows[0][1]) - losses[-1]) < 0.5 and all(float(r[2]) > 1 for r in rows)


def test_adaptation_loads_weights_and_trains_at_one_pattern(tmp_path, recorded_steps):
    base = pretrain(MICRO + ["--train-iters", "1", "--save", str(tmp_path / "base")])
    recorded_steps.clear()
    adapted = pretrain(MICRO[:-2] + ["--train-iters", "2", "--adapt-pattern", "dilated:4,w=2,p=1",
                                     "--load", base, "--save", str(tmp_path / "adapt")])
    assert [c["pattern"] for c in recorded_steps] == ["dilated:4,w=2,p=1"] * 2
    assert recorded_steps[0]["before"] == 0  # a fresh optimizer
    meta = checkpoint.read_meta(adapted)
    assert meta["args"]["lr"] == pytest.approx(1e-3) and meta["args"]["lr_warmup_fraction"] == 0.0


def write_indexed(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.mark.integration
def test_indexed_data_and_preprocess_tool(tmp_path, recorded_steps):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document {i} " + "abc " * 40}) for i in range(60)))
    prefix = str(tmp_path / "data" / "docs")
    tool = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "preprocess_data.py")
    done = subprocess.run([sys.executable, tool, "--input", str(corpus), "--output-prefix", prefix],
                          env=repo_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "60 documents" in done.stdout, done.stderr[-2000:]
    again = subprocess.run([sys.executable, tool, "--input", str(corpus), "--output-prefix", prefix],
                           env=repo_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    pretrain(MICRO + ["--train-iters", "2", "--data-path", prefix, "--split", "90,10,0",
                      "--save", str(tmp_path / "ck")])
    assert len(recorded_steps) == 4
    first = recorded_steps[0]["tokens"]
    assert first.max() < 257 and (first == 256).any() or first.min() >= 0


def _bad(args, capsys, needle):
    capsys.readouterr()  # drop output of earlier runs
    rc = pretrain_cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("ratplus-pretrain: error:") and needle in err[0], err


def test_bad_inputs(tmp_path, capsys):
    save = ["--save", str(tmp_path / "ck")]
    _bad(MICRO + ["--data-path", str(tmp_path / "missing")] + save, capsys, "not found")
    write_indexed(str(tmp_path / "big"), [[1, 2, 3] * 20, [400, 5] * 30])
    _bad(MICRO + ["--data-path", str(tmp_path / "big")] + save, capsys, "beyond the vocabulary")
    write_indexed(str(tmp_path / "trunc"), [[1, 2, 3] * 40])
    with open(tmp_path / "trunc.bin", "r+b") as f:
        f.truncate(50)
    _bad(MICRO + ["--data-path", str(tmp_path / "trunc")] + save, capsys, "truncated or corrupt")
    write_indexed(str(tmp_path / "badidx"), [[1, 2, 3] * 40])
    (tmp_path / "badidx.idx").write_bytes(b"garbage index")
    _bad(MICRO + ["--data-path", str(tmp_path / "badidx")] + save, capsys, "not a megatron index")
    _bad(MICRO + ["--global-batch-size", "5"] + save, capsys, "not divisible")
    _bad(MICRO + ["--no-such-flag"] + save, capsys, "unrecognized arguments")
    config = tmp_path / "cfg.yaml"
    config.write_text("train-iters: 2\nwarp_speed: 9\n")
    _bad(MICRO + ["--config", str(config)] + save, capsys, "unknown config key 'warp_speed'")
    (tmp_path / "notackpt").mkdir()
    _bad(MICRO + ["--load", str(tmp_path / "notackpt")] + save, capsys, "not a megatron-ratplus checkpoint")
    _bad(MICRO + ["--attention-pattern", "dilated:0"] + save, capsys, "dilation D must be")
    assert not os.path.exists(tmp_path / "ck")  # nothing written by any of them


def test_shape_mismatch_and_overwrite_refused(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    pretrain(MICRO + ["--train-iters", "1", "--save", ck])
    before = sorted(os.listdir(ck))
    _bad(MICRO + ["--train-iters", "1", "--save", ck], capsys, "refusing to overwrite")
    wider = [a if a != "32" else "48" for a in MICRO]
    _bad(wider + ["--train-iters", "2", "--load", ck, "--save", str(tmp_path / "other")], capsys, "hidden_size 32")
    assert sorted(os.listdir(ck)) == before


def test_yaml_config_with_cli_override(tmp_path, recorded_steps):
    config = tmp_path / "cfg.yaml"
    config.write_text("train_iters: 3\njoint-training: false\n")
    pretrain(MICRO + ["--config", str(config), "--train-iters", "1", "--save", str(tmp_path / "ck")])
    assert [c["pattern"] for c in recorded_steps] == ["dense"]


@pytest.mark.parametrize("flags, needle", [
    (["--tensor-model-parallel-size", "4"], "number of attention heads (2) is not divisible"),
    (["--pipeline-model-parallel-size", "2"], "number of layers (1) is not divisible"),
    (["--context-parallel-size", "4", "--seq-length", "36"], "not divisible by 2 x context-parallel size (8)"),
    (["--tensor-model-parallel-size", "3"], "world size 4 is not a multiple"),
])
def test_bad_parallel_layouts_fail_before_training(tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as on each rank of a 4-process launch
    _bad(MICRO + flags + ["--save", str(tmp_path / "ck")], capsys, needle)
    assert not (tmp_path / "ck").exists()


@pytest.mark.integration
def test_joint_training_under_context_parallel_matches_single_process(tmp_path):
    """One joint iteration (dilated:64 step, dense step) at CP=2 through ratplus-pretrain equals CP=1."""
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "96",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--eval-iters", "1",
             "--eval-interval", "0", "--no-progress-bar", "--sparse-pattern", "dilated:16,w=8,p=2"]
    runs, summaries = {}, {}
    for cp in (1, 2):
        save = tmp_path / f"cp{cp}"
        result = torchrun(cp, "-m", "megatron_ratplus.cli.pretrain", *flags, "--context-parallel-size", cp,
                          "--save", save, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[cp] = checkpoint.load_model(str(save))[0].state_dict()
        summary = [l for l in result.stdout.splitlines() if l.startswith("done:")][-1]
        summaries[cp] = [float(summary.split(f"valid/loss_{n} ")[1].split(",")[0].split(";")[0])
                         for n in ("sparse", "dense")]
    assert summaries[2] == pytest.approx(summaries[1], abs=1e-5)
    tensors = [k for k, v in runs[1].items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 5
    for name in tensors:
        diff = (runs[2][name] - runs[1][name]).abs()
        # AdamW normalises each gradient: where a gradient is ~0, rounding noise can flip the
        # update's sign, so single elements may differ by up to 2 steps of the LR (3e-3)
        assert diff.max() <= 2 * 3e-3 and (diff > 1e-5).float().mean() < 1e-3, name


def test_eval_bad_inputs_are_one_line(tmp_path, capsys):
    from megatron_ratplus.cli import eval as eval_cli

    ck = str(tmp_path / "ck")
    pretrain(MICRO + ["--train-iters", "1", "--save", ck])
    for argv, needle in ((["--load", str(tmp_path / "nothing")], "checkpoint not found"),
                         (["--load", ck, "--patterns", "dense,dilated:0"], "dilation D must be"),
                         (["--load", ck, "--table", str(tmp_path / "t.txt")], "must end in .csv or .json"),
                         (["--load", ck, "--bogus"], "unrecognized arguments")):
        capsys.readouterr()
        assert eval_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ratplus-eval: error:") and needle in err[0], err


def test_training_config_is_built_once_with_derived_values(tmp_path):
    import dataclasses

    from megatron_ratplus.training.arguments import parse_flags
    from megatron_ratplus.training.config import TrainingConfig

    save = str(tmp_path / "ck")
    config = TrainingConfig.from_flags(parse_flags(MICRO[:-2] + ["--train-tokens", "1000", "--save", save,
                                                                 "--load", save]))
    assert config.train_iters == 1000 // (4 * 32) and config.load is None  # --load SAVE on a first run: fresh
    assert config.lr == pytest.approx(3e-3) and config.lr_warmup_fraction == pytest.approx(0.05)
    assert config.ffn_hidden_size == 4 * 32 and config.vocab_size == 384  # the byte vocabulary, padded
    assert config.tensorboard_dir == os.path.join(save, "tensorboard")
    assert config.step_patterns == (("sparse", "dilated:64"), ("dense", "dense"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert json.loads(json.dumps(config.as_record()))["lr"] == config.lr
