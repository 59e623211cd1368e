"""tools/gpu_check.py stays runnable without a GPU: it imports, refuses plainly, and its dry run passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
SCRIPT = TOOLS / "gpu_check.py"
GPU_ONLY = ("train transformer_engine", "train fp8", "fp8 precision boundaries", "dali loader")


def run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_no_gpu_message():
    assert run("--help").returncode == 0
    result = run()
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_check: no CUDA device (use --dry-run for the CPU smoke test)"


def test_unknown_section_and_offline_wheels(tmp_path):
    result = run("--dry-run", "--sections", "bogus")
    assert result.returncode == 2 and "unknown section(s) ['bogus']" in result.stderr
    out = tmp_path / "check.json"
    result = run("--dry-run", "--json", str(out), "--wheels", str(tmp_path), "--sections", "resume")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["wheels"] == {"installed": [], "note": f"no wheels in {tmp_path}"}
    assert report["skipped"] == {"resume": "needs the 'train local' section's run"}


def only_python3(tmp_path):
    """A PATH on which ``python3`` is this interpreter and ``python`` does not exist (the GPU image's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "python").write_text("#!/bin/sh\necho 'python: command not found' >&2\nexit 127\n")
    (bin_dir / "python").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_shell_entry_runs_with_only_python3(tmp_path):
    result = subprocess.run([str(TOOLS / "gpu_check.sh"), "--help"], capture_output=True, text=True, timeout=240,
                            env=only_python3(tmp_path))
    assert result.returncode == 0 and "Usage: tools/gpu_check.sh" in result.stdout, result.stderr


def test_dali_section_feeds_from_one_ranks_plain_loader(megatron_single):
    sys.path.insert(0, str(TOOLS))
    import gpu_check_train

    source = gpu_check_train.dali_source(micro=2, seq=64, samples=32)
    batches = source.microbatches(0, 8)
    assert len(batches) == 4 and all(b["tokens"].shape == (2, 64) for b in batches)
    assert not bool((batches[0]["tokens"] == batches[1]["tokens"]).all())  # distinct samples, not one repeated


@pytest.mark.slow
def test_dry_run_checks_every_kernel_and_the_cpu_training_sections(tmp_path):
    out = tmp_path / "check.json"  # through the shell entry, as on the GPU machine
    result = subprocess.run([str(TOOLS / "gpu_check.sh"), "--dry-run", "--json", str(out)], capture_output=True,
                            text=True, timeout=900, env=only_python3(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["correct"] and len(report["max_relative_error"]) == 6 and report["failures"] == {}
    assert {"copy_bandwidth_GBps", "scan_fwd", "scan_kv_fwd", "scan_kv_bwd", "attention T=32 dilated:4",
            "decode_ms"} <= set(report["timings"])
    training = report["training"]
    assert len(training["train local"]["losses"]) == 4
    assert training["resume"]["equal"] and training["resume"]["iterations"] == [3, 4]
    assert {"local_scan_ms", "correction_ms", "attend_gathered_ms dense"} <= set(training["cp building blocks"])
    assert all(report["skipped"][name] == "needs a CUDA GPU (dry run)" for name in GPU_ONLY)
    assert set(report["loss_curves"]) == {"1", "2", "3", "4"}
