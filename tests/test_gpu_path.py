"""The GPU training path, checked on CPU: every batch and collective tensor on the rank's device,
bf16 through megatron's Float16Module with fp32 main weights, is_loading on resume, megatron's
DistributedOptimizer saved and resumed on CPU, GPU flag validation (mxfp8's compute capability,
CUDA_DEVICE_MAX_CONNECTIONS), parameter placement, throughput/memory logging at --log-interval,
and --dry-run."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.module import Float16Module

from megatron_ratplus import checkpoint, distributed, optional, precision
from megatron_ratplus.cli import pretrain as pretrain_cli
from megatron_ratplus.config import model_config
from megatron_ratplus.errors import UserError
from megatron_ratplus.flops import iteration_flops
from megatron_ratplus.model import build_model
from megatron_ratplus.training import loop, pretrain, schedule, steps, throughput
from megatron_ratplus.training.arguments import parse_flags
from megatron_ratplus.training.config import TrainingConfig
from megatron_ratplus.training.exit import ExitConditions
from megatron_ratplus.training.optimizer import MegatronOptimizerAdapter, TorchOptimizer

from conftest import torchrun

MICRO = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "2", "--eval-interval", "0",
         "--no-progress-bar", "--lr", "1e-2"]
META = torch.device("meta")


class _Stop(Exception):
    """Raised by a spy once it has seen what the test needs."""


def _batch(generator):
    tokens = torch.randint(0, 256, (2, 32), generator=generator)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.rand(2, 32, generator=generator),
            "position_ids": torch.arange(32).expand(2, 32).clone()}


def test_batch_is_moved_to_the_rank_device_before_the_model(megatron_single, monkeypatch):
    """A CPU-built batch reaches the model on distributed.device() (here a fake 'meta' device)."""
    monkeypatch.setattr(distributed, "device", lambda: META)
    seen = []

    def model(*args, **kwargs):
        seen.extend(t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        return torch.zeros(2, 32, device=META)

    output, loss_func = schedule.forward_step(iter([_batch(torch.Generator().manual_seed(1))]), model)
    assert len(seen) == 3 and all(d == META for d in seen), seen  # tokens, position ids, labels
    assert output.device == META and loss_func.args[0].device == META  # the loss mask too


@pytest.mark.parametrize("path", ["pipeline loss", "exit conditions"])
def test_collectives_we_issue_take_rank_device_tensors(megatron_single, monkeypatch, path):
    """Each collective the project issues itself gets a tensor on distributed.device()."""
    monkeypatch.setattr(distributed, "device", lambda: META)
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Stop

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(_Stop):
        if path == "pipeline loss":
            monkeypatch.setattr(schedule, "forward_backward", lambda *a, **k: 2.5)
            steps._run([], [_batch(torch.Generator().manual_seed(2))], 32, forward_only=True)
        else:
            monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
            ExitConditions(interval=3).reason(3)
    assert seen == [META]


def test_training_run_keeps_model_inputs_and_collectives_on_the_rank_device(tmp_path, monkeypatch):
    """A whole run (train, evaluate, save): every tensor reaching GPTModel and every collective is
    on distributed.device(); on this machine that is the CPU the gloo group reduces on."""
    checked = {"model": 0, "collective": 0}

    def on_device(tensors, what):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                assert t.device == distributed.device(), (what, t.device)
                checked[what] += 1

    real_forward = GPTModel.forward

    def forward(self, *args, **kwargs):
        on_device([*args, *kwargs.values()], "model")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(GPTModel, "forward", forward)
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        real = getattr(dist, name)

        def collective(*args, _real=real, **kwargs):
            flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else [a])]
            on_device(flat, "collective")
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, collective)
    pretrain(MICRO + ["--train-iters", "1", "--eval-interval", "1", "--save", str(tmp_path / "ck")])
    assert checked["model"] >= 4 and checked["collective"] >= 4, checked


@pytest.fixture
def recorded(monkeypatch):
    """Every train_step's loss, model chunks and optimizer."""
    calls = []
    real = loop.train_step

    def spy(model_chunks, optimizer, microbatches, seq_length, pattern):
        result = real(model_chunks, optimizer, microbatches, seq_length, pattern)
        calls.append(dict(loss=result["loss"], chunks=model_chunks, optimizer=optimizer))
        return result

    monkeypatch.setattr(loop, "train_step", spy)
    return calls


