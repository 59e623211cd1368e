"""SLURM launch: the YAML run configs, and every sbatch script end to end on a CPU, submitted with
sbatch to a real single-node SLURM started for these tests (tests/slurm_cluster.py): a job that
completes, SIGUSR1 -> save -> requeue -> resume with the losses of an uninterrupted run, scancel
-> resubmission resumes, concurrent jobs, submission with --chdir from another directory."""

import json
import os
import re
import time
import warnings

import pytest

import slurm_cluster
from conftest import REPO, repo_env
from megatron_ratplus.config import preset
from megatron_ratplus.estimate import Layout, memory_per_gpu
from megatron_ratplus.training.arguments import build_parser, yaml_argv

CONFIGS = os.path.join(REPO, "examples", "configs")
SLURM = os.path.join(REPO, "examples", "slurm")

# config -> (preset, iterations, peak LR, warmup iterations, GPUs of its sbatch script)
EXPECTED = {
    "pretrain_1.5b_100b.yaml": ("1.5b", 47683, 8e-4, 2384, "pretrain_1.5b_100b.sbatch"),
    "pretrain_2.6b_200b.yaml": ("2.6b", 63578, 7e-4, 3179, "pretrain_2.6b_200b.sbatch"),
    "pretrain_7.6b.yaml": ("7.6b", 71525, 4e-4, 3576, "pretrain_7.6b.sbatch"),
    "adapt_resolution.yaml": ("1.5b", 1907, 8e-5, 0, "adapt_resolution.sbatch"),
    "adapt_long_context_cp.yaml": ("1.5b", 953, 8e-5, 0, "adapt_long_context_cp.sbatch"),
}
SHAPES = {"1.5b": (24, 2048, 16), "2.6b": (28, 2560, 20), "7.6b": (32, 4096, 32)}


def load_config(name):
    parser = build_parser()
    return parser.parse_args(yaml_argv(parser, os.path.join(CONFIGS, name)))


def sbatch_gpus(script):
    text = open(os.path.join(SLURM, script)).read()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    return nodes * int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_run_config(name):
    name_preset, iterations, lr, warmup, script = EXPECTED[name]
    args = load_config(name)
    config = preset(args.preset, seq_length=args.seq_length)
    assert args.preset == name_preset
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == SHAPES[name_preset]
    assert args.train_tokens // (args.global_batch_size * args.seq_length) == iterations
    assert args.lr == pytest.approx(lr) and args.min_lr == pytest.approx(1e-6)
    assert int(round(args.lr_warmup_fraction * iterations)) == warmup  # as build_scheduler rounds
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    # The layout fits 80 GB GPUs at the sbatch script's GPU count, and the batch divides evenly.
    gpus = sbatch_gpus(script)
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    layout = Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size,
                    gpus // model_parallel, args.sequence_parallel, args.use_distributed_optimizer)
    assert args.global_batch_size % (args.micro_batch_size * layout.data) == 0
    micro_batches = args.global_batch_size // (args.micro_batch_size * layout.data)
    assert memory_per_gpu(config, layout, args.micro_batch_size, args.seq_length, micro_batches).total < 80e9
    assert os.path.basename(name) in open(os.path.join(SLURM, script)).read()


def test_1_5b_default_layout_would_not_fit():
    """The old script's micro-batch 8 at seq 4096 without recomputation (about 97 GB)."""
    mem = memory_per_gpu(preset("1.5b"), Layout(data=64, distributed_optimizer=True), 8, 4096)
    assert mem.total > 90e9


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(SLURM) if f.endswith(".sbatch")))
def test_sbatch_header(script):
    text = open(os.path.join(SLURM, script)).read()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --cpus-per-task=",
                 "#SBATCH --output=%x-%j.out", "#SBATCH --error=%x-%j.err", "#SBATCH --open-mode=append",
                 "RATPLUS_HOME=${RATPLUS_HOME:-$PWD}"):
        assert line in text, (script, line)
    # one task per GPU: srun starts the training processes themselves (examples/slurm/rank.sh)
    tasks = re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1)
    assert tasks == re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1)
    assert "$(dirname \"$0\")/common.sh" not in text


TINY = ("--preset tiny --num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 4 --tensor-model-parallel-size 1 --context-parallel-size 1 "
        "--no-sequence-parallel --no-use-distributed-optimizer --eval-iters 1 --eval-interval 0 --no-progress-bar "
        "--split 90,10,0 --log-interval 1")
