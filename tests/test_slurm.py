"""SLURM launch: the YAML run configs, and every sbatch script end to end on a CPU (stand-ins for
srun and scontrol), including a simulated requeue (SIGUSR1, then a second launch that resumes)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

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
                 "#SBATCH --output=%x-%j.out", "#SBATCH --error=%x-%j.err"):
        assert line in text, (script, line)
    assert "$(dirname \"$0\")/common.sh" not in text and "SLURM_SUBMIT_DIR" in text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ("--preset tiny --num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 4 --tensor-model-parallel-size 1 --context-parallel-size 1 "
        "--no-sequence-parallel --no-use-distributed-optimizer --eval-iters 1 --eval-interval 0 --no-progress-bar --split 90,10,0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tiny dataset, and an environment like a submission's, but without SLURM on the PATH."""
    from megatron_ratplus.data.preprocess import build

    root = tmp_path_factory.mktemp("slurm")
    corpus = root / "docs.jsonl"
    text = open(os.path.join(REPO, "README.md")).read()
    corpus.write_text("".join(json.dumps({"text": text[i * 40:i * 40 + 600]}) + "\n" for i in range(150)))
    build([str(corpus)], str(root / "data" / "docs"))
    assert shutil.which("srun") is None, "these tests use the stand-ins for a machine without SLURM"
    env = repo_env()
    env.update(DATA=f"0.5 {root}/data/docs 0.5 {root}/data/docs", TOKENIZER="byte", GPUS_PER_NODE="1",
               PRECISION="", OMP_NUM_THREADS="1")
    env.pop("RATPLUS_HOME", None)
    return root, env


def launch(script, env, run_dir, extra, spool):
    """Run ``script`` as sbatch would: a copy in a spool directory, started from the submit directory."""
    copy = spool / script
    shutil.copy(os.path.join(SLURM, script), copy)
    env = dict(env, RUN_DIR=str(run_dir), SLURM_SUBMIT_DIR=REPO, MASTER_PORT=str(free_port()),
               RATPLUS_OVERRIDES=f"{TINY} {extra}")
    return subprocess.Popen(["bash", str(copy)], cwd=str(spool), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError("the launch did not finish:\n" + out[-3000:])
    return proc.returncode, out


@pytest.mark.slow
def test_sbatch_scripts_end_to_end_with_requeue(cluster, tmp_path):
    root, env = cluster
    spool = tmp_path / "spool"
    spool.mkdir()
    run = tmp_path / "run"
    iterations, tokens = 60, 60 * 4 * 32

    # 1.5B recipe, tiny: SIGUSR1 once the first checkpoint exists -> save, exit 0, requeue.
    first = launch("pretrain_1.5b_100b.sbatch", env, run, f"--train-tokens {tokens} --save-interval 5", spool)
    save = run / "ratplus-1.5b"
    deadline = time.time() + 240
    while not (save / "latest").exists():
        assert first.poll() is None and time.time() < deadline, finish(first)[1][-3000:]
        time.sleep(0.5)
    os.kill(first.pid, signal.SIGUSR1)
    code, out = finish(first)
    assert code == 0, out[-3000:]
    stopped = int(re.search(r"stopped after iteration (\d+) \(received SIGUSR1\)", out).group(1))
    assert 5 <= stopped < iterations and "requeueing job" in out
    assert (run / "requeue.log").read_text().startswith("requeue local-")
    second = launch("pretrain_1.5b_100b.sbatch", env, run, f"--train-tokens {tokens} --save-interval 5", spool)
    code, out = finish(second)
    assert code == 0 and f"done: {iterations - stopped} iterations" in out, out[-3000:]
    assert os.path.basename(os.readlink(save / "latest") if os.path.islink(save / "latest")
                            else (save / "latest").read_text().strip()) == f"iter_{iterations:07d}"

    # The other recipes, tiny, each to its end; the adaptations start from the 1.5B checkpoint.
    env = dict(env, PRETRAINED=str(save))
    for script, extra, done in [
        ("pretrain_2.6b_200b.sbatch", "--train-tokens 384", "done: 3 iterations"),
        ("pretrain_7.6b.sbatch", "--train-tokens 384", "done: 3 iterations"),
        ("adapt_resolution.sbatch", "--train-tokens 256", "done: 2 iterations"),
        ("adapt_long_context_cp.sbatch", "--train-tokens 256", "done: 2 iterations"),
    ]:
        code, out = finish(launch(script, env, run, extra, spool))
        assert code == 0 and done in out, (script, out[-3000:])


def test_sbatch_without_data_is_one_line(cluster, tmp_path):
    _, env = cluster
    env = {k: v for k, v in env.items() if k != "DATA"}
    proc = launch("pretrain_1.5b_100b.sbatch", env, tmp_path / "run", "", tmp_path)
    code, out = finish(proc, timeout=60)
    assert code != 0 and "set DATA to the indexed dataset prefix" in out


def test_sbatch_outside_the_repository_says_so(cluster, tmp_path):
    _, env = cluster
    copy = tmp_path / "job.sbatch"
    shutil.copy(os.path.join(SLURM, "pretrain_1.5b_100b.sbatch"), copy)
    result = subprocess.run(["bash", str(copy)], cwd=str(tmp_path), env=dict(env, SLURM_SUBMIT_DIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "submit from the repository root or set RATPLUS_HOME" in result.stderr