def test_bf16_on_cpu_wraps_float16module_keeps_fp32_main_weights_and_tracks_fp32(tmp_path, recorded):
    run = MICRO + ["--train-iters", "4", "--no-joint-training", "--lr-warmup-fraction", "0"]
    pretrain(run + ["--save", str(tmp_path / "fp32")])
    fp32 = [c["loss"] for c in recorded]
    recorded.clear()
    pretrain(run + ["--bf16", "--save", str(tmp_path / "bf16")])
    bf16 = [c["loss"] for c in recorded]
    chunk, optimizer = recorded[-1]["chunks"][0], recorded[-1]["optimizer"]
    assert isinstance(chunk.module, Float16Module)
    assert all(p.dtype == torch.bfloat16 for p in chunk.parameters())
    assert isinstance(optimizer, TorchOptimizer)
    assert all(m.dtype == torch.float32 and m is not p for m, p in zip(optimizer.params, optimizer.model_params))
    for main, param in zip(optimizer.params, optimizer.model_params):  # bf16 weights = rounded main weights
        torch.testing.assert_close(param, main.to(torch.bfloat16), rtol=0, atol=0)
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.02, atol=0)


def test_bf16_resume_equals_uninterrupted_and_loads_with_is_loading(tmp_path, recorded, monkeypatch):
    """The fp32 main weights and moments come back, so a resumed bf16 run equals the uninterrupted
    one; the load asks the optimizer for its sharded state with is_loading=True (megatron's
    distributed optimizer needs it to describe its Adam moments), the saves without."""
    calls = []
    real = TorchOptimizer.sharded_state_dict

    def spy(self, model_sharded_state_dict, is_loading=False, metadata=None):
        calls.append(is_loading)
        assert metadata == checkpoint.SHARDED_METADATA
        return real(self, model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    monkeypatch.setattr(TorchOptimizer, "sharded_state_dict", spy)
    whole, resumed = _resume_at_iteration_2(tmp_path, recorded, ["--bf16"])
    assert calls == [False, False, True, False]
    assert resumed == whole[2:]


def _resume_at_iteration_2(tmp_path, recorded, flags):
    """Losses of a 4-iteration run saving at 2, and of a run resumed from that checkpoint."""
    run = MICRO + ["--train-iters", "4", "--no-joint-training", *flags]
    pretrain(run + ["--save-interval", "2", "--save", str(tmp_path / "a")])
    whole = [c["loss"] for c in recorded]
    resume = tmp_path / "b"
    resume.mkdir()
    (tmp_path / "a" / "iter_0000002").rename(resume / "iter_0000002")
    (resume / "latest").write_text("iter_0000002")
    recorded.clear()
    pretrain(run + ["--save", str(resume), "--load", str(resume)])
    return whole, [c["loss"] for c in recorded]


def test_megatron_optimizer_adapter_passes_is_loading():
    class Inner:
        def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
            return {"is_loading": is_loading, "metadata": metadata}

    adapter = MegatronOptimizerAdapter(Inner(), [])
    metadata = dict(checkpoint.SHARDED_METADATA)
    assert adapter.sharded_state_dict({}, is_loading=True, metadata=metadata) == {"is_loading": True,
                                                                                  "metadata": metadata}
    assert adapter.sharded_state_dict({}) == {"is_loading": False, "metadata": None}


@pytest.mark.parametrize("flags, needle", [
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine needs transformer_engine"),
    (["--fp8-format", "e4m3", "--bf16"], "--fp8-format needs transformer_engine"),
    (["--fp8-format", "hybrid"], "--fp8-format needs --bf16"),
    (["--fp8-format", "e4m3", "--bf16", "--transformer-impl", "local"], "needs --transformer-impl transformer_engine"),
    (["--fp8-param-gather"], "--fp8-param-gather needs --fp8-format"),
    (["--recompute-method", "uniform"], "apply only with --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], "apply only with"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "0"],
     "argument --recompute-num-layers: must be an integer >= 1"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather needs GPUs"),
    (["--overlap-grad-reduce"], "--overlap-grad-reduce needs GPUs"),
    (["--dataloader-type", "dali"], "--dataloader-type dali needs nvidia.dali"),
    (["--gpu-memory-gb", "0"], "argument --gpu-memory-gb: must be a number > 0"),
])
def test_gpu_flags_refused_in_one_line_before_any_process_group(tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(distributed, "initialize", lambda *a, **k: pytest.fail("a process group was started"))
    capsys.readouterr()
    rc = pretrain_cli.main(MICRO + flags + ["--save", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("ratplus-pretrain: error:") and needle in err[0], err


def test_fp8_on_cpu_refused_even_with_transformer_engine_installed(tmp_path, capsys, monkeypatch):
    real = optional.optional_import
    monkeypatch.setattr(optional, "optional_import",
                        lambda name: object() if name == "transformer_engine" else real(name))
    rc = pretrain_cli.main(MICRO + ["--fp8-format", "e4m3", "--bf16", "--save", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--fp8-format needs a CUDA GPU" in err[0], err


def test_gpu_flags_reach_megatron_configs(tmp_path):
    config = TrainingConfig.from_flags(parse_flags(MICRO + [
        "--bf16", "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
        "--save", str(tmp_path / "ck")]))
    model = config.model_config()
    assert config.transformer_impl == "local"  # no TE here
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == ("full", "block", 1)
    assert model.bf16 and model.params_dtype == torch.bfloat16 and model.pipeline_dtype == torch.bfloat16
    assert not model.fp8


def _throughput_run(tmp_path, monkeypatch, capsys, log_interval, iters=4):
    ticks = iter(range(10_000))
    monkeypatch.setattr(throughput, "_clock", lambda: 0.25 * next(ticks))  # every begin/end 0.25 s apart
    logged = {}
    real_log = loop.Metrics.log
    monkeypatch.setattr(loop.Metrics, "log",
                        lambda self, iteration, scalars: (logged.setdefault(iteration, {}).update(scalars),
                                                          real_log(self, iteration, scalars)))
    flags = MICRO + ["--train-iters", str(iters), "--log-interval", str(log_interval), "--save", str(tmp_path / "ck")]
    capsys.readouterr()
    pretrain(flags)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("iteration ") and " | " in line]
    return flags, logged, lines


def test_logged_throughput_is_flops_times_iterations_over_time(tmp_path, monkeypatch, capsys):
    flags, logged, _ = _throughput_run(tmp_path, monkeypatch, capsys, log_interval=2)
    config = TrainingConfig.from_flags(parse_flags(flags[:-1] + [str(tmp_path / "other")]))
    tokens = config.global_batch_size * config.seq_length
    flops = iteration_flops(config.model_config(), ["dilated:64", "dense"], tokens, config.seq_length)
    assert flops > 0
    for iteration in (2, 4):  # two iterations of 0.25 s each per interval
        scalars = logged[iteration]
        assert scalars["train/tokens_per_s"] == pytest.approx(2 * tokens / 0.5)
        assert scalars["train/tflops_per_gpu"] == pytest.approx(2 * flops / 0.5 / 1e12)
        assert scalars["train/memory_peak_rss_gb"] > 0
    assert "train/tokens_per_s" not in logged[1] and "train/tokens_per_s" not in logged[3]


@pytest.mark.parametrize("interval, expected", [(1, [1, 2, 3, 4]), (2, [2, 4]), (3, [3, 4])])
def test_log_interval_sets_console_line_cadence(tmp_path, monkeypatch, capsys, interval, expected):
    _, _, lines = _throughput_run(tmp_path, monkeypatch, capsys, log_interval=interval)
    assert [int(line.split()[1].split("/")[0]) for line in lines] == expected, lines
    assert all("tokens/s" in line and "TFLOP/s/GPU" in line and "peak rss" in line and "loss_dense" in line
               for line in lines), lines


def test_dry_run_reports_and_exits_2_when_the_layout_does_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distributed, "initialize", lambda *a, **k: pytest.fail("a process group was started"))
    save = ["--save", str(tmp_path / "ck")]
    # GPU flags are planned, not refused, on a machine without GPUs
    assert pretrain_cli.main(MICRO + ["--dry-run", "--bf16", "--use-distributed-optimizer"] + save) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "memory per GPU" in out and "of 80" in out
    big = ["--num-layers", "48", "--hidden-size", "8192", "--num-attention-heads", "64", "--seq-length", "8192",
           "--micro-batch-size", "8", "--global-batch-size", "8"]
    assert pretrain_cli.main(big + ["--dry-run"] + save) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds 80 GB" in err[0], err
    assert pretrain_cli.main(big + ["--dry-run", "--gpu-memory-gb", "1e6"] + save) == 0
    assert not (tmp_path / "ck").exists()


def test_distributed_optimizer_save_and_resume_on_cpu(tmp_path, recorded):
    """ratplus-pretrain --use-distributed-optimizer runs megatron's DistributedOptimizer on CPU,
    saves it with the trainer's metadata and resumes it: the resumed run's losses equal the
    uninterrupted run's (Adam moments, main weights and step counts come back)."""
    whole, resumed = _resume_at_iteration_2(tmp_path, recorded, ["--bf16", "--use-distributed-optimizer"])
    optimizer = recorded[-1]["optimizer"]
    assert isinstance(optimizer, MegatronOptimizerAdapter)
    assert isinstance(optimizer.optimizer.chained_optimizers[0], DistributedOptimizer)
    assert resumed == whole[2:]


@pytest.mark.integration
def test_distributed_optimizer_resumes_at_two_data_parallel_ranks_and_at_one(tmp_path):
    """DP=2 under torchrun (gloo reduce-scatters the gradients): a run resumed from its iteration-1
    checkpoint ends with the uninterrupted run's weights, and the same checkpoint resumes at DP=1
    (the dp_reshardable layout lets the data-parallel size change) to the same weights up to
    reduction order."""
    flags = MICRO + ["--train-iters", "2", "--save-interval", "1", "--no-joint-training", "--use-distributed-optimizer"]

    def run(nproc, save_dir):
        result = torchrun(nproc, "-m", "megatron_ratplus.cli.pretrain", *flags, "--save", save_dir,
                          "--load", save_dir, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]

    run(2, tmp_path / "full")
    for name, nproc in (("dp2", 2), ("dp1", 1)):
        shutil.copytree(tmp_path / "full" / "iter_0000001", tmp_path / name / "iter_0000001")
        run(nproc, tmp_path / name)
    weights = {name: checkpoint.load_model(str(tmp_path / name / "iter_0000002"))[0].state_dict()
               for name in ("full", "dp2", "dp1")}
    start = checkpoint.load_model(str(tmp_path / "full" / "iter_0000001"))[0].state_dict()
    keys = [k for k, v in weights["full"].items() if isinstance(v, torch.Tensor)]
    assert len(keys) > 5 and any(not torch.equal(weights["full"][k], start[k]) for k in keys)
    for key in keys:
        assert torch.equal(weights["dp2"][key], weights["full"][key]), key
        torch.testing.assert_close(weights["dp1"][key], weights["full"][key], rtol=1e-4, atol=1e-6)


def test_resume_refuses_a_layout_the_distributed_optimizer_state_cannot_take(tmp_path, capsys):
    """Its state is stored per gradient bucket: only the data-parallel size may change."""
    save = tmp_path / "ck"
    assert pretrain_cli.main(MICRO + ["--train-iters", "1", "--use-distributed-optimizer", "--save", str(save)]) == 0
    capsys.readouterr()
    for flags in (["--tensor-model-parallel-size", "2"], []):
        rc = pretrain_cli.main(MICRO + ["--train-iters", "2", *flags, "--save", str(save), "--load", str(save)]
                               + (["--use-distributed-optimizer"] if flags else []))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "may change only the data-parallel size" in err[0], err


@pytest.mark.parametrize("capability, refused", [((9, 0), True), ((8, 0), True), ((10, 0), False), ((12, 0), False)])
def test_mxfp8_needs_blackwell(monkeypatch, capability, refused):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for recipe in ("delayed", "tensorwise"):
        precision.check_fp8_recipe(recipe)
    if refused:
        with pytest.raises(UserError, match="mxfp8 needs compute capability 10.0"):
            precision.check_fp8_recipe("mxfp8")
    else:
        precision.check_fp8_recipe("mxfp8")


def test_mxfp8_refused_at_start_up_on_hopper(tmp_path, capsys, monkeypatch):
    """The CLI path: with TE importable and a (pretend) Hopper GPU, one line, exit 2, no process group."""
    real = optional.optional_import
    monkeypatch.setattr(optional, "optional_import",
                        lambda name: object() if name == "transformer_engine" else real(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(distributed, "initialize", lambda *a, **k: pytest.fail("a process group was started"))
    rc = pretrain_cli.main(MICRO + ["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8", "--bf16",
                                    "--save", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--fp8-recipe mxfp8 needs compute capability 10.0" in err[0], err


def test_every_parameter_is_created_where_megatron_puts_its_own(megatron_single, monkeypatch):
    """megatron's modules put parameters on torch.cuda.current_device() unless
    use_cpu_initialization; pointing that at 'meta' shows any parameter or buffer we create
    elsewhere (the local spec's RMSNorm was on the CPU). The TE spec needs TE and CUDA to build."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: META)
    config = model_config(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=16,
                          vocab_size=128, real_vocab_size=128, use_cpu_initialization=False)
    model = build_model(config, "local")
    megatron_linear = model.decoder.layers[0].mlp.linear_fc1.weight
    assert megatron_linear.device == META
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert len(tensors) > 8
    wrong = [name for name, t in tensors if t.device != megatron_linear.device]
    assert not wrong, wrong


@pytest.mark.integration
def test_package_import_sets_cuda_device_max_connections():
    """Set at the first import of the package, before anything can initialise CUDA (torchrun and
    Python users included); a value the user chose is kept."""
    code = "import os, megatron_ratplus; print(os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS'))"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "CUDA_DEVICE_MAX_CONNECTIONS": "4"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"


def test_sequence_parallel_refuses_other_cuda_device_max_connections(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    monkeypatch.setattr(distributed, "initialize", lambda *a, **k: pytest.fail("a process group was started"))
    rc = pretrain_cli.main(MICRO + ["--sequence-parallel", "--save", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs CUDA_DEVICE_MAX_CONNECTIONS=1" in err[0], err