TOKENS_PER_ITERATION = 4 * 32
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, request):
    """The single-node SLURM, installed if missing; the stand-ins only where it cannot run (never in CI)."""
    why_not = slurm_cluster.install()
    if why_not and os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI must test under the real SLURM: {why_not}")
    backend = (slurm_cluster.StandIns if why_not else slurm_cluster.SingleNodeSlurm)(
        str(tmp_path_factory.mktemp("slurm_cluster")))
    banner = f"*** tests/test_slurm.py submits to {backend.kind} ({backend.version}) ***"
    if why_not:
        banner += f" because {why_not}"
        warnings.warn(banner)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(banner, yellow=bool(why_not), bold=True)
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny dataset, and the environment a submission passes on (CPU: no precision flag)."""
    from megatron_ratplus.data.preprocess import build

    root = tmp_path_factory.mktemp("slurm_data")
    corpus = root / "docs.jsonl"
    text = open(os.path.join(REPO, "README.md")).read()
    corpus.write_text("".join(json.dumps({"text": text[i * 40:i * 40 + 600]}) + "\n" for i in range(150)))
    build([str(corpus)], str(root / "data" / "docs"))
    env = {k: v for k, v in repo_env().items() if k != "RATPLUS_HOME"}
    env.update(DATA=f"0.5 {root}/data/docs 0.5 {root}/data/docs", TOKENIZER="byte", PRECISION="",
               OMP_NUM_THREADS="1")
    return env


def submit(slurm, script, env, run_dir, log, extra="", tasks=1, cwd=REPO, chdir=None):
    """sbatch SCRIPT, CPU-sized: TASKS training processes on the one node, no GPUs, the tiny model."""
    env = dict(env, RUN_DIR=str(run_dir), RATPLUS_OVERRIDES=f"{TINY} {extra}")
    args = ["--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1",
            f"--output={log}", f"--error={log}"] + ([f"--chdir={chdir}"] if chdir else [])
    return slurm.sbatch(os.path.join(SLURM, script), env, args, str(cwd))


def read(log):
    return open(log).read() if os.path.exists(log) else ""


def finished(slurm, job_id, log):
    """The job's final scontrol record, and its log."""
    job = slurm.wait(job_id, JOB_TIMEOUT)
    text = read(log)
    assert job.get("JobState") in slurm_cluster.FINAL, (job, text[-3000:])
    return job, text


def wait_for_checkpoint(slurm, job_id, save, log):
    """Block until SAVE holds a checkpoint, while the job still runs."""
    deadline = time.time() + JOB_TIMEOUT
    while not (save / "latest").exists():
        job = slurm.job(job_id)
        if job["JobState"] not in ("PENDING", "RUNNING") or time.time() > deadline:
            raise AssertionError(f"no checkpoint from job {job_id}: {job}\n{read(log)[-3000:]}")
        time.sleep(0.2)


def latest(save):
    return (save / "latest").read_text().strip()


def losses(log):
    """Iteration -> the losses of its console line (the last one, if a requeued job logged it twice)."""
    return dict(re.findall(r"^iteration (\d+)/\d+ \| (loss.*?) \| lr", log, re.M))


def overlapped(a, b):
    """Whether two finished jobs ran at the same time (scontrol's times, to the second)."""
    return a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"]


ITERATIONS = 150  # enough that a signal sent after the first checkpoint lands well before the end


@pytest.mark.integration
def test_complete_and_requeue_on_sigusr1_concurrently(slurm, data, tmp_path):
    """Two jobs of the 1.5B recipe at once, one submitted from another directory with --chdir.
    The first runs to its end; the second gets SIGUSR1 as --signal=B:USR1@600 would send it,
    saves once, requeues itself and resumes to the end with the first job's losses."""
    extra = f"--train-tokens {ITERATIONS * TOKENS_PER_ITERATION} --save-interval 10"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    logs = {name: str(tmp_path / f"{name}.log") for name in ("whole", "requeued")}
    whole = submit(slurm, "pretrain_1.5b_100b.sbatch", data, tmp_path / "whole", logs["whole"], extra)
    requeued = submit(slurm, "pretrain_1.5b_100b.sbatch", data, tmp_path / "requeued", logs["requeued"], extra,
                      cwd=elsewhere, chdir=REPO)
    save = tmp_path / "requeued" / "ratplus-1.5b"
    wait_for_checkpoint(slurm, requeued, save, logs["requeued"])
    assert slurm.job(whole)["JobState"] == "RUNNING"  # the two jobs run at once
    slurm.signal_batch(requeued, "USR1")

    job, whole_log = finished(slurm, whole, logs["whole"])
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), whole_log[-3000:]
    assert f"done: {ITERATIONS} iterations" in whole_log
    job, log = finished(slurm, requeued, logs["requeued"])
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]

    # saved once, at the iteration it stopped after; requeued once; the log of both runs kept
    stops = re.findall(r"stopped after iteration (\d+) \(received SIGUSR1\); checkpoint (\S+)", log)
    assert len(stops) == 1, log[-3000:]
    stopped = int(stops[0][0])
    assert 10 <= stopped < ITERATIONS and stops[0][1].endswith(f"iter_{stopped:07d}")
    assert log.count("run_training: SIGUSR1: training exited 0; requeueing job") == 1
    assert f"done: {ITERATIONS - stopped} iterations" in log
    assert latest(save) == f"iter_{ITERATIONS:07d}" and not list(save.glob(".tmp.*"))
    # the requeued job's losses, iteration by iteration, and its final validation, are the whole run's
    assert len(losses(whole_log)) == ITERATIONS and losses(log) == losses(whole_log)
    final = r"done: .*?; (valid/.*?); \d+ non-finite"
    assert re.search(final, log).group(1) == re.search(final, whole_log).group(1)


