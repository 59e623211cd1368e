"""Early exits with a checkpoint: --exit-signal-handler, --exit-duration-in-mins, --exit-interval."""

import os
import signal

import pytest

from megatron_ratplus import checkpoint
from megatron_ratplus.cli import pretrain as pretrain_cli
from megatron_ratplus.training import loop, pretrain
from megatron_ratplus.training.exit import ExitConditions

FLAGS = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "2", "--eval-interval", "0",
         "--no-progress-bar", "--lr", "1e-2", "--train-iters", "5"]


@pytest.fixture
def steps(monkeypatch):
    """Record each train_step's loss; ``signal_at[n]`` sends that signal to this process during step n."""
    record = {"losses": [], "signal_at": {}}
    real = loop.train_step

    def spy(*args):
        n = len(record["losses"])
        if n in record["signal_at"]:
            os.kill(os.getpid(), record["signal_at"][n])
        result = real(*args)
        record["losses"].append(result["loss"])
        return result

    monkeypatch.setattr(loop, "train_step", spy)
    return record


def test_sigterm_saves_exits_0_and_resume_matches(tmp_path, capsys, steps):
    sig = signal.SIGTERM
    before = signal.getsignal(sig)
    uninterrupted = str(tmp_path / "full")
    assert pretrain_cli.main(FLAGS + ["--save", uninterrupted]) == 0
    full_losses = list(steps["losses"])
    steps["losses"].clear()

    save = str(tmp_path / "run")
    steps["signal_at"] = {2: sig}  # during iteration 2's sparse step (two steps per iteration)
    assert pretrain_cli.main(FLAGS + ["--save", save, "--load", save, "--exit-signal-handler"]) == 0
    out = capsys.readouterr().out
    assert f"stopped after iteration 2 (received {signal.Signals(sig).name})" in out
    assert checkpoint.latest_checkpoint(save).endswith("iter_0000002")
    assert len(steps["losses"]) == 4  # iteration 2 was finished, both steps
    assert signal.getsignal(sig) == before  # the run's handler is gone with the run

    steps["signal_at"] = {}
    assert pretrain_cli.main(FLAGS + ["--save", save, "--load", save, "--exit-signal-handler"]) == 0
    assert checkpoint.latest_checkpoint(save).endswith("iter_0000005")
    assert steps["losses"] == pytest.approx(full_losses, rel=1e-6, abs=1e-7)


def test_without_the_flag_a_signal_is_not_caught(tmp_path, steps):
    previous = signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        steps["signal_at"] = {1: signal.SIGUSR1}
        with pytest.raises(KeyboardInterrupt):
            pretrain(FLAGS + ["--save", str(tmp_path / "ck")])
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("flags, iteration, needle", [
    (["--exit-interval", "3"], 3, "--exit-interval 3 reached"),
    (["--exit-duration-in-mins", "1e-9"], 1, "--exit-duration-in-mins 1e-09 reached"),
    (["--exit-interval", "2", "--save-interval", "2"], 2, "--exit-interval 2 reached"),
])
def test_interval_and_duration(tmp_path, capsys, steps, flags, iteration, needle):
    save = str(tmp_path / "ck")
    assert pretrain_cli.main(FLAGS + ["--save", save] + flags) == 0
    assert needle in capsys.readouterr().out
    assert checkpoint.latest_checkpoint(save).endswith(f"iter_{iteration:07d}")
    assert len(steps["losses"]) == 2 * iteration


@pytest.mark.parametrize("flags, needle", [
    (["--exit-interval", "0"], "argument --exit-interval: must be an integer >= 1"),
    (["--exit-duration-in-mins", "-1"], "argument --exit-duration-in-mins: must be a number > 0"),
])
def test_bad_exit_flags(tmp_path, capsys, flags, needle):
    assert pretrain_cli.main(FLAGS + ["--save", str(tmp_path / "ck")] + flags) == 2
    assert needle in capsys.readouterr().err


def test_conditions_without_a_run():
    assert ExitConditions().reason(1) is None
    with ExitConditions(signal_handler=True) as exits:
        assert exits.reason(1) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits.reason(2) == "received SIGTERM"
    with ExitConditions(signal_handler=True) as exits:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert exits.reason(1) == "received SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert ExitConditions(interval=4).reason(8) == "--exit-interval 4 reached"
    assert ExitConditions(interval=4).reason(6) is None


def test_repeated_signals_are_one_request():
    """A cluster may deliver a stop request twice (srun's fan-out, SIGTERM at the time limit while
    the SIGUSR1 save runs): the run still finishes its iteration and saves; the earlier handler
    never runs, and it is back in place afterwards."""
    caught = []
    term_before = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGUSR1, lambda *_: caught.append("outer"))
    try:
        with ExitConditions(signal_handler=True) as exits:
            assert exits.reason(1) is None
            for sig in (signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM):
                os.kill(os.getpid(), sig)
            assert exits.reason(2) == "received SIGUSR1" and not caught
        os.kill(os.getpid(), signal.SIGUSR1)
        assert caught == ["outer"] and signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGUSR1, previous)