@pytest.mark.integration
def test_scancel_then_resubmission_resumes(slurm, data, tmp_path):
    """scancel (SIGTERM to every task, SIGKILL after KillWait): the two ranks finish the iteration
    and save within the grace time; a resubmission resumes from that newest checkpoint."""
    extra = f"--train-tokens {ITERATIONS * TOKENS_PER_ITERATION} --save-interval 10"
    run, save = tmp_path / "run", tmp_path / "run" / "ratplus-1.5b"
    first_log, second_log = str(tmp_path / "first.log"), str(tmp_path / "second.log")
    first = submit(slurm, "pretrain_1.5b_100b.sbatch", data, run, first_log, extra, tasks=2)
    wait_for_checkpoint(slurm, first, save, first_log)
    slurm.cancel(first)
    job, log = finished(slurm, first, first_log)
    assert job["JobState"] == "CANCELLED", log[-3000:]
    stopped = int(re.search(r"stopped after iteration (\d+) \(received SIGTERM\)", log).group(1))
    assert 10 <= stopped < ITERATIONS and latest(save) == f"iter_{stopped:07d}"

    second = submit(slurm, "pretrain_1.5b_100b.sbatch", data, run, second_log, extra, tasks=2)
    job, log = finished(slurm, second, second_log)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert f"done: {ITERATIONS - stopped} iterations" in log and min(map(int, losses(log))) == stopped + 1
    assert latest(save) == f"iter_{ITERATIONS:07d}" and not list(save.glob(".tmp.*"))


@pytest.mark.integration
def test_other_recipes_two_at_a_time(slurm, data, tmp_path):
    """The other recipes, tiny, each to its end, two jobs at once on the node; the adaptations
    start from a pretrained checkpoint."""
    pretrained = tmp_path / "pretrained"
    job_id = submit(slurm, "pretrain_1.5b_100b.sbatch", data, pretrained, str(tmp_path / "p.log"),
                    "--train-tokens 256")
    job, log = finished(slurm, job_id, str(tmp_path / "p.log"))
    assert job["JobState"] == "COMPLETED", log[-3000:]
    env = dict(data, PRETRAINED=str(pretrained / "ratplus-1.5b"))
    for pair in ([("pretrain_2.6b_200b.sbatch", 384), ("pretrain_7.6b.sbatch", 384)],
                 [("adapt_resolution.sbatch", 256), ("adapt_long_context_cp.sbatch", 256)]):
        logs = [str(tmp_path / f"{script}.log") for script, _ in pair]
        jobs = [submit(slurm, script, env, tmp_path / "run", log, f"--train-tokens {tokens}")
                for (script, tokens), log in zip(pair, logs)]
        done = [finished(slurm, j, log) for j, log in zip(jobs, logs)]
        for (script, tokens), (job, log) in zip(pair, done):
            assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (script, log[-3000:])
            assert f"done: {tokens // TOKENS_PER_ITERATION} iterations" in log, (script, log[-3000:])
        if slurm.kind.startswith("real"):
            assert overlapped(done[0][0], done[1][0]), [job for job, _ in done]


@pytest.mark.integration
def test_sbatch_without_data_is_one_line(slurm, data, tmp_path):
    env = {k: v for k, v in data.items() if k != "DATA"}
    log = str(tmp_path / "job.log")
    job, text = finished(slurm, submit(slurm, "pretrain_1.5b_100b.sbatch", env, tmp_path / "run", log), log)
    assert job["JobState"] == "FAILED" and "set DATA to the indexed dataset prefix" in text


@pytest.mark.integration
def test_sbatch_outside_the_repository_says_so(slurm, data, tmp_path):
    log = str(tmp_path / "job.log")
    job_id = submit(slurm, "pretrain_1.5b_100b.sbatch", data, tmp_path / "run", log, cwd=tmp_path)
    job, text = finished(slurm, job_id, log)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0")
    assert "cannot find examples/slurm/common.sh" in text and "or set RATPLUS_HOME" in text
